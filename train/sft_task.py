"""Supervised fine-tuning as a `Task` for the trainer core: domain-expert SFT.

Data: conversations drawn from verifiable domains (`data/domains`, train split, mixed by weight)
and/or V4 chat JSONL files, tokenised with the assistant-only loss mask and bin-packed by
`data/sft.py`. The held-out set is drawn from the domains' *test* split, so the held-out loss and
the domain evaluation never see a training problem. The generated files live in
`run_dir/sft_data/` (written once by rank 0, atomically; the same config writes the same bytes,
so a resumed run reads the same data and `data/sft.py`'s content-keyed cache is reused).

Loss: the V4 objective (`train.task.lm_objective`) as a sum over assistant tokens; the trainer
divides by the assistant tokens of the whole global batch. The MTP block is skipped and frozen
unless `sft.train_mtp`.

Evaluation (every `logging.eval_every` and at the end): held-out loss on the test-split
conversations plus, per domain, greedy pass@1, format-valid rate and mean response length on
`sft.eval_n` test items through `train.evaluate.evaluate_domains`, the same code as
`python -m train.evaluate`. Items are sharded over data-parallel ranks; under expert parallelism
every rank evaluates every item (each forward is collective, and identical weights decode the
same greedy tokens, so all ranks run the same number of generation rounds).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from data.domains import spec
from model.config import ModelConfig

from .config import SFTSection, TrainConfig
from .dist import DistInfo
from .recipe import RecipeSchedule
from .task import EvalResult, LossOutput, Task, held_out_loss, labelled_tokens, lm_objective


def check_references(domain: Any, key: str) -> None:
    """SFT trains on reference replies: a domain without them (an outside environment) is
    refused before any work."""
    if not getattr(domain, "references", True):
        raise ValueError(f"{key}: {domain.name!r} has no reference answers to train on; use it "
                         f"for GRPO, distillation or evaluation")


def build_domains(sft: SFTSection) -> list[tuple[Any, float]]:
    """(Domain, weight) for each `sft.domains` entry (`data.domains.spec`), and `sft.files`
    checked: SFT needs domains or files."""
    built = spec.build_domains(sft.domains, sft.domain_options, sft.thinking_mode, "sft")
    for domain, _ in built:
        check_references(domain, "sft.domains")
    files = list(sft.files or [])
    if not built and not files:
        raise ValueError("sft.domains=[] and sft.files=[]: give domains (e.g. "
                         "sft.domains=[strings]) or V4 chat JSONL files to train on")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"sft.files: {f}: no such file")
    return built


class SFTTask(Task):
    def __init__(self, cfg: TrainConfig, info: DistInfo, model_cfg: ModelConfig,
                 tokenizer_file: str):
        from data.cache import rank0_first
        from data.config import SFTConfig
        from data.sft import build_sft_data

        self.cfg, self.info, self.model_cfg = cfg, info, model_cfg
        self.train_mtp = cfg.sft.train_mtp
        self.domains = build_domains(cfg.sft)
        data_dir = Path(cfg.run_dir) / "sft_data"
        train_files, val_files = rank0_first(lambda: self.write_domain_data(data_dir))
        sources = [{"path": str(f)} for f in [*train_files, *cfg.sft.files]]
        sft_cfg = SFTConfig(sources=sources, val_sources=[{"path": str(f)} for f in val_files],
                            tokenizer=tokenizer_file, overlong=cfg.sft.overlong,
                            default_thinking_mode=cfg.sft.thinking_mode,
                            cache_dir=cfg.data.cache_dir, prefetch=cfg.data.prefetch,
                            progress=cfg.logging.progress)
        self.data = build_sft_data(sft_cfg, tokenizer_file, cfg.data.seq_len,
                                   cfg.data.micro_batch, info.rank, info.world, cfg.seed,
                                   model_cfg=model_cfg, val_max_batches=cfg.logging.eval_batches)
        self.tokenizer = self.data.tokenizer
        # the run's own copy of the tokenizer, bundled into every checkpoint
        self.tokenizer_file = str(Path(cfg.run_dir) / "tokenizer.json")
        if info.is_main and Path(tokenizer_file).resolve() != Path(self.tokenizer_file).resolve():
            shutil.copyfile(tokenizer_file, self.tokenizer_file)
        self.pending: dict[str, Any] | None = None

    def write_domain_data(self, data_dir: Path) -> tuple[list[str], list[str]]:
        from data.domains.mixture import mixture, write_sft_jsonl

        if not self.domains:
            return [], []
        sft, seed = self.cfg.sft, self.cfg.seed
        spec = [(d, w) for d, w in self.domains]
        train, val = data_dir / "train.jsonl", data_dir / "val.jsonl"
        data_dir.mkdir(parents=True, exist_ok=True)
        write_sft_jsonl(mixture(spec, sft.examples, seed, split="train"), train)
        if sft.val_examples:
            write_sft_jsonl(mixture(spec, sft.val_examples, seed, split="test"), val)
        return [str(train)], [str(val)] if sft.val_examples else []

    # ------------------------------------------------------------------ data
    def make_schedule(self, lr_schedule) -> RecipeSchedule:
        return RecipeSchedule(self.cfg, self.model_cfg, lr_schedule.decay_start)

    def batches(self, step: int, n_micro: int, model) -> list[dict[str, Any]]:
        if self.phase.seq_len != self.cfg.data.seq_len:
            raise ValueError(f"recipe.seq_len_stages: SFT packs at data.seq_len="
                             f"{self.cfg.data.seq_len}; sequence-length stages are not supported")
        if self.pending is not None:
            self.data.train.load_state_dict(self.pending)
            self.pending = None
        return [next(self.data.train) for _ in range(n_micro)]

    def state_dict(self) -> dict[str, Any]:
        if self.pending is not None:
            return {"loader": self.pending}
        return {"loader": self.data.train.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state.get("loader") if state else None

    def close(self) -> None:
        getattr(self.data.train, "close", lambda: None)()

    # ------------------------------------------------------------------ loss
    def count(self, batch: dict[str, Any]) -> float:
        return labelled_tokens(batch["labels"])

    def loss(self, model, batch) -> LossOutput:
        return lm_objective(model, batch, self.phase, self.cfg.recipe, train_mtp=self.train_mtp)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, step: int) -> EvalResult:
        from .evaluate import stage_evaluation

        metrics: dict[str, float] = {}
        messages: list[str] = []
        if self.data.val is not None:
            metrics["val_loss"] = held_out_loss(model, self.data.val, self.info.device)
            messages.append(f"step {step}: held-out loss {metrics['val_loss']:.4f}")
        if self.domains and self.cfg.sft.eval_n:
            result = stage_evaluation(model, self.tokenizer, [d for d, _ in self.domains],
                                      self.cfg.sft.eval_n, self.cfg.sft.eval_max_new_tokens,
                                      self.cfg, self.info, step)
            metrics.update(result.metrics)
            messages += result.messages
        return EvalResult(metrics, messages)
