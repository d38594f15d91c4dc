"""The trainer core every stage shares: engine construction, the step loop with gradient
accumulation, router-bias updates, skipping of non-finite steps, evaluation, checkpointing,
signals and metrics. A stage supplies a `Task` (`train/task.py`: its batches, its loss as a sum
plus a count, its evaluation); pre-training's is `train/pretrain_task.py`, SFT, GRPO and
distillation plug in the same way.

One optimizer step, as data (design.md):

    task.batches (at the step boundary: RL rolls out here with the current weights)
    → global count = Σ task.count over micro-batches and ranks
    → gas × [engine.forward → loss sum → engine.backward(sum · gas · world / count)]
      (DeepSpeed divides by gas and averages over ranks at the boundary: the gradient is that of
      Σ sums / global count) → grad norm, finiteness → optimizer.step (or skip) → LR schedule
    → router biases from expert counts summed over micro-batches and ranks → metrics → checkpoint
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from model.config import ModelConfig
from model.summary import count_parameters
from model.transformer import Transformer
from optim import MuonAdamW, build_optimizer, check_zero_stage
from optim.build import split_expert_groups
from optim.weight_sharding import BlockWeightSharding
from optim.zero import sharded_state
from optim.schedule import LRSchedule, make_scheduler

from . import checkpoint as ckpt
from . import context_parallel as cp
from . import expert_parallel as ep
from . import faults
from . import guards
from . import init
from .activation import apply_activation_checkpointing
from .config import TrainConfig, validate_config
from .engine_config import deepspeed_config
from .dist import DistInfo, all_reduce_sum, any_rank, barrier, release_shm_workspace
from .metrics import MetricsLogger, detect_peak_tflops, flops_per_token, memory_bytes
from .plan import check_fit
from .schedule import Phase
from .stage import uses_bf16
from .task import EvalResult, StopRequested, Task


@dataclass
class StepStats:
    loss: float
    terms: dict[str, float]
    grad_norm: float
    skipped: bool         # non-finite: no update
    tokens: int
    no_signal: bool = False  # nothing to learn from (`Trainer.signal_in`): no update either


def build_lr_schedule(cfg: TrainConfig) -> LRSchedule:
    s = cfg.schedule
    # short runs (smoke tests, `steps=` overrides) shrink the preset's windows to fit
    decay = min(s.decay_steps if s.decay_steps is not None else max(1, cfg.steps // 10), cfg.steps)
    warm = min(s.warmup_steps, cfg.steps - decay)
    return LRSchedule(cfg.steps, warm, decay, s.min_ratio, s.decay)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, model_cfg: ModelConfig,
                 frozen_models: list | tuple = ()):
        """Validates everything that can be checked without data or weights. `frozen_models`:
        (name, ModelConfig, dtype) of the models the stage holds besides the policy (planned in
        the fit check)."""
        self.cfg, self.info, self.model_cfg = cfg, info, model_cfg
        self.frozen_models = list(frozen_models)
        validate_config(cfg, info.world, model_cfg)
        # context parallelism: ranks of one CP group read the same rows (train/context_parallel)
        self.dp_rank, self.dp_world = cp.data_rank(info.rank, info.world, cfg.parallel.cp_size)
        self.run_dir = Path(cfg.run_dir)
        self.bf16 = uses_bf16(cfg, info.device.type == "cuda")
        self.sharded = sharded_state(cfg.parallel.zero_stage)
        if cfg.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype={cfg.dtype!r}: choose auto, bf16 or fp32")
        self.schedule = build_lr_schedule(cfg)
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal this process got, if any
        self.exit_code = 0  # 128 + signal after a signal stop (a preempted job is not a success)
        self.step = 0
        self.skipped_steps = 0
        self.steps_without_signal = 0  # finite steps held back for want of a learning signal
        self.bad_in_a_row = 0
        self.tokens_seen = 0  # drives the batch-size ramp; checkpointed
        self.good_steps_this_run = 0  # this process's finite steps: a first NaN step stops
        self.evals_this_run = 0
        self.grad_accum(cfg.batch.global_batch)
        check_zero_stage(cfg.parallel.zero_stage)
        ep.validate(model_cfg, info.world, cfg.parallel.ep_size, cfg.parallel.zero_stage)
        check_fit(cfg, model_cfg, info, self.bf16, self.frozen_models)
        # the checkpoint to resume is complete, of this layout and model (no side effects yet)
        resuming = ckpt.check_resume(cfg.checkpoint.resume, self.run_dir, info.world,
                                     cfg.parallel.ep_size, model_cfg) is not None
        # init_from's weights fit this model and tokenizer (headers only; ignored when resuming)
        self.init_source = init.check_init_from(cfg, model_cfg, resuming, info.is_main)

    # ------------------------------------------------------------------ set-up
    def grad_accum(self, global_batch: int) -> int:
        per_step = self.cfg.data.micro_batch * self.dp_world
        if global_batch % per_step:
            raise ValueError(f"batch.global_batch={global_batch} must be a multiple of "
                             f"data.micro_batch={self.cfg.data.micro_batch} x data-parallel "
                             f"size {self.dp_world}")
        return global_batch // per_step

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
        self.model.to_empty(device=info.device)  # new Parameter objects: tags are gone
        if self.ep is not None:
            ep.mark_expert_params(self.model, self.ep)
        self.model.init_weights()
        if cfg.parallel.cp_size > 1:
            self.model.context_parallel = cp.create(cfg.parallel.cp_size, info.rank, info.world)
        # init_from: this rank's share of the starting weights, before the optimizer sees them
        init.apply_init_from(self.init_source, self.model, info, self.run_dir,
                             getattr(self, "task", None))
        apply_activation_checkpointing(self.model, cfg.activation_checkpointing)
        if self.sharded and self.bf16:  # what DeepSpeed's bf16 mode does, without its wrapper
            self.model.bfloat16()
        if cfg.compile and info.device.type == "cuda" and cfg.parallel.zero_stage < 3:
            # (stage 3's gather/release hooks change storages under the compiled block)
            for block in [*self.model.layers, *self.model.mtp]:
                block.compile()
        self.optimizer = self.build_optimizer()
        self.scheduler = make_scheduler(self.optimizer, self.schedule)
        self.gas = self.grad_accum(self.global_batch_at(0, self.phase_for(0)))
        if self.ep is not None:
            ep.check_expert_marks(self.model, self.ep)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer,
            config=deepspeed_config(cfg, info, self.gas, self.bf16))
        release_shm_workspace()  # when deepspeed.initialize set up the process group itself
        if self.sharded:  # the optimizer reduces each gradient to its owner instead
            self.engine.enable_backward_allreduce = False
        if cfg.parallel.zero_stage == 3:  # after the engine's start-up broadcast of whole weights
            BlockWeightSharding(self.model, self.optimizer)
        if self.ep is not None:
            ep.attach_engine(self.engine)
        counts = count_parameters(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, counts.activated, cfg.data.seq_len)
        self.peak_flops = (cfg.logging.peak_tflops or detect_peak_tflops(info.device) or 0) * 1e12

    def build_optimizer(self):
        """MuonAdamW for `optim.name=muon` (Muon on matrices, AdamW on the rest) or `adamw`
        (every parameter in one AdamW group: the same update as torch.optim.AdamW, with our
        non-finite-step skipping), expert state owned within its expert-data-parallel group."""
        cfg = self.cfg
        if cfg.optim.name == "muon":
            return build_optimizer(
                self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                muon_momentum=cfg.optim.muon_momentum,
                ns_coefficients=cfg.optim.ns_coefficients,
                adamw_betas=tuple(cfg.optim.adamw_betas), adamw_eps=cfg.optim.adamw_eps,
                model_config=self.model_cfg,
                expert_process_group=ep.optimizer_shard_group(self.ep) if self.ep else None,
                zero_stage=cfg.parallel.zero_stage)
        if cfg.optim.name == "adamw":
            # our optimizer with every parameter in one AdamW group (the same update as
            # torch.optim.AdamW), so a non-finite step is skipped as under Muon
            named = list(self.model.named_parameters())
            groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named],
                       "use_muon": False}]
            if self.ep is not None:  # experts' state is owned within their expert-DP group
                groups = split_expert_groups(groups, ep.optimizer_shard_group(self.ep),
                                             include_adamw=True)
            return MuonAdamW(
                groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.adamw_betas),
                eps=cfg.optim.adamw_eps, weight_decay=cfg.optim.weight_decay,
                zero_stage=cfg.parallel.zero_stage)
        raise ValueError(f"optim.name={cfg.optim.name!r}: choose muon or adamw")

    def global_batch_at(self, tokens_consumed: int, phase: Phase) -> int:
        return self.stage.sequences(tokens_consumed, phase, self.cfg.data.micro_batch * self.dp_world)

    # ------------------------------------------------------------------ phases and data
    def enter_phase(self, phase: Phase) -> None:
        self.stage.enter(self.model, phase, self.task.train_mtp)
        self.task.enter_phase(phase)
        self.phase = phase

    def check_stage_layout(self, phase: Phase, save: bool) -> None:
        """A phase this layout cannot run stops the run (after a checkpoint of this step when
        `save`: a switch mid-run; at start-up the resumed checkpoint is that one)."""
        error = self.stage.layout_error(phase, self.step, self.info.world)
        if error is not None:
            if save:
                self.save()
            raise error

    def phase_for(self, step: int) -> Phase:
        return self.stage.phase(step)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepStats:
        """One optimizer step on the task's micro-batches for this step."""
        batches = self.task.batches(self.step, self.gas, self.model)
        if len(batches) != self.gas:
            raise RuntimeError(f"the task gave {len(batches)} micro-batches for step "
                               f"{self.step + 1}, the trainer asked for {self.gas}")
        return self.step_on(batches)

    def step_on(self, batches: list[dict[str, Any]]) -> StepStats:
        info, engine = self.info, self.engine
        batches = [{k: v.to(info.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in b.items()} for b in batches]
        self.accumulate(batches)
        grad_norm = self.grad_norm()
        skip = any_rank(bool(self.bad) or not math.isfinite(grad_norm), info.device)
        hold = skip or not self.signal_in(batches)
        if hold:
            self.optimizer_core().skip_next_step()
        elif self.sharded:
            coef = ep.clip_coefficient(self.cfg.optim.grad_clip, grad_norm)
            if coef < 1.0:
                self.optimizer.scale_gradients(coef)
        elif self.ep is not None and not self.bf16:
            ep.clip_grads_(self.model, self.cfg.optim.grad_clip, grad_norm)
        engine.step()  # the boundary: DeepSpeed calls our optimizer (which may skip)
        counts = self.last_counts
        all_reduce_sum(counts)
        if not hold:
            self.scheduler.step()
            if self.task.update_router_bias:  # a stage may keep them fixed
                self.model.update_router_biases(counts, self.cfg.recipe.bias_update_speed)
        sums = all_reduce_sum(self.sums.to(info.device)).cpu()
        loss, *terms = (sums / max(self.global_count, 1.0)).tolist()
        self.last_ep_metrics = ep.dispatch_metrics(self.model, self.ep, counts)  # this step's
        tokens = sum(self.task.tokens(b) for b in batches)  # whole rows: once per CP group
        return StepStats(loss, dict(zip(self.metric_names, terms)), grad_norm, skip,
                         tokens * self.dp_world, no_signal=hold and not skip)

    def signal_in(self, batches: list[dict[str, Any]]) -> bool:
        """Whether this step's loss can teach anything, on any rank: some unit to count (the
        global count is > 0) and, where the task says more (`Task.carries_signal`: GRPO needs a
        non-zero advantage), a batch that carries signal. A step without one is held like a
        non-finite one: no optimizer update, no state change (AdamW's or Muon's momentum would
        otherwise carry an earlier update into it), no schedule advance, no router-bias update,
        so the next step with signal finds exactly the state a run without this step would
        have. TRL and verl step the optimizer anyway (a zero gradient still moves Adam's
        weights through momentum and decoupled weight decay)."""
        if self.global_count <= 0:
            return False
        return any_rank(any(self.task.carries_signal(b) for b in batches), self.info.device)

    def accumulate(self, batches: list[dict[str, Any]]) -> None:
        """Forward and backward over this step's micro-batches; afterwards the parameters hold
        the gradient of (Σ loss sums over micro-batches and ranks) / (global count)."""
        info, engine = self.info, self.engine
        local = torch.tensor([sum(float(self.task.count(b)) for b in batches)],
                             dtype=torch.float64, device=info.device)
        self.global_count = float(all_reduce_sum(local))
        # DeepSpeed divides each backward by gas and averages gradients over the ranks
        scale = len(batches) * info.world / max(self.global_count, 1.0)
        self.bad = torch.zeros((), dtype=torch.bool, device=info.device)
        self.last_counts, self.metric_names, sums = None, None, []
        for i, batch in enumerate(batches):
            # the boundary is set, not inferred from DeepSpeed's micro-step counter: that counter
            # runs over the whole process, so after a batch-ramp change (or a resume, which
            # restarts it) it would put the boundary mid-step
            last = i == len(batches) - 1
            engine.set_gradient_accumulation_boundary(last)
            out = self.task.loss(engine, batch)
            total = out.total
            if faults.nan_at(self.step + 1):
                total = total * float("nan")
            faults.maybe_raise(info.rank)
            self.bad |= ~torch.isfinite(total.detach())  # stays on the device: no sync here
            engine.backward(total * scale)
            if self.sharded:  # into fp32, on the owners (stage 2) or locally (stage 1)
                self.optimizer.accumulate_gradients()
            names = sorted(out.metrics)
            if self.metric_names is None:
                self.metric_names = names
            elif names != self.metric_names:  # every rank all-reduces the same vector
                raise RuntimeError(f"the task's loss metrics changed within a step: "
                                   f"{self.metric_names} then {names}")
            sums.append(torch.stack([total.detach().double(),
                                     *(out.metrics[k].detach().double() for k in names)]))
            if out.expert_counts is not None:
                c = out.expert_counts.detach().float()
                self.last_counts = c if self.last_counts is None else self.last_counts + c
            if not last:
                engine.step()
        if self.sharded:
            self.optimizer.finish_gradients()
        self.sums = torch.stack(sums).sum(0)
        if self.last_counts is None:
            self.last_counts = torch.zeros(0, 0, device=info.device)

    def optimizer_core(self):
        """Our optimizer, even when DeepSpeed wraps it (bf16 master weights)."""
        opt = self.optimizer
        if not hasattr(opt, "skip_next_step"):
            raise ValueError(f"optim.name={self.cfg.optim.name}: the optimizer cannot skip a "
                             f"non-finite step; use optim.name=muon")
        return opt

    def grad_norm(self) -> float:
        """Global L2 norm of the reduced gradient (each expert counted once under EP)."""
        if self.sharded:
            return self.optimizer.grad_norm()
        return ep.global_grad_norm(self.model, self.ep)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> EvalResult:
        """The stage's evaluation, on every rank (collective forwards under EP), in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate(self.model, self.step)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "task": self.task.state_dict(),
                "init_from": self.init_source.record() if self.init_source else None,
                "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "tokens_seen": self.tokens_seen, "steps_without_signal": self.steps_without_signal}

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
        # None entries: LambdaLR leaves those lambdas as they are. The base LRs are this
        # config's too, one per parameter group of this layout (expert parallelism splits the
        # experts into groups of their own, so a resharded resume may have more or fewer)
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(saved or [None]),
                                        "base_lrs": list(self.scheduler.base_lrs)})
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
        return self.stage.replay_tokens(steps, self.cfg.data.micro_batch * self.dp_world)

    def resume(self) -> None:
        # cleans crash leftovers, skips unusable checkpoints, sets later ones aside
        path = ckpt.start_point(self.cfg.checkpoint.resume, self.run_dir, self.info)
        if path is None:
            where = (f"loaded from init_from={self.cfg.init_from}" if self.init_source else
                     f"after initialisation (seed={self.cfg.seed})")
            guards.check_finite_weights(self.model, where, self.info.device)
            return
        state = ckpt.load_checkpoint(path, self.info, self.model, self.optimizer)  # EP-aware
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None and self.engine.optimizer is not self.optimizer:
            refresh()  # bf16: DeepSpeed's fp32 master copies must see the loaded weights
        self.step = state["step"]
        self.load_scheduler(state["scheduler"])
        self.skipped_steps = state["skipped_steps"]
        self.steps_without_signal = state.get("steps_without_signal", 0)
        self.bad_in_a_row = state["bad_in_a_row"]
        self.tokens_seen = (state["tokens_seen"] if "tokens_seen" in state
                            else self.replay_tokens(self.step))
        # checkpoints written before the task seam kept the pre-training loader at top level
        self.task.load_state_dict(state["task"] if "task" in state else
                                  {"loader": state["loader"], "loader_key": state["loader_key"]})
        guards.check_finite_weights(self.model, f"in checkpoint {path}", self.info.device)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True
        self.stop_signal = signum

    def should_stop(self) -> bool:
        """This process was asked to stop (a task polls it inside long batch work, e.g. between
        rollout chunks, and raises `StopRequested`)."""
        return self.stop_requested

    def attach(self, task: Task) -> None:
        """The stage this trainer runs: its schedule (phases and batch per step) and the stop
        check its long batch work polls."""
        self.task = task
        task.stop_check = self.should_stop
        self.stage = task.make_schedule(self.schedule)

    def run(self, task: Task) -> None:
        cfg, info = self.cfg, self.info
        if cfg.parallel.cp_size > 1 and not task.context_parallel:
            raise cp.ContextParallelError(
                f"parallel.cp_size={cfg.parallel.cp_size}: context parallelism is for "
                f"pre-training; this stage needs parallel.cp_size=1")
        self.attach(task)
        self.build()
        task.attach_frozen(self.ep)  # frozen models, sharded like the policy
        self.resume()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.logger = MetricsLogger(self.run_dir, info.is_main, cfg.steps, self.step,
                                    cfg.logging.wandb, OmegaConf.to_container(cfg, resolve=True),
                                    cfg.logging.progress)
        self.check_stage_layout(self.phase_for(self.step), save=False)
        self.enter_phase(self.phase_for(self.step))
        error = None
        try:
            while self.step < cfg.steps and self.run_step():
                pass
        except BaseException as e:
            error = e
            raise
        finally:  # no collective here: after an error the other ranks must not wait on us
            # best-effort while an error propagates: a failing plot must not replace it
            guards.finish([("closing the task's data", self.task.close),
                           ("closing the metrics logger", self.logger.close)], error)
        barrier()

    def run_step(self) -> bool:
        """One optimizer step of the loop and what follows it (logs, evaluation, checkpoint);
        False when the run stops here (a signal, or a stop mid-batch)."""
        cfg, info = self.cfg, self.info
        phase = self.phase_for(self.step)
        if phase.seq_len != self.phase.seq_len:
            self.check_stage_layout(phase, save=True)
        if phase != self.phase:
            self.enter_phase(phase)
        new_gas = self.grad_accum(self.global_batch_at(self.tokens_seen, phase))
        if new_gas != self.gas:
            self.gas = new_gas
            self.engine.set_train_batch_size(cfg.data.micro_batch * new_gas * info.world)
        t0 = time.perf_counter()
        try:
            stats = self.train_step()
        except StopRequested:  # mid-batch (a rollout): its state was rolled back
            self.stop_now()
            return False
        dt = time.perf_counter() - t0
        self.tokens_seen += stats.tokens
        self.step += 1
        faults.maybe_sigterm(self.step)
        self.count_outcome(stats)
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
            self.stopped_message()
        return not stop

    def count_outcome(self, stats: StepStats) -> None:
        """Skipped-step bookkeeping: a first step of this process that is non-finite stops the
        run (named), as do `max_bad_steps` skipped steps in a row."""
        if stats.skipped and self.good_steps_this_run == 0:
            self.stop_on_first_bad_step()
        if not stats.skipped:
            self.bad_in_a_row = 0
            self.good_steps_this_run += 1
            self.steps_without_signal += stats.no_signal
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        self.logger.message(f"step {self.step}: non-finite loss or gradient, skipped")
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_a_row} non-finite steps in a row (max_bad_steps="
                f"{self.cfg.max_bad_steps}); stopping. The last good checkpoint is intact "
                f"under {ckpt.checkpoint_root(self.run_dir)}")

    def stop_now(self) -> None:
        """A stop agreed by every rank before this step's update: checkpoint the last
        completed step (unless inside a streak of skipped steps) and say so."""
        if self.bad_in_a_row == 0:
            self.save()
        self.stopped_message()

    def stopped_message(self) -> None:
        self.exit_code = 128 + (self.stop_signal or signal.SIGTERM)
        self.logger.message(f"stopped by signal at step {self.step}; resume with "
                            f"checkpoint.resume=auto (exit status {self.exit_code})")

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
                   "steps_without_signal": self.steps_without_signal,
                   "global_batch": self.gas * self.cfg.data.micro_batch * self.dp_world,
                   "tokens_seen": self.tokens_seen,
                   "seq_len": self.phase.seq_len,
                   "expert_imbalance_max": max(imbalance),
                   **{f"expert_imbalance/layer{i}": v for i, v in enumerate(imbalance)}}
        metrics.update(self.last_ep_metrics)
        metrics.update(self.task.step_metrics(seconds))  # e.g. GRPO's rollout metrics
        metrics.update(self.task.derive_metrics(metrics))  # e.g. distillation's KL per domain
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
        """A non-finite held-out loss (any `*loss` metric of the stage's evaluation): garbage
        weights stop the run (named); so does a first evaluation of this process that is
        non-finite. A later one is reported."""
        self.evals_this_run += 1
        bad = {k: v for k, v in metrics.items()
               if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)}
        if not bad:
            return
        guards.check_finite_weights(self.model, f"at step {self.step}", self.info.device)
        if self.evals_this_run == 1:
            raise guards.NonFiniteError(
                f"the first held-out loss of this run (step {self.step}) is non-finite "
                f"({bad}) although the weights are finite")
        self.logger.message(f"step {self.step}: held-out loss is non-finite ({bad})")

    def eval_and_sample(self) -> None:
        result = self.evaluate()
        self.check_eval(result.metrics)
        if result.metrics:
            self.logger.log(self.step, result.metrics)
        if self.info.is_main:
            for line in result.messages:
                self.logger.message(line)
