"""Which ZeRO stages work with `MuonAdamW`, checked before the engine starts.

`parallel.zero_stage` names what is sharded, as in ZeRO; how is ours, since Muon needs whole
matrices:

- **0**: DeepSpeed stage 0. Parameters, gradients and (with bf16) DeepSpeed's fp32 master
  copies are replicated; the engine all-reduces the gradients and calls our `step` once per
  optimizer step, so Newton-Schulz runs once per step on full, fully reduced matrices. Muon's
  momentum is already split across data-parallel ranks by whole matrices (`optim.distributed`).
- **1** and **2**: whole-matrix ZeRO, ours (`MuonAdamW(zero_stage=...)`). DeepSpeed runs at stage
  0 with its gradient all-reduce and its bf16 master wrapper off. Each matrix has an owner rank,
  which alone keeps its fp32 master weight and optimizer state, receives its reduced fp32
  gradient, updates it and broadcasts the new (bf16) weight. Stage 2 reduces every
  micro-batch's gradient to the owner at once, so fp32 gradients exist only there; stage 1
  accumulates a full fp32 gradient on every rank and reduces once per step (less traffic under
  gradient accumulation, more memory). Per rank both leave the bf16 weights and one micro-batch's
  bf16 gradients replicated, and 1/dp of the fp32 state.

Refused: DeepSpeed's own stages 1-3, and stage 3 here. DeepSpeed's flatten every parameter
group into one buffer and give the inner optimizer 1-D slices cut at arbitrary element
boundaries. Muon cannot orthogonalise a slice, and DeepSpeed 0.19's Muon support under ZeRO 1/2
recognises only its own `MuonWithAuxAdam` (`stage_1_and_2.py`: a matrix cut by a partition
boundary is all-reduced to every rank holding a slice and updated there, repeating
Newton-Schulz on each), so our optimizer would get flat shards (`MuonAdamW.step` then raises
instead of silently degrading). DeepSpeed's stage 3 gathers flat partitions per module, with
the same slicing.
"""

from __future__ import annotations

from typing import Any, Mapping

SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


def check_zero_stage(stage: int) -> None:
    """Raises ValueError unless `stage` is a ZeRO stage `MuonAdamW` supports."""
    if int(stage) not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"ZeRO stage {stage} is not supported with v4lab's Muon optimizer: choose 0 "
            f"(replicated fp32 state), 1 (fp32 master weights and optimizer state sharded by "
            f"whole matrices), 2 (fp32 gradients sharded too) or 3 (the blocks' bf16 weights "
            f"too, gathered per block).")


def sharded_state(stage: int) -> bool:
    """Whether the optimizer keeps master weights and state on owners only (stages 1-3)."""
    check_zero_stage(stage)
    return int(stage) > 0


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Validates the parts of a DeepSpeed config dict that matter to `MuonAdamW`: the engine
    itself always runs at stage 0 (stage 2 is the optimizer's, not DeepSpeed's)."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if int(stage) != 0:
        raise ValueError(f"DeepSpeed zero_optimization.stage={stage}: run the engine at stage 0; "
                         f"v4lab's own whole-matrix sharding is parallel.zero_stage=1, 2 or 3")
    if config.get("optimizer"):
        raise ValueError("the DeepSpeed config names an 'optimizer'; pass MuonAdamW to "
                         "deepspeed.initialize(optimizer=...) instead, and drop that section")
