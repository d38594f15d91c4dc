"""Writes a model as the released reference-inference code stores it: `model{r}-mp{world}
.safetensors` shards (per-expert tensors split by expert over ranks, tensors of
`naming.MP_SPLIT_DIM` chunked along their split dimension, the rest replicated) next to a
config.json in reference naming. Shared by the weight-loading and `init_from` tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from model import naming


def write_reference_shards(model, path: Path, world: int = 2,
                           skip: Callable[[str], bool] = lambda name: False) -> None:
    cfg = model.cfg
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {k: v for k, v in cfg.to_dict().items() if k != "quantization"}))
    per_expert = cfg.n_routed_experts // world
    for rank in range(world):
        shard = {}
        for name, t in naming.split_experts(model.state_dict()).items():
            if skip(name):
                continue
            hit = naming.per_expert(name)
            dim = naming.MP_SPLIT_DIM.get(naming.mp_split_key(name))
            if hit:
                if rank * per_expert <= hit[1] < (rank + 1) * per_expert:
                    shard[name] = t
            elif dim is not None:
                shard[name] = t.chunk(world, dim)[rank].contiguous()
            else:
                shard[name] = t
        save_file(shard, str(path / f"model{rank}-mp{world}.safetensors"))
