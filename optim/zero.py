"""Which DeepSpeed ZeRO stages work with `MuonAdamW`, checked before the engine starts.

Supported: **stage 0 only.** DeepSpeed then leaves parameters whole; the engine all-reduces the
gradients and calls our `step` once per optimizer step (at the gradient-accumulation boundary),
so Newton-Schulz runs once per step on full, fully reduced matrices. With bf16 parameters at
stage 0 DeepSpeed wraps us in its unfused mixed-precision optimizer, which hands us fp32 master
copies of the same shapes: that works too. Muon's momentum is already split across data-parallel
ranks by whole matrices (our ZeRO-1-like sharding, `optim.distributed`).

Refused: stages 1, 2 and 3. Their optimizers flatten every parameter group into one buffer and
give the inner optimizer a 1-D slice per rank, cut at arbitrary element boundaries. Muon cannot
orthogonalise a slice, and DeepSpeed's own Muon hooks only recognise DeepSpeed's
`MuonWithAuxAdam` class, so our optimizer would get flat shards (verified by a test:
`MuonAdamW.step` then raises instead of silently degrading).
"""

from __future__ import annotations

from typing import Any, Mapping

SUPPORTED_ZERO_STAGES = (0,)


def check_zero_stage(stage: int) -> None:
    """Raises ValueError unless `stage` is a ZeRO stage `MuonAdamW` supports."""
    if int(stage) not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"ZeRO stage {stage} is not supported with v4lab's Muon optimizer: ZeRO stages 1-3 "
            f"flatten and partition parameters, but Muon must orthogonalise whole matrices. Use "
            f"zero_optimization.stage=0; Muon's momentum and Newton-Schulz work are already "
            f"sharded across data-parallel ranks by whole matrices (like ZeRO-1).")


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Validates the parts of a DeepSpeed config dict that matter to `MuonAdamW`."""
    zero = config.get("zero_optimization") or {}
    check_zero_stage(zero.get("stage", 0) if isinstance(zero, Mapping) else 0)
    if config.get("optimizer"):
        raise ValueError("the DeepSpeed config names an 'optimizer'; pass MuonAdamW to "
                         "deepspeed.initialize(optimizer=...) instead, and drop that section")
