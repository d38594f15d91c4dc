"""The DeepSpeed config the trainer builds its engine from (one place for what DeepSpeed does and
what the trainer and `optim/` do instead)."""

from __future__ import annotations

from optim.zero import sharded_state

from .config import TrainConfig
from .dist import DistInfo


def deepspeed_config(cfg: TrainConfig, info: DistInfo, grad_accum: int, bf16: bool) -> dict:
    """The engine always runs at DeepSpeed stage 0. Under our stages 1 and 2 (`optim.zero`) the
    optimizer keeps the fp32 masters, so DeepSpeed's bf16 wrapper is off (the trainer casts the
    model itself) and the trainer clips on the owners' gradient shards."""
    sharded = sharded_state(cfg.parallel.zero_stage)
    # With EP in fp32 the trainer clips (DeepSpeed would average per-rank norms of different
    # parameters); bf16 keeps DeepSpeed's wrapper clipping (see train/README.md).
    clip = 0.0 if sharded or (cfg.parallel.ep_size > 1 and not bf16) \
        else float(cfg.optim.grad_clip)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.data.micro_batch * grad_accum * info.world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": bf16 and not sharded},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
