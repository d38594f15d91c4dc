"""Typed schema of the training configuration (Hydra structured configs).

`conf/pretrain.yaml` and the presets in `conf/conf/` fill this schema; a mistyped key or a wrong
type fails at start-up with Hydra's own message because the schema is the first entry of the
defaults list. The model, data and optimizer packages keep their own plain dataclasses; the
trainer converts these sections into them at the entry point.

Hydra checks types, not values, so every numeric field carries its allowed range next to its
default (`_num(default, ">= 1")`); `validate_config` walks the schema, checks each range and the
rules between fields, and reports every bad key at once, at start-up, before any data or model
work (a zero micro-batch would otherwise surface as a ZeroDivisionError, a negative lr only after
the model is built).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

_NUMBER = r"(-?[\d.e+-]+)"
_RULE = re.compile(rf"^(?:(>=|>|<=|<) *{_NUMBER}|([\[(]) *{_NUMBER} *, *{_NUMBER} *([\])]))$")


def _num(default: Any, rule: str, **kw: Any) -> Any:
    """A numeric field and its allowed range: '>= 1', '> 0', '[0, 1)' (applies to each element
    of a list; None, where the type allows it, is always allowed)."""
    if not _RULE.match(rule):
        raise ValueError(f"bad range rule {rule!r}")
    if callable(default):
        return field(default_factory=default, metadata={"range": rule}, **kw)
    return field(default=default, metadata={"range": rule}, **kw)


def _bound(text: str) -> float:
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)  # exact for big ints


def _within(value: float, rule: str) -> bool:
    m = _RULE.match(rule)
    if m.group(1):
        op, bound = m.group(1), _bound(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound,
                "<": value < bound}[op]
    lo, hi = _bound(m.group(4)), _bound(m.group(5))
    return ((value >= lo if m.group(3) == "[" else value > lo)
            and (value <= hi if m.group(6) == "]" else value < hi))


def _describe(rule: str) -> str:
    return f"must be {rule}" if rule[0] in "<>" else f"must be in {rule}"


@dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | small | flash | pro | path to a released config.json
    overrides: Any = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers: 2}


@dataclass
class DataSection:
    sources: List[Any] = field(default_factory=list)  # [{path, weight, column, format, ...}]
    val_sources: List[Any] = field(default_factory=list)
    val_fraction: float = _num(0.01, "[0, 1)")
    tokenizer: Optional[str] = None  # tokenizer.json; None = the default trained one
    vocab_size: int = _num(8192, ">= 1")  # default tokenizer size (must fit the model's vocab)
    # default corpus from the first N stdlib files
    default_max_files: Optional[int] = _num(None, ">= 1")
    cache_dir: Optional[str] = None
    prefetch: int = _num(8, ">= 0")  # batches prepared ahead; 0 = synchronous
    seq_len: int = _num(512, ">= 1")
    micro_batch: int = _num(4, ">= 1")  # sequences per rank per micro-batch


@dataclass
class OptimSection:
    name: str = "muon"  # muon (Muon + AdamW) | adamw (AdamW everywhere; baseline)
    lr: float = _num(2.7e-4, "> 0")  # peak, AdamW-style (Muon's update RMS is matched to it)
    weight_decay: float = _num(0.1, ">= 0")
    muon_momentum: float = _num(0.95, "[0, 1)")
    ns_coefficients: str = "hybrid10"
    adamw_betas: List[float] = _num(lambda: [0.9, 0.95], "[0, 1)")  # (beta1, beta2)
    adamw_eps: float = _num(1e-20, "> 0")
    grad_clip: float = _num(1.0, ">= 0")  # global norm; 0 disables


@dataclass
class ScheduleSection:
    warmup_steps: int = _num(2000, ">= 0")
    decay_steps: Optional[int] = _num(None, ">= 0")  # final cosine window; None = 10% of the steps
    min_ratio: float = _num(0.1, "[0, 1]")  # floor as a fraction of the peak
    decay: str = "cosine"  # cosine | linear | sqrt (WSD)


@dataclass
class BatchSection:
    # sequences per optimizer step (all ranks, all micro-batches)
    global_batch: int = _num(8, ">= 1")
    # batch-size ramp start (sequences); None = no ramp
    ramp_start: Optional[int] = _num(None, ">= 1")
    ramp_tokens: int = _num(0, ">= 0")  # tokens over which the batch grows to global_batch
    # what a sequence-length stage keeps: "tokens" (global_batch and ramp_start count sequences
    # of the length at step 0, L0; a stage of length L runs global_batch·L0/L sequences, so the
    # tokens per step stay at the target) or "sequences" (the count stays, tokens grow with L)
    per_stage: str = "tokens"


@dataclass
class SeqStage:
    step: int = _num(0, ">= 0")
    seq_len: int = _num(512, ">= 1")


@dataclass
class RecipeSection:
    """DeepSeek-V4's training recipe (spec §10); released values in the flash/pro presets."""

    mtp_weight: float = _num(0.3, ">= 0")
    mtp_weight_after_decay: float = _num(0.1, ">= 0")  # from the start of LR decay
    balance_weight: float = _num(1e-4, ">= 0")
    bias_update_speed: float = _num(1e-3, ">= 0")
    indexer_weight: float = _num(1.0, ">= 0")
    csa_dense_until: int = _num(0, ">= 0")  # CSA attends densely before this step
    # then this many steps of dense CSA + indexer-only training
    indexer_warmup_steps: int = _num(0, ">= 0")
    seq_len_stages: List[SeqStage] = field(default_factory=list)  # [{step, seq_len}] ascending


@dataclass
class ParallelSection:
    zero_stage: int = _num(0, "[0, 3]")  # only what optim.zero supports (checked)
    ep_size: int = _num(1, ">= 1")  # must divide the world size (checked at launch)
    # context parallelism: each sequence split over cp_size consecutive ranks (pre-training);
    # world = data-parallel x cp_size (train/context_parallel.py)
    cp_size: int = _num(1, ">= 1")


@dataclass
class CheckpointSection:
    every: int = _num(100, ">= 0")  # optimizer steps; 0 = only at the end and on signals
    keep: int = _num(3, ">= 0")  # newest checkpoints kept; 0 = keep all
    resume: str = "auto"  # auto | none | a checkpoint directory


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "v4lab"
    entity: Optional[str] = None


@dataclass
class LoggingSection:
    every: int = _num(1, ">= 1")  # metrics every N optimizer steps
    eval_every: int = _num(100, ">= 0")  # held-out loss and bits per byte; 0 = only at the end
    eval_batches: int = _num(8, ">= 1")
    sample_every: int = _num(0, ">= 0")  # greedy sample; 0 = with evaluation
    sample_tokens: int = _num(32, ">= 0")
    sample_prompt: str = "def "
    progress: bool = True
    # per device, for MFU; None = detected (GPU) or unknown
    peak_tflops: Optional[float] = _num(None, "> 0")
    wandb: WandbSection = field(default_factory=WandbSection)


@dataclass
class SFTSection:
    """Supervised fine-tuning data and evaluation (`train/sft.py`; unused by pre-training)."""

    # verifiable domains (data/domains), "name" or "name:weight": [strings] or [strings, arith:2]
    domains: List[str] = field(default_factory=list)
    # per-domain constructor options, e.g. {arith: {difficulty: 3}}
    domain_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    examples: int = _num(20000, ">= 1")  # training conversations drawn from the domains
    val_examples: int = _num(256, ">= 0")  # held-out conversations from the domains' test split
    files: List[str] = field(default_factory=list)  # V4 chat JSONL files (data/sft.py format)
    thinking_mode: str = "chat"  # chat | thinking: the domains' rendering
    overlong: str = "truncate"  # truncate | drop: conversations longer than data.seq_len
    train_mtp: bool = False  # also train the MTP block (skipped and frozen otherwise)
    eval_n: int = _num(64, ">= 0")  # test items per domain at each evaluation (greedy pass@1)
    eval_max_new_tokens: int = _num(64, ">= 1")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    sft: SFTSection = field(default_factory=SFTSection)
    steps: int = _num(100, ">= 1")  # optimizer steps
    # non-negative for numpy's default_rng, at most 2**64 - 1 for torch.manual_seed
    seed: int = _num(0, "[0, 18446744073709551615]")
    run_dir: str = "runs/${run_name}"
    run_name: str = "tiny"
    dry_run: bool = False
    world_size: Optional[int] = _num(None, ">= 1")  # for dry_run plans; None = the launched world
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "off"  # off | block | selective
    compile: bool = False  # torch.compile each block (GPU)
    max_bad_steps: int = _num(5, ">= 1")  # consecutive non-finite steps before stopping
    # start from these weights (a checkpoint step dir / model dir, an export, a release): fresh
    # optimizer at step 0; a resumable checkpoint of this run wins (train/init.py)
    init_from: Optional[str] = None


class ConfigError(ValueError):
    """One or more bad values in the training config; the message lists every one."""


def _range_problems(node: Any, schema: type, prefix: str) -> list[str]:
    """`key=value: must be ...` for each value of `node` outside its field's declared range,
    recursing into sections and lists of sections (e.g. recipe.seq_len_stages[1].seq_len)."""
    problems = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        kind = hints[f.name]
        item = (typing.get_args(kind) or (None,))[0]
        if dataclasses.is_dataclass(kind):
            problems += _range_problems(value, kind, f"{key}.")
        elif typing.get_origin(kind) in (list, List) and dataclasses.is_dataclass(item):
            for i, v in enumerate(value or []):
                problems += _range_problems(v, item, f"{key}[{i}].")
        elif "range" in f.metadata and value is not None:
            rule = f.metadata["range"]
            items = list(value) if typing.get_origin(kind) in (list, List) else [value]
            bad = [v for v in items
                   if isinstance(v, bool) or not isinstance(v, (int, float))
                   or not math.isfinite(v) or not _within(v, rule)]
            if bad:
                if typing.get_origin(kind) in (list, List):
                    shown, why = f"{key}={list(items)}", f"each element {_describe(rule)}"
                else:
                    shown, why = f"{key}={value}", _describe(rule)
                problems.append(f"{shown}: {why}")
    return problems


def section_problems(node: Any, schema: type, prefix: str) -> list[str]:
    """The range problems of one section (for a stage's own schema, e.g. `grpo.`)."""
    return _range_problems(node, schema, prefix)


def _stage_order_problems(recipe: Any) -> list[str]:
    steps = [s.step for s in recipe.seq_len_stages]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        return [f"recipe.seq_len_stages: steps {steps} must be strictly ascending"]
    return []


def recipe_problems(recipe: Any) -> list[str]:
    """The recipe section's own checks (for stages that build a RecipeSection directly)."""
    return _range_problems(recipe, RecipeSection, "recipe.") + _stage_order_problems(recipe)


def _batch_problems(cfg: Any, world: int | None, model_cfg: Any) -> list[str]:
    """The batch against the micro-batch, the data-parallel size and the stages, and the
    context-parallel layout against the world and every stage's length."""
    from train.context_parallel import validate as validate_cp

    problems = []
    b, micro, cp = cfg.batch, cfg.data.micro_batch, cfg.parallel.cp_size
    if b.per_stage not in ("tokens", "sequences"):
        problems.append(f"batch.per_stage={b.per_stage!r}: choose one of tokens, sequences")
    dp = world // cp if world and cp >= 1 and world % cp == 0 else world
    per_step = micro * (dp or 1) if micro >= 1 else None
    unit = f"data.micro_batch={micro}" + (
        f" x data-parallel size {dp} (world {world} / parallel.cp_size {cp})" if world and cp > 1
        else f" x world size {world}" if world else "")
    for key, value in (("batch.global_batch", b.global_batch), ("batch.ramp_start", b.ramp_start)):
        if per_step and value is not None and value >= 1 and value % per_step:
            problems.append(f"{key}={value}: must be a multiple of {unit}")
    # every stage must keep a whole number of sequences; whether this layout divides them (and
    # cuts them into long enough chunks) is checked by the trainer for the stage it starts in
    # (after a resume) and at every switch (`Trainer.check_stage_layout`): each stage may run
    # with its own cp_size
    if b.per_stage == "tokens" and b.global_batch >= 1:
        base = batch_seq_len(cfg)
        for i, stage in enumerate(cfg.recipe.seq_len_stages):
            if stage.seq_len >= 1 and stage_batch(b.global_batch, base, stage.seq_len) is None:
                problems.append(
                    f"recipe.seq_len_stages[{i}].seq_len={stage.seq_len}: keeping the tokens of "
                    f"batch.global_batch={b.global_batch} sequences of {base} tokens needs a "
                    f"whole number of sequences (got {b.global_batch * base / stage.seq_len:g});"
                    f" change batch.global_batch, or set batch.per_stage=sequences")
    if world and model_cfg is not None:
        try:
            validate_cp(model_cfg, world, cp,
                        [] if cfg.recipe.seq_len_stages else [cfg.data.seq_len])
        except ValueError as e:
            problems.append(str(e))
    return problems


def batch_seq_len(cfg: Any) -> int:
    """The length `batch.global_batch` counts sequences of: the run's length at step 0 (the
    stage starting at step 0, else data.seq_len)."""
    return next((s.seq_len for s in cfg.recipe.seq_len_stages if s.step == 0), cfg.data.seq_len)


def sequences_at(cfg: Any, global_batch: int, seq_len: int) -> int | None:
    """`global_batch` (sequences at `batch_seq_len`) as sequences of `seq_len` under
    `batch.per_stage` (None when "tokens" does not give a whole number)."""
    if cfg.batch.per_stage != "tokens":
        return global_batch
    return stage_batch(global_batch, batch_seq_len(cfg), seq_len)


def step_sequences(cfg: Any, tokens_consumed: int, seq_len: int, per_step: int) -> int:
    """Sequences in the step after `tokens_consumed` tokens, at a stage of `seq_len`, a multiple
    of `per_step` (micro-batch x data-parallel size): the ramp's value, counted in sequences of
    `batch_seq_len`, and with `batch.per_stage=tokens` rescaled to hold the same tokens at
    `seq_len` (the ramp's intermediate values round down to a multiple)."""
    from optim.schedule import batch_size_ramp

    b = cfg.batch
    n = b.global_batch if b.ramp_start is None else batch_size_ramp(
        tokens_consumed, b.ramp_start, b.global_batch, b.ramp_tokens, multiple_of=per_step)
    base = batch_seq_len(cfg)
    if b.per_stage == "tokens" and seq_len != base:
        n = max(per_step, n * base // seq_len // per_step * per_step)
    return n


def stage_batch(global_batch: int, base_len: int, seq_len: int) -> int | None:
    """Sequences per step at `seq_len` that hold the tokens of `global_batch` sequences of
    `base_len`; None when that is not a whole number."""
    tokens = global_batch * base_len
    return tokens // seq_len if seq_len >= 1 and tokens % seq_len == 0 else None


def _cross_problems(cfg: Any, world: int | None, model_cfg: Any) -> list[str]:
    """The rules between fields (and against the launched world and the model, when known)."""
    from optim.newton_schulz import SCHEDULES
    from optim.schedule import DECAY_SHAPES
    from optim.zero import check_zero_stage
    from train.activation import LEVELS

    problems = []
    choices = {"optim.name": (cfg.optim.name, ("muon", "adamw")),
               "optim.ns_coefficients": (cfg.optim.ns_coefficients, tuple(SCHEDULES)),
               "schedule.decay": (cfg.schedule.decay, DECAY_SHAPES),
               "dtype": (cfg.dtype, ("auto", "bf16", "fp32")),
               "device": (cfg.device, ("auto", "cpu", "cuda")),
               "activation_checkpointing": (cfg.activation_checkpointing, LEVELS),
               "logging.wandb.mode": (cfg.logging.wandb.mode, ("offline", "online", "disabled")),
               "sft.thinking_mode": (cfg.sft.thinking_mode, ("chat", "thinking")),
               "sft.overlong": (cfg.sft.overlong, ("truncate", "drop"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            problems.append(f"{key}={value!r}: choose one of {', '.join(map(str, allowed))}")
    if 0 <= cfg.parallel.zero_stage <= 3:  # a ZeRO stage, but one Muon cannot use?
        try:
            check_zero_stage(cfg.parallel.zero_stage)
        except ValueError as e:
            problems.append(f"parallel.zero_stage={cfg.parallel.zero_stage}: {e}")
    if len(cfg.optim.adamw_betas) != 2:
        problems.append(f"optim.adamw_betas={list(cfg.optim.adamw_betas)}: give two values "
                        f"(beta1, beta2)")
    problems += _batch_problems(cfg, world, model_cfg)
    b = cfg.batch
    if b.ramp_start is not None and b.ramp_start > b.global_batch >= 1:
        problems.append(f"batch.ramp_start={b.ramp_start}: must be <= batch.global_batch="
                        f"{b.global_batch}")
    problems += _stage_order_problems(cfg.recipe)
    init_from = getattr(cfg, "init_from", None)
    if init_from is not None and not str(init_from).strip():
        problems.append("init_from='': give a checkpoint directory, or leave it unset (null)")
    if model_cfg is not None:
        lengths = [("data.seq_len", cfg.data.seq_len)] + [
            (f"recipe.seq_len_stages[{i}].seq_len", s.seq_len)
            for i, s in enumerate(cfg.recipe.seq_len_stages)]
        for key, value in lengths:
            if value > model_cfg.max_seq_len:
                problems.append(f"{key}={value}: must be <= the model's max_seq_len="
                                f"{model_cfg.max_seq_len}")
        # data.vocab_size sizes a tokenizer trained for this run: none is when one is given
        # (data.tokenizer) or comes with the starting checkpoint (init_from)
        trains_tokenizer = cfg.data.tokenizer is None and not getattr(cfg, "init_from", None)
        if trains_tokenizer and cfg.data.vocab_size > model_cfg.vocab_size:
            problems.append(f"data.vocab_size={cfg.data.vocab_size}: must be <= the model's "
                            f"vocab_size={model_cfg.vocab_size}")
    return problems


def config_problems(cfg: Any, world: int | None = None, model_cfg: Any = None) -> list[str]:
    """Every problem with `cfg` (a TrainConfig or its OmegaConf node), one line per bad key."""
    return _range_problems(cfg, TrainConfig, "") + _cross_problems(cfg, world, model_cfg)


def validate_config(cfg: Any, world: int | None = None, model_cfg: Any = None) -> None:
    """Raises ConfigError listing every bad key; call it first, before any data or model work.
    `world` (the launched world size) and `model_cfg` enable the checks that depend on them."""
    raise_problems(config_problems(cfg, world, model_cfg))


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid training config ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
