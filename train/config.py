"""Typed schema of the training configuration (Hydra structured configs).

`conf/pretrain.yaml` and the presets in `conf/conf/` fill this schema; a mistyped key or a wrong
type fails at start-up with Hydra's own message because the schema is the first entry of the
defaults list. The model, data and optimizer packages keep their own plain dataclasses; the
trainer converts these sections into them at the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | small | flash | pro | path to a released config.json
    overrides: Any = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers: 2}


@dataclass
class DataSection:
    sources: List[Any] = field(default_factory=list)  # [{path, weight, column, format, ...}]
    val_sources: List[Any] = field(default_factory=list)
    val_fraction: float = 0.01
    tokenizer: Optional[str] = None  # tokenizer.json; None = the default trained one
    vocab_size: int = 8192  # default tokenizer size (must fit the model's vocab)
    default_max_files: Optional[int] = None  # default corpus from the first N stdlib files
    cache_dir: Optional[str] = None
    prefetch: int = 8
    seq_len: int = 512
    micro_batch: int = 4  # sequences per rank per micro-batch


@dataclass
class OptimSection:
    name: str = "muon"  # muon (Muon + AdamW) | adamw (AdamW everywhere; baseline)
    lr: float = 2.7e-4  # peak, AdamW-style (Muon's update RMS is matched to it)
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    ns_coefficients: str = "hybrid10"
    adamw_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-20
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclass
class ScheduleSection:
    warmup_steps: int = 2000
    decay_steps: Optional[int] = None  # final cosine window; None = 10% of the steps
    min_ratio: float = 0.1  # floor as a fraction of the peak
    decay: str = "cosine"  # cosine | linear | sqrt (WSD)


@dataclass
class BatchSection:
    global_batch: int = 8  # sequences per optimizer step (all ranks, all micro-batches)
    ramp_start: Optional[int] = None  # batch-size ramp start (sequences); None = no ramp
    ramp_tokens: int = 0  # tokens over which the batch grows to global_batch


@dataclass
class SeqStage:
    step: int = 0
    seq_len: int = 512


@dataclass
class RecipeSection:
    """DeepSeek-V4's training recipe (spec §10); released values in the flash/pro presets."""

    mtp_weight: float = 0.3
    mtp_weight_after_decay: float = 0.1  # from the start of LR decay
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3
    indexer_weight: float = 1.0
    csa_dense_until: int = 0  # CSA attends densely before this step
    indexer_warmup_steps: int = 0  # then this many steps of dense CSA + indexer-only training
    seq_len_stages: List[SeqStage] = field(default_factory=list)  # [{step, seq_len}] ascending


@dataclass
class ParallelSection:
    zero_stage: int = 0
    ep_size: int = 1


@dataclass
class CheckpointSection:
    every: int = 100  # optimizer steps; 0 = only at the end and on signals
    keep: int = 3
    resume: str = "auto"  # auto | none | a checkpoint directory


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "v4lab"
    entity: Optional[str] = None


@dataclass
class LoggingSection:
    every: int = 1  # metrics every N optimizer steps
    eval_every: int = 100  # held-out loss and bits per byte; 0 = only at the end
    eval_batches: int = 8
    sample_every: int = 0  # greedy sample; 0 = with evaluation
    sample_tokens: int = 32
    sample_prompt: str = "def "
    progress: bool = True
    peak_tflops: Optional[float] = None  # per device, for MFU; None = detected (GPU) or unknown
    wandb: WandbSection = field(default_factory=WandbSection)


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
    steps: int = 100  # optimizer steps
    seed: int = 0
    run_dir: str = "runs/${run_name}"
    run_name: str = "tiny"
    dry_run: bool = False
    world_size: Optional[int] = None  # for dry_run plans; None = the launched world
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "off"  # off | block | selective
    compile: bool = False  # torch.compile each block (GPU)
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
