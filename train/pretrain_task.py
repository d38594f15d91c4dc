"""Pre-training as a `Task` for the trainer core: packed batches from `data/`, the V4 objective
from `model/loss.py` as a token sum, held-out loss and bits per byte, a short greedy sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from model.config import ModelConfig

from .config import TrainConfig
from .context_parallel import data_rank
from .dist import DistInfo, forwards_are_collective
from .recipe import RecipeSchedule
from .task import EvalResult, LossOutput, Task, held_out_loss, labelled_tokens, lm_objective


def data_config(cfg: TrainConfig):
    from data.config import DataConfig

    d = cfg.data
    return DataConfig(sources=[dict(s) for s in d.sources],
                      val_sources=[dict(s) for s in d.val_sources], val_fraction=d.val_fraction,
                      tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                      default_max_files=d.default_max_files, cache_dir=d.cache_dir,
                      prefetch=d.prefetch, progress=cfg.logging.progress)


class PretrainTask(Task):
    context_parallel = True  # parallel.cp_size > 1 runs (train/context_parallel.py)

    def __init__(self, cfg: TrainConfig, info: DistInfo, model_cfg: ModelConfig):
        from data.pretrain import make_train_loader, make_val_loader, prepare_pretrain

        self.cfg, self.info, self.model_cfg = cfg, info, model_cfg
        # ranks of one context-parallel group read the same rows
        self.cp_size = cfg.parallel.cp_size
        self.dp_rank, self.dp_world = data_rank(info.rank, info.world, self.cp_size)
        self.data_cfg = data_config(cfg)
        self._make_train, self._make_val = make_train_loader, make_val_loader
        self._prepared: dict[int, Any] = {}
        self._val: dict[int, Any] = {}
        self._prepare = prepare_pretrain
        self.loader = None
        self.loader_key: tuple[int, int] | None = None
        self.pending: dict[str, Any] | None = None  # a checkpoint's data position, not yet used
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

    # ------------------------------------------------------------------ data
    def train_loader(self, seq_len: int, stage: int):
        # each sequence-length stage draws its own shuffled pass over the data
        return self._make_train(self.prepared(seq_len), self.data_cfg, seq_len,
                                self.cfg.data.micro_batch, self.dp_rank, self.dp_world,
                                self.cfg.seed + 1000 * stage)

    def make_schedule(self, lr_schedule) -> RecipeSchedule:
        return RecipeSchedule(self.cfg, self.model_cfg, lr_schedule.decay_start)

    def batches(self, step: int, n_micro: int, model) -> list[dict[str, Any]]:
        stage = sum(1 for s in self.cfg.recipe.seq_len_stages if step >= s.step)
        key = (self.phase.seq_len, stage)
        if self.loader_key != key:
            self.close()
            self.loader, self.loader_key = self.train_loader(*key), key
            # the saved position belongs to the loader of the stage it was saved in; resuming
            # exactly at a stage boundary starts the new stage's fresh pass, as the
            # uninterrupted run does
            if self.pending is not None and tuple(self.pending["loader_key"]) == key:
                self.loader.load_state_dict(self.pending["loader"])
            self.pending = None
        return [next(self.loader) for _ in range(n_micro)]

    def state_dict(self) -> dict[str, Any]:
        if self.loader is None:  # saved before any step of this process: keep what was loaded
            return dict(self.pending) if self.pending is not None else {}
        return {"loader": self.loader.state_dict(), "loader_key": self.loader_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = dict(state) if state else None

    def close(self) -> None:
        if self.loader is not None:
            getattr(self.loader, "close", lambda: None)()
            self.loader = None

    # ------------------------------------------------------------------ loss
    def count(self, batch: dict[str, Any]) -> float:
        # whole rows on every rank of a CP group, each computing 1/cp_size of them: the
        # group's counts add up to the rows' (the trainer only uses the global sum)
        return labelled_tokens(batch["labels"]) / self.cp_size

    def loss(self, model, batch) -> LossOutput:
        return lm_objective(model, batch, self.phase, self.cfg.recipe, train_mtp=True)

    # ------------------------------------------------------------------ evaluation
    def val_loader(self, seq_len: int):
        if seq_len not in self._val:
            self._val[seq_len] = self._make_val(self.prepared(seq_len), seq_len,
                                                self.cfg.data.micro_batch, self.dp_rank,
                                                self.dp_world, self.cfg.logging.eval_batches)
        return self._val[seq_len]

    def held_out_loss(self, model, seq_len: int) -> dict[str, float]:
        val = self.val_loader(seq_len)
        if val is None:
            return {}
        loss = held_out_loss(model, val, self.info.device)
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / val.bytes_per_token}

    def evaluate(self, model, step: int) -> EvalResult:
        metrics = self.held_out_loss(model, self.phase.seq_len)
        messages = []
        if metrics:
            messages.append(f"step {step}: held-out loss {metrics['val_loss']:.4f}, "
                            f"{metrics['val_bpb']:.4f} bits/byte")
        # Under EP or ZeRO-3 every rank must run the forward (each MoE layer is an all-to-all,
        # each block a weight gather); greedy decoding gives the same text everywhere and only
        # rank 0 prints it.
        if self.info.is_main or forwards_are_collective(self.cfg):
            sample = self.sample(model, step)
            messages.append(f"step {step} sample: {sample!r}")
        return EvalResult(metrics, messages)

    def sample(self, model, step: int) -> str:
        from model.generation import generate

        lg = self.cfg.logging
        ids = self.tokenizer.encode(lg.sample_prompt, add_special_tokens=False)
        out = generate(model, [[self.model_cfg.bos_token_id] + ids],
                       max_new_tokens=lg.sample_tokens, temperature=0.0,
                       eos_id=self.model_cfg.eos_token_id)
        return lg.sample_prompt + self.tokenizer.decode(out.tokens[0])
