"""Pre-training as a `Task` for the trainer core: packed batches from `data/`, the V4 objective
from `model/loss.py`, a short greedy sample for the logs."""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig
from model.loss import LossWeights, compute_loss

from .config import TrainConfig
from .dist import DistInfo
from .recipe import Phase


def data_config(cfg: TrainConfig):
    from data.config import DataConfig

    d = cfg.data
    return DataConfig(sources=[dict(s) for s in d.sources],
                      val_sources=[dict(s) for s in d.val_sources], val_fraction=d.val_fraction,
                      tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                      default_max_files=d.default_max_files, cache_dir=d.cache_dir,
                      prefetch=d.prefetch, progress=cfg.logging.progress)


class PretrainTask:
    def __init__(self, cfg: TrainConfig, info: DistInfo, model_cfg: ModelConfig):
        from data.pretrain import make_train_loader, make_val_loader, prepare_pretrain

        self.cfg, self.info, self.model_cfg = cfg, info, model_cfg
        self.data_cfg = data_config(cfg)
        self._make_train, self._make_val = make_train_loader, make_val_loader
        self._prepared = {}
        self._val = {}
        self._prepare = prepare_pretrain
        prep = self.prepared(cfg.data.seq_len)  # validates tokenizer vs model before training
        self.tokenizer = prep.tokenizer
        # the run's own copy of the tokenizer, bundled into every checkpoint
        self.tokenizer_file = str(Path(cfg.run_dir) / "tokenizer.json")
        if info.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            self.tokenizer.backend_tokenizer.save(self.tokenizer_file)

    def prepared(self, seq_len: int):
        if seq_len not in self._prepared:
            self._prepared[seq_len] = self._prepare(self.data_cfg, None, seq_len=seq_len,
                                                    model_cfg=self.model_cfg)
        return self._prepared[seq_len]

    def train_loader(self, seq_len: int, stage: int):
        # each sequence-length stage draws its own shuffled pass over the data
        return self._make_train(self.prepared(seq_len), self.data_cfg, seq_len,
                                self.cfg.data.micro_batch, self.info.rank, self.info.world,
                                self.cfg.seed + 1000 * stage)

    def val_loader(self, seq_len: int):
        if seq_len not in self._val:
            self._val[seq_len] = self._make_val(self.prepared(seq_len), seq_len,
                                                self.cfg.data.micro_batch, self.info.rank,
                                                self.info.world, self.cfg.logging.eval_batches)
        return self._val[seq_len]

    def loss(self, model, batch, phase: Phase):
        out = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
        r = self.cfg.recipe
        weights = LossWeights(mtp=phase.mtp_weight, balance=r.balance_weight,
                              indexer=r.indexer_weight)
        return compute_loss(out, batch["input_ids"], batch["labels"], batch["doc_ids"],
                            weights), out

    def sample(self, model, step: int) -> str | None:
        from model.generation import generate

        lg = self.cfg.logging
        ids = self.tokenizer.encode(lg.sample_prompt, add_special_tokens=False)
        out = generate(model, [[self.model_cfg.bos_token_id] + ids],
                       max_new_tokens=lg.sample_tokens, temperature=0.0,
                       eos_id=self.model_cfg.eos_token_id)
        return lg.sample_prompt + self.tokenizer.decode(out.tokens[0])
