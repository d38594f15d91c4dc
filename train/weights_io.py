"""Checkpoint weights at cluster scale: every rank writes and reads only its share, and the
files are still the consolidated format every reader takes (`model/weights.py`: config.json,
`*.safetensors` whose tensors together are the full model with whole expert stacks, and
`model.safetensors.index.json`), so generate.py, `init_from`, frozen models and the export read
a multi-rank checkpoint as they read any other.

Why not gather on rank 0: a consolidated file built on one rank needs the whole model there
(1.6T parameters at pro, 284B at flash: terabytes), and loading it back by reading every file on
every rank needs the same on each rank.

**Writing** (`save_weights`, a collective). Every tensor of the full state dict gets one writer
rank, and each piece of it one holder, a rank that has the piece in memory:
- a tensor every rank holds: the writer is chosen by size, spreading bytes evenly (the holder
  is the writer itself);
- a block weight at `zero_stage=3` (`optim.weight_sharding`): its owner, which holds it;
- a routed-expert stack under expert parallelism: EP rank j's slice is held by the rank with
  `rank % ep == j` in the first expert-parallel group (ranks 0..ep-1), or at stage 3 by that
  slice's owner in its expert-data-parallel group; the writer is one of the holders, in turn.
A piece the writer does not hold comes by point-to-point `send`/`recv`, one tensor at a time in
the same order on every rank (a sequence of pairwise transfers cannot deadlock). A writer
buffers at most `max_shard_bytes` before writing `model-rank{R}-{i}.safetensors`; rank 0
writes the index (every writer's names, all-gathered), config.json and the tokenizer. Peak
extra memory per rank: one file's worth plus one full tensor.

**Reading** (`load_weights`). Headers first (names and shapes, checked against the model
before any data is read), then each tensor this rank holds, alone: its full value, or only its
EP slice (`safe_open(...).get_slice`), copied in place. A stage-3 block weight this rank does
not own (no storage) is not read at all; its owner reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from model.weights import DEFAULT_SHARD_BYTES, INDEX_FILE, write_config
from optim.distributed import assign_owners

from . import expert_parallel as ep
from .dist import DistInfo


def _holders(model, ep_groups) -> dict[str, list[int]]:
    """Full state-dict name -> the global rank holding each piece (one piece, or one per EP
    rank for a sharded expert stack), the same on every rank."""
    sharding = getattr(model, "_weight_sharding", None)
    owner_of: dict[int, int] = {}   # id(param) -> owner's global rank (stage-3 block weights)
    if sharding is not None:
        for unit in sharding.units:
            for s in unit.params:
                g = s.group
                owner_of[id(s.param)] = (s.owner if g in (None, dist.group.WORLD)
                                         else dist.get_global_rank(g, s.owner))
    params = dict(model.named_parameters())
    size = ep_groups.ep_size if ep_groups is not None else 1
    out: dict[str, list[int]] = {}
    for name in model.state_dict():
        p = params.get(name)
        expert = size > 1 and ep.is_expert_param(name)
        if not expert:
            out[name] = [owner_of.get(id(p), -1) if p is not None else -1]  # -1: everyone
        elif p is not None and id(p) in owner_of:  # owner in the edp group {r: r % size == j}
            mine = owner_of[id(p)]
            out[name] = [j + (mine - ep_groups.ep_rank) for j in range(size)]
        else:
            out[name] = list(range(size))
    return out


def _writers(model, holders: dict[str, list[int]], world: int) -> dict[str, int]:
    """Name -> writer rank: the holder when one rank holds the tensor, a holder in turn for
    expert stacks, and for tensors every rank holds a rank chosen to even out the bytes."""
    state = model.state_dict()
    writers: dict[str, int] = {}
    shared = [n for n, h in holders.items() if h == [-1]]
    nbytes = [state[n].numel() * state[n].element_size() for n in shared]
    writers.update(zip(shared, assign_owners(nbytes, world)))
    turn = 0
    for name, h in holders.items():
        if h == [-1]:
            continue
        if len(h) == 1:
            writers[name] = h[0]
        else:
            writers[name] = h[turn % len(h)]
            turn += 1
    return writers


@torch.no_grad()
def save_weights(model, directory: Path, info: DistInfo, ep_groups=None,
                 tokenizer_file: str | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Writes the full model into `directory` (which must exist), each rank its share (module
    doc). A collective: every rank calls it."""
    me, world = info.rank, info.world
    holders = _holders(model, ep_groups)
    writers = _writers(model, holders, world)
    state = model.state_dict()
    buffer: dict[str, torch.Tensor] = {}
    written: dict[str, str] = {}
    files = buffered = 0

    def flush() -> None:
        nonlocal files, buffered
        from safetensors.torch import save_file

        if not buffer:
            return
        file = f"model-rank{me:05d}-{files:04d}.safetensors"
        save_file(buffer, str(directory / file), metadata={"format": "pt"})
        written.update({k: file for k in buffer})
        buffer.clear()
        files, buffered = files + 1, 0

    for name, local in state.items():
        parts = _gather_to_writer(local, me, writers[name], holders[name])
        if me != writers[name]:
            continue
        buffer[name] = (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()
        buffered += buffer[name].numel() * buffer[name].element_size()
        if buffered >= max_shard_bytes:
            flush()
    flush()
    maps: list[dict[str, str]] = [{} for _ in range(world)]
    if world > 1:
        dist.all_gather_object(maps, written)
    else:
        maps = [written]
    if info.is_main:
        weight_map = {k: v for m in maps for k, v in m.items()}
        total = sum(_full_bytes(state[k], holders[k]) for k in weight_map)
        with open(directory / INDEX_FILE, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config = model.cfg.to_hf_dict()
        config["v4lab"] = model.cfg.to_dict()
        config["v4lab"]["csa_mode"] = model.csa_mode
        write_config(directory, config)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, directory / "tokenizer.json")


def _gather_to_writer(local: torch.Tensor, me: int, writer: int,
                      pieces: list[int]) -> list[torch.Tensor]:
    """The writer receives every holder's piece of one tensor (in holder order; [-1]: the
    writer's own copy), the holders send theirs; on the writer, the pieces on CPU."""
    parts = []
    for holder in ([writer] if pieces == [-1] else pieces):
        if me == writer:
            if holder == me:
                parts.append(local.detach().cpu().clone())
            else:
                buf = torch.empty_like(local, device=local.device)
                dist.recv(buf, src=holder)
                parts.append(buf.cpu())
        elif me == holder:
            dist.send(local.detach().contiguous(), dst=writer)
    return parts


def _full_bytes(local: torch.Tensor, pieces: list[int]) -> int:
    return local.numel() * local.element_size() * max(len(pieces), 1)


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name -> (file, shape) from the safetensors headers of `files` alone (no tensor data is
    read; `model.weights.tensor_files` lists a directory's)."""
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                out[name] = (file, tuple(f.get_slice(name).get_shape()))
    return out


@torch.no_grad()
def read_into(model, headers: dict[str, tuple[Path, tuple[int, ...]]]) -> None:
    """Copies each tensor this rank holds from its file, in place (module doc): the EP slice of
    an expert stack, nothing for a stage-3 block weight held elsewhere."""
    from safetensors import safe_open

    ep_rank, ep_size = getattr(model, "expert_parallel", (0, 1))
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, t in model.state_dict().items():
        if t.numel() and t.untyped_storage().nbytes() == 0:
            continue  # a stage-3 weight this rank does not own: its owner reads it
        by_file.setdefault(headers[name][0], []).append((name, t))
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, t in entries:
                if ep_size > 1 and ep.is_expert_param(name):
                    n = t.shape[0]
                    value = f.get_slice(name)[ep_rank * n:(ep_rank + 1) * n]
                else:
                    value = f.get_tensor(name)
                t.copy_(value)
