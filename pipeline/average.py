"""The weight average of the domain experts: the element-wise mean of their weights, one model
with no training. It is the distillation's cheapest baseline (model merging): experts
fine-tuned from one base often stay close enough in weight space for their mean to keep some
of each skill, and the report shows how much."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def weight_average(checkpoints: Sequence[str | Path], out: str | Path) -> Path:
    """The mean of `checkpoints` (same architecture), saved at `out` as a checkpoint of ours
    (atomically; a finished `out` is returned as is). Each tensor is averaged in fp32 and
    stored in its own dtype."""
    import torch

    from model.weights import save_pretrained
    from train.init import load_frozen_model

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    if len(checkpoints) < 2:
        raise ValueError(f"weight_average: {len(checkpoints)} checkpoint(s); average two or more")
    loaded = [load_frozen_model(c, "cpu", torch.float32, what="expert") for c in checkpoints]
    states = [f.model.state_dict() for f in loaded]
    extra = set().union(*states) - set(states[0])
    for name in [*states[0], *sorted(extra)]:
        shapes = {tuple(s[name].shape) for s in states if name in s}
        if len(shapes) != 1 or any(name not in s for s in states):
            raise ValueError(f"weight_average: tensor {name} differs across {list(checkpoints)} "
                             f"(shapes {sorted(shapes)}): not one architecture")
    mean = {name: torch.stack([s[name].float() for s in states]).mean(0).to(states[0][name].dtype)
            for name in states[0]}
    first = loaded[0]
    save_pretrained(first.model, out, first.tokenizer_file, state_dict=mean)
    return out
