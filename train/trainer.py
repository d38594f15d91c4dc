"""The trainer core every stage shares: engine construction, the step loop with gradient
accumulation, router-bias updates, skipping of non-finite steps, evaluation, checkpointing,
signals and metrics. A stage supplies a `Task` (its batches and its loss); pre-training's is in
`train/task.py`, SFT, GRPO and distillation plug in the same way.

One optimizer step, as data (design.md):

    gas × [batch → engine.forward → loss terms → engine.backward]   (DeepSpeed all-reduces at the
    boundary) → grad norm, finiteness → optimizer.step (or skip) → LR schedule → router biases
    from expert counts summed over micro-batches and ranks → metrics → checkpoint
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf

from model.config import ModelConfig
from model.loss import LossTerms
from model.summary import count_parameters
from model.transformer import Transformer
from optim import build_optimizer, check_zero_stage
from optim.schedule import LRSchedule, batch_size_ramp, make_scheduler

from . import checkpoint as ckpt
from . import expert_parallel as ep
from . import faults
from . import guards
from . import init
from .activation import apply_activation_checkpointing
from .config import TrainConfig, validate_config
from .dist import DistInfo, all_reduce_sum, any_rank, barrier
from .metrics import MetricsLogger, detect_peak_tflops, flops_per_token, memory_bytes
from .plan import available_memory, make_plan
from .recipe import Phase, phase_at


class Task(Protocol):
    """What a training stage provides to the trainer."""

    tokenizer_file: str | None

    def train_loader(self, seq_len: int, stage: int): ...  # iterable with state_dict()

    def val_loader(self, seq_len: int): ...  # finite iterable with bytes_per_token, or None

    def loss(self, model, batch: dict[str, torch.Tensor], phase: Phase) -> tuple[LossTerms, Any]:
        """(loss terms, model output) for one micro-batch."""

    def sample(self, model, step: int) -> str | None: ...


@dataclass
class StepStats:
    loss: float
    terms: dict[str, float]
    grad_norm: float
    skipped: bool
    tokens: int


def deepspeed_config(cfg: TrainConfig, info: DistInfo, grad_accum: int, bf16: bool) -> dict:
    check_zero_stage(cfg.parallel.zero_stage)
    # With EP in fp32 the trainer clips (DeepSpeed would average per-rank norms of different
    # parameters); bf16 keeps DeepSpeed's wrapper clipping (see train/README.md).
    clip = 0.0 if cfg.parallel.ep_size > 1 and not bf16 else float(cfg.optim.grad_clip)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.data.micro_batch * grad_accum * info.world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_lr_schedule(cfg: TrainConfig) -> LRSchedule:
    s = cfg.schedule
    # short runs (smoke tests, `steps=` overrides) shrink the preset's windows to fit
    decay = min(s.decay_steps if s.decay_steps is not None else max(1, cfg.steps // 10), cfg.steps)
    warm = min(s.warmup_steps, cfg.steps - decay)
    return LRSchedule(cfg.steps, warm, decay, s.min_ratio, s.decay)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, model_cfg: ModelConfig):
        """Validates everything that can be checked without data or weights."""
        self.cfg, self.info, self.model_cfg = cfg, info, model_cfg
        validate_config(cfg, info.world, model_cfg)
        self.run_dir = Path(cfg.run_dir)
        self.bf16 = (cfg.dtype == "bf16" or (cfg.dtype == "auto" and info.device.type == "cuda"))
        if cfg.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype={cfg.dtype!r}: choose auto, bf16 or fp32")
        self.schedule = build_lr_schedule(cfg)
        self.stop_requested = False
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.tokens_seen = 0  # drives the batch-size ramp; checkpointed
        self.good_steps_this_run = 0  # this process's finite steps: a first NaN step stops
        self.evals_this_run = 0
        self.grad_accum(cfg.batch.global_batch)
        if cfg.batch.ramp_start is not None:
            self.grad_accum(cfg.batch.ramp_start)
        check_zero_stage(cfg.parallel.zero_stage)
        ep.validate(model_cfg, info.world, cfg.parallel.ep_size, cfg.parallel.zero_stage)
        self.check_fit()
        # the checkpoint to resume is complete, of this layout and model (no side effects yet)
        resuming = ckpt.check_resume(cfg.checkpoint.resume, self.run_dir, info.world,
                                     cfg.parallel.ep_size, model_cfg) is not None
        # init_from's weights fit this model and tokenizer (headers only; ignored when resuming)
        self.init_source = init.check_init_from(cfg, model_cfg, resuming, info.is_main)

    # ------------------------------------------------------------------ set-up
    def grad_accum(self, global_batch: int) -> int:
        per_step = self.cfg.data.micro_batch * self.info.world
        if global_batch % per_step:
            raise ValueError(f"batch.global_batch={global_batch} must be a multiple of "
                             f"data.micro_batch={self.cfg.data.micro_batch} x world size "
                             f"{self.info.world}")
        return global_batch // per_step

    def check_fit(self) -> None:
        """Stops before allocating when the plan cannot fit this machine's devices."""
        cfg = self.cfg
        plan = make_plan(self.model_cfg, self.info.world, cfg.parallel.ep_size,
                         cfg.data.micro_batch, cfg.data.seq_len, cfg.batch.global_batch,
                         self.bf16, cfg.activation_checkpointing)
        limit = available_memory(self.info.device)
        if plan.total > 0.9 * limit:
            raise SystemExit(
                f"{plan.format()}\n\nconf={cfg.run_name} needs ~{plan.total / 2**30:.1f} GiB per "
                f"rank but this {self.info.device.type} rank has {limit / 2**30:.1f} GiB. Use more "
                f"ranks or expert parallelism (parallel.ep_size), activation_checkpointing, a "
                f"smaller data.micro_batch, or a smaller preset. `dry_run=true` prints this plan.")

    def build(self) -> None:
        cfg, info = self.cfg, self.info
        import deepspeed

        torch.manual_seed(cfg.seed)
        # Built on the meta device, sharded, then materialised: a rank only ever allocates its
        # own experts, and the deterministic init gives every rank the slice the full model has.
        with torch.device("meta"):
            self.model = Transformer(self.model_cfg)
        self.ep = None
        if cfg.parallel.ep_size > 1:  # before the optimizer and engine see the parameters
            self.ep = ep.create_groups(cfg.parallel.ep_size)
            ep.shard_model(self.model, self.ep)
        self.model.to_empty(device=info.device)
        self.model.init_weights()
        # init_from: this rank's share of the starting weights, before the optimizer sees them
        init.apply_init_from(self.init_source, self.model, info, self.run_dir,
                             getattr(self, "task", None))
        apply_activation_checkpointing(self.model, cfg.activation_checkpointing)
        if cfg.compile and info.device.type == "cuda":
            for block in [*self.model.layers, *self.model.mtp]:
                block.compile()
        if cfg.optim.name == "muon":
            self.optimizer = build_optimizer(
                self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                muon_momentum=cfg.optim.muon_momentum,
                ns_coefficients=cfg.optim.ns_coefficients,
                adamw_betas=tuple(cfg.optim.adamw_betas), adamw_eps=cfg.optim.adamw_eps,
                model_config=self.model_cfg,
                expert_process_group=ep.optimizer_shard_group(self.ep) if self.ep else None)
        elif cfg.optim.name == "adamw":
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.adamw_betas),
                eps=cfg.optim.adamw_eps, weight_decay=cfg.optim.weight_decay)
        else:
            raise ValueError(f"optim.name={cfg.optim.name!r}: choose muon or adamw")
        self.scheduler = make_scheduler(self.optimizer, self.schedule)
        self.gas = self.grad_accum(self.global_batch_at(0))
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer,
            config=deepspeed_config(cfg, info, self.gas, self.bf16))
        if self.ep is not None:
            ep.attach_engine(self.engine)
        counts = count_parameters(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, counts.activated, cfg.data.seq_len)
        self.peak_flops = (cfg.logging.peak_tflops or detect_peak_tflops(info.device) or 0) * 1e12

    def global_batch_at(self, tokens_consumed: int) -> int:
        b = self.cfg.batch
        if b.ramp_start is None:
            return b.global_batch
        return batch_size_ramp(tokens_consumed, b.ramp_start, b.global_batch, b.ramp_tokens,
                               multiple_of=self.cfg.data.micro_batch * self.info.world)

    # ------------------------------------------------------------------ phases and data
    def enter_phase(self, phase: Phase) -> None:
        self.model.set_csa_mode(phase.csa_mode, indexer_loss=phase.indexer_loss)
        for name, p in self.model.named_parameters():  # indexer warm-up trains the indexer only
            p.requires_grad_(not phase.indexer_only or ".attn.indexer." in name)
        stage = sum(1 for s in self.cfg.recipe.seq_len_stages if self.step >= s.step)
        if getattr(self, "loader_key", None) != (phase.seq_len, stage):
            if hasattr(self, "loader"):
                getattr(self.loader, "close", lambda: None)()
            self.loader = self.task.train_loader(phase.seq_len, stage)
            self.loader_key = (phase.seq_len, stage)
            # the saved position belongs to the loader of the stage it was saved in; resuming
            # exactly at a stage boundary starts the new stage's fresh pass, as the
            # uninterrupted run does
            if self.pending_loader_state is not None and self.pending_loader_key == self.loader_key:
                self.loader.load_state_dict(self.pending_loader_state)
            self.pending_loader_state = None
        self.phase = phase

    def phase_for(self, step: int) -> Phase:
        return phase_at(step, self.cfg.recipe, self.schedule.decay_start, self.cfg.data.seq_len)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepStats:
        info, engine = self.info, self.engine
        totals = torch.zeros(5, dtype=torch.float64)
        counts = None
        bad = False
        tokens = 0
        for i in range(self.gas):
            # the boundary is set, not inferred from DeepSpeed's micro-step counter: that counter
            # runs over the whole process, so after a batch-ramp change (or a resume, which
            # restarts it) it would put the boundary mid-step
            last = i == self.gas - 1
            engine.set_gradient_accumulation_boundary(last)
            batch = {k: v.to(info.device, non_blocking=True) for k, v in next(self.loader).items()}
            terms, out = self.task.loss(engine, batch, self.phase)
            if faults.nan_at(self.step + 1):
                terms.total = terms.total * float("nan")
            faults.maybe_raise(info.rank)
            tokens += batch["input_ids"].numel()
            bad |= not bool(torch.isfinite(terms.total))
            engine.backward(terms.total)
            totals += torch.tensor([float(t) for t in (terms.total.detach(), terms.lm, terms.mtp,
                                                       terms.balance, terms.indexer)],
                                   dtype=torch.float64)
            c = out.expert_counts.detach().float()
            counts = c if counts is None else counts + c
            if not last:
                engine.step()
        grad_norm = self.grad_norm()
        skip = any_rank(bad or not math.isfinite(grad_norm), info.device)
        if skip:
            self.optimizer_core().skip_next_step()
        elif self.ep is not None and not self.bf16:
            ep.clip_grads_(self.model, self.cfg.optim.grad_clip, grad_norm)
        engine.step()  # the boundary: DeepSpeed calls our optimizer (which may skip)
        all_reduce_sum(counts)
        if not skip:
            self.scheduler.step()
            self.model.update_router_biases(counts, self.cfg.recipe.bias_update_speed)
        totals = all_reduce_sum(totals.to(info.device)).cpu() / (self.gas * info.world)
        self.last_counts = counts
        self.last_ep_metrics = ep.dispatch_metrics(self.model, self.ep, counts)  # this step's
        names = ("loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_loss")
        return StepStats(float(totals[0]), dict(zip(names[1:], totals[1:].tolist())), grad_norm,
                         skip, tokens * info.world)

    def optimizer_core(self):
        """Our optimizer, even when DeepSpeed wraps it (bf16 master weights)."""
        opt = self.optimizer
        if not hasattr(opt, "skip_next_step"):
            raise ValueError(f"optim.name={self.cfg.optim.name}: the optimizer cannot skip a "
                             f"non-finite step; use optim.name=muon")
        return opt

    def grad_norm(self) -> float:
        """Global L2 norm of the reduced gradient (each expert counted once under EP)."""
        return ep.global_grad_norm(self.model, self.ep)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        val = self.task.val_loader(self.phase.seq_len)
        if val is None:
            return {}
        totals = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for batch in val:
            batch = {k: v.to(self.info.device) for k, v in batch.items()}
            out = self.engine(batch["input_ids"], doc_ids=batch["doc_ids"],
                              positions=batch["positions"])
            labels = batch["labels"]
            ce = torch.nn.functional.cross_entropy(
                out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                reduction="sum")
            totals += torch.stack([ce.double(), (labels != -100).sum().double()])
        all_reduce_sum(totals)
        loss = float(totals[0] / totals[1].clamp_min(1))
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / val.bytes_per_token}

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(), "loader_key": self.loader_key,
                "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "tokens_seen": self.tokens_seen}

    def save(self) -> Path:
        target = ckpt.checkpoint_root(self.run_dir) / f"step_{self.step:08d}"
        try:
            faults.disk_full(target)
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, self.info, self.model, self.optimizer,
                self.trainer_state(), OmegaConf.to_yaml(self.cfg), self.task.tokenizer_file,
                self.cfg.checkpoint.keep, ep_groups=self.ep)
        except OSError as e:
            raise OSError(e.errno, guards.save_failure(target, self.step, e)) from e
        except RuntimeError as e:  # torch reports a full disk as a bare RuntimeError
            raise RuntimeError(guards.save_failure(target, self.step, e)) from e
        self.logger.message(f"checkpoint: {path}")
        return path

    def load_scheduler(self, state: dict[str, Any]) -> None:
        """Restores the schedule's position (optimizer steps taken; skipped steps do not count)
        but keeps this config's schedule: LambdaLR would otherwise overwrite the `LRSchedule`
        in place with the checkpoint's, so `steps=` or `schedule.*` changed for a resumed run
        were silently ignored (and the phases, which read the same object, moved with it)."""
        saved = state.get("lr_lambdas")
        # None entries: LambdaLR leaves those lambdas as they are
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(saved or [None])})
        if saved and saved[0] != vars(self.schedule) and self.info.is_main:
            print(f"LR schedule differs from the checkpoint's {saved[0]}; using this config's "
                  f"{vars(self.schedule)}", flush=True)
        factor = self.schedule(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor  # LambdaLR's own expression: the same float
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def replay_tokens(self, steps: int) -> int:
        """Tokens consumed by `steps` optimizer steps, for checkpoints written before
        `tokens_seen` was saved: every step (skipped or not) consumes global_batch × seq_len."""
        tokens = 0
        for s in range(steps):
            tokens += self.global_batch_at(tokens) * self.phase_for(s).seq_len
        return tokens

    def resume(self) -> None:
        self.pending_loader_state = None
        self.pending_loader_key = None
        # cleans crash leftovers, skips unusable checkpoints, sets later ones aside
        path = ckpt.start_point(self.cfg.checkpoint.resume, self.run_dir, self.info)
        if path is None:
            guards.check_finite_weights(self.model, f"after initialisation (seed={self.cfg.seed})",
                                        self.info.device)
            return
        state = ckpt.load_checkpoint(path, self.info, self.model, self.optimizer)  # EP-aware
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None and self.engine.optimizer is not self.optimizer:
            refresh()  # bf16: DeepSpeed's fp32 master copies must see the loaded weights
        self.step = state["step"]
        self.load_scheduler(state["scheduler"])
        self.skipped_steps = state["skipped_steps"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.tokens_seen = (state["tokens_seen"] if "tokens_seen" in state
                            else self.replay_tokens(self.step))
        self.pending_loader_state = state["loader"]
        self.pending_loader_key = tuple(state["loader_key"])
        guards.check_finite_weights(self.model, f"in checkpoint {path}", self.info.device)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def run(self, task: Task) -> None:
        cfg, info = self.cfg, self.info
        self.task = task
        self.build()
        self.resume()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.logger = MetricsLogger(self.run_dir, info.is_main, cfg.steps, self.step,
                                    cfg.logging.wandb, OmegaConf.to_container(cfg, resolve=True),
                                    cfg.logging.progress)
        self.enter_phase(self.phase_for(self.step))
        error = None
        try:
            while self.step < cfg.steps:
                phase = self.phase_for(self.step)
                if phase != self.phase:
                    self.enter_phase(phase)
                new_gas = self.grad_accum(self.global_batch_at(self.tokens_seen))
                if new_gas != self.gas:
                    self.gas = new_gas
                    self.engine.set_train_batch_size(cfg.data.micro_batch * new_gas * info.world)
                t0 = time.perf_counter()
                stats = self.train_step()
                dt = time.perf_counter() - t0
                self.tokens_seen += stats.tokens
                self.step += 1
                faults.maybe_sigterm(self.step)
                if stats.skipped and self.good_steps_this_run == 0:
                    self.stop_on_first_bad_step()
                if stats.skipped:
                    self.skipped_steps += 1
                    self.bad_in_a_row += 1
                    self.logger.message(f"step {self.step}: non-finite loss or gradient, skipped")
                    if self.bad_in_a_row >= cfg.max_bad_steps:
                        raise RuntimeError(
                            f"{self.bad_in_a_row} non-finite steps in a row (max_bad_steps="
                            f"{cfg.max_bad_steps}); stopping. The last good checkpoint is intact "
                            f"under {ckpt.checkpoint_root(self.run_dir)}")
                else:
                    self.bad_in_a_row = 0
                    self.good_steps_this_run += 1
                self.log_step(stats, dt)
                if self.due(cfg.logging.eval_every) or self.step == cfg.steps:
                    self.eval_and_sample()
                gone = info.launcher.gone() if info.launcher is not None else None
                if gone and not self.stop_requested:
                    self.stop_requested = True
                    print(f"rank {info.rank}: {gone}; stopping as on SIGTERM", flush=True)
                stop = any_rank(self.stop_requested, info.device)
                # never checkpoint inside a streak of skipped steps: the last good one stays
                if self.bad_in_a_row == 0 and (self.due(cfg.checkpoint.every) or stop
                                               or self.step == cfg.steps):
                    self.save()
                if stop:
                    self.logger.message(f"stopped by signal at step {self.step}; resume with "
                                        f"checkpoint.resume=auto")
                    break
        except BaseException as e:
            error = e
            raise
        finally:  # no collective here: after an error the other ranks must not wait on us
            # best-effort while an error propagates: a failing plot must not replace it
            guards.finish([("closing the data loader",
                            getattr(getattr(self, "loader", None), "close", lambda: None)),
                           ("closing the metrics logger", self.logger.close)], error)
        barrier()

    def due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def log_step(self, stats: StepStats, seconds: float) -> None:
        if self.step % self.cfg.logging.every and self.step != self.cfg.steps:
            return
        counts = self.last_counts
        imbalance = (counts.max(1).values / counts.mean(1).clamp_min(1e-9)).tolist()
        tps = stats.tokens / max(seconds, 1e-9)
        metrics = {"loss": stats.loss, **stats.terms, "grad_norm": stats.grad_norm,
                   "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                   "step_seconds": seconds, "memory_gib": memory_bytes(self.info.device) / 2**30,
                   "skipped_steps": self.skipped_steps, "csa_mode": self.phase.csa_mode,
                   "global_batch": self.gas * self.cfg.data.micro_batch * self.info.world,
                   "tokens_seen": self.tokens_seen,
                   "seq_len": self.phase.seq_len,
                   "expert_imbalance_max": max(imbalance),
                   **{f"expert_imbalance/layer{i}": v for i, v in enumerate(imbalance)}}
        metrics.update(self.last_ep_metrics)
        if self.peak_flops:
            metrics["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.info.world)
        self.logger.log(self.step, metrics)

    def stop_on_first_bad_step(self) -> None:
        """The first step of this process is non-finite: skipping it would only skip all the
        others (weights full of garbage skip every step), so stop and say which it is."""
        guards.check_finite_weights(self.model, f"at step {self.step}", self.info.device)
        raise guards.NonFiniteError(
            f"the first loss or gradient of this run (step {self.step}) is non-finite although "
            f"the weights are finite; check the data and numerics (dtype={self.cfg.dtype}, "
            f"optim.lr={self.cfg.optim.lr}) before resuming")

    def check_eval(self, metrics: dict[str, float]) -> None:
        """A non-finite held-out loss: garbage weights stop the run (named); so does a first
        evaluation of this process that is non-finite. A later one is reported."""
        self.evals_this_run += 1
        if not metrics or math.isfinite(metrics["val_loss"]):
            return
        guards.check_finite_weights(self.model, f"at step {self.step}", self.info.device)
        if self.evals_this_run == 1:
            raise guards.NonFiniteError(
                f"the first held-out loss of this run (step {self.step}) is non-finite "
                f"({metrics['val_loss']}) although the weights are finite")
        self.logger.message(f"step {self.step}: held-out loss is non-finite")

    def eval_and_sample(self) -> None:
        metrics = self.evaluate()
        self.check_eval(metrics)
        # Under EP every rank must run the forward (each MoE layer is an all-to-all over the
        # EP group); greedy decoding gives the same text everywhere and only rank 0 prints it.
        sample = (self.task.sample(self.model, self.step)
                  if self.info.is_main or self.ep is not None else None)
        if not self.info.is_main:
            sample = None
        if metrics:
            self.logger.log(self.step, metrics)
            self.logger.message(f"step {self.step}: held-out loss {metrics['val_loss']:.4f}, "
                                f"{metrics['val_bpb']:.4f} bits/byte")
        if sample is not None:
            self.logger.message(f"step {self.step} sample: {sample!r}")
