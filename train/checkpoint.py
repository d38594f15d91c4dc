"""Atomic, resumable training checkpoints.

Layout of `run_dir/checkpoints/step_00000050/`:

    model/               consolidated weights: config.json + model.safetensors (+ tokenizer.json),
                         loadable without DeepSpeed (`model.weights.load_pretrained`)
    optimizer_rank{r}.pt each rank's optimizer state (Muon momentum lives on its owner rank)
    trainer_rank{r}.pt   scheduler, data-loader state, RNG states, counters of rank r
    config.yaml          the resolved training config

Every rank writes into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N`. A crash at
any point leaves either the previous complete checkpoints or an ignored `.tmp` directory, never
a checkpoint that looks complete. Router biases and the hash tables are buffers, so they travel
in the weights.

Expert parallelism: `model/` always holds full `[n_routed_experts, ...]` expert stacks (gathered
over the expert-parallel group before rank 0 writes), so its layout does not depend on
`parallel.ep_size`; loading slices each rank's experts for the ep_size it runs with
(`load_weights`), e.g. a run saved at EP=2 serves at EP=1 or EP=4. Optimizer shards are per rank
and are *not* resharded: resuming training needs the same world size and ep_size (checked, with
a message), while the weights alone load at any ep_size.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.weights import save_pretrained

from . import expert_parallel as ep
from .dist import DistInfo, barrier

_STEP_DIR = re.compile(r"step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """`auto` → the latest complete checkpoint of this run (or None); `none` → None; else a path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_rank0.pt").is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: not a complete checkpoint "
                                f"directory (no trainer_rank0.pt)")
    return path


def save_checkpoint(run_dir: str | os.PathLike, step: int, info: DistInfo, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    config_yaml: str, tokenizer_file: str | None, keep: int,
                    ep_groups: ep.EPGroups | None = None) -> Path:
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    # each rank writes its own share (Muon momentum of the matrices it owns, AdamW state)
    shard = getattr(optimizer, "sharded_state_dict", optimizer.state_dict)()
    torch.save(shard, tmp / f"optimizer_rank{info.rank}.pt")
    ep_size = ep_groups.ep_size if ep_groups is not None else 1
    torch.save({**trainer_state, "rng": rng_state(), "world": info.world, "ep_size": ep_size},
               tmp / f"trainer_rank{info.rank}.pt")
    full = ep.full_state_dict(model, ep_groups) if ep_size > 1 else None  # collective
    if info.is_main:
        save_pretrained(model, tmp / "model", tokenizer_file=tokenizer_file, state_dict=full)
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()
    if info.is_main:
        if final.exists():  # re-saving the same step (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, info: DistInfo, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores weights, this rank's optimizer state and RNG; returns the trainer state."""
    state_file = path / f"trainer_rank{info.rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: missing; the checkpoint was written by a run "
                                f"with another world size")
    trainer_state = torch.load(state_file, map_location="cpu", weights_only=False)
    if trainer_state.get("world") != info.world:
        raise ValueError(f"{path}: written with world size {trainer_state.get('world')}, "
                         f"resuming with {info.world}; optimizer state is sharded per rank")
    saved_ep = trainer_state.get("ep_size", 1)
    ep_size = getattr(model, "expert_parallel", (0, 1))[1]
    if saved_ep != ep_size:
        raise ValueError(f"{path}: written with parallel.ep_size={saved_ep}, resuming with "
                         f"{ep_size}; optimizer state is not resharded across ep_size. The "
                         f"weights alone load at any ep_size (train.checkpoint.load_weights)")
    load_weights(path / "model", model, info.device)
    optimizer.load_state_dict(torch.load(path / f"optimizer_rank{info.rank}.pt",
                                         map_location=info.device, weights_only=False))
    set_rng_state(trainer_state["rng"])
    return trainer_state


def load_weights(model_dir: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    """Loads consolidated weights into `model`, slicing the expert stacks to the experts this
    rank holds (`model.expert_parallel` = (ep_rank, ep_size); any ep_size dividing E)."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(f, device=str(device)))
    ep_rank, ep_size = getattr(model, "expert_parallel", (0, 1))
    if ep_size > 1:
        weights = ep.local_state_dict(weights, ep_rank, ep_size)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: missing tensors {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")


def clean_partial(run_dir: str | os.PathLike, info: DistInfo) -> None:
    """Removes `.tmp` directories left by a crash mid-save."""
    if info.is_main:
        root = checkpoint_root(run_dir)
        for p in root.glob("step_*.tmp") if root.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
