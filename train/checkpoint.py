"""Atomic, resumable training checkpoints.

Layout of `run_dir/checkpoints/step_00000050/`:

    model/               consolidated weights: config.json + model.safetensors (+ tokenizer.json),
                         loadable without DeepSpeed (`model.weights.load_pretrained`); from
                         several ranks, each rank's model-rank{R}-{i}.safetensors and the index
                         (`train.weights_io`: every rank writes and reads only its share)
    optimizer_rank{r}.pt each rank's optimizer state (Muon momentum lives on its owner rank)
    trainer_rank{r}.pt   scheduler, data-loader state, RNG states, counters of rank r
    config.yaml          the resolved training config
    manifest.json        step, world size, ep_size and the size of every file, written last

Nothing is ever lost or half-visible:

- Every rank writes into `step_N.tmp/`; after a barrier rank 0 writes the manifest, fsyncs and
  renames it to `step_N`. A crash at any point leaves either the previous complete checkpoints
  or an ignored `.tmp` directory, never a checkpoint that looks complete.
- Deleting (keep-K pruning, re-saving a step) first renames `step_N` to `step_N.deleting`, so a
  kill mid-delete leaves an ignored name, never a half-deleted `step_N`. Start-up removes both
  kinds of leftovers (`clean_partial`).
- Pruning only ever removes checkpoints *older* than the one just written.
- Resuming from an older step (or starting fresh with `checkpoint.resume=none`) moves this run's
  later checkpoints aside into `checkpoints/abandoned_<time>/` (`set_aside_newer`): they belong
  to a branch of the run that is no longer followed, so `resume=auto` and pruning must not see
  them, but they are not deleted either.
- `resume=auto` takes the newest checkpoint that passes `checkpoint_problem` (files present with
  their manifest sizes, safetensors headers and data complete), warning about each one skipped.

Router biases and the hash tables are buffers, so they travel in the weights.

Expert parallelism: `model/` always holds full `[n_routed_experts, ...]` expert stacks (each
gathered from the expert-parallel ranks onto the one rank that writes it), so its layout does
not depend on `parallel.ep_size`; loading reads each rank's experts for the ep_size it runs with
(`load_weights`, a slice of each stack), e.g. a run saved at EP=2 serves at EP=1 or EP=4. Optimizer shards are per rank;
resuming with the saved layout loads each rank's own file (bitwise), and resuming at another
world size, `parallel.ep_size` or `parallel.zero_stage` reshards them (`train.reshard`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from model.weights import save_pretrained, tensor_files

from . import expert_parallel as ep
from .dist import DistInfo, barrier
from .weights_io import read_headers, read_into, save_weights

_STEP_DIR = re.compile(r"step_(\d+)$")
MANIFEST = "manifest.json"
_DELETING = ".deleting"
_SHOWN_MISMATCHES = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and what to do."""


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


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints with a complete-looking name (`step_N`, not `.tmp`/`.deleting`), oldest
    first; whether their files are complete is `checkpoint_problem`'s business."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------- completeness
def _read_header(file: Path) -> tuple[dict[str, Any], str | None]:
    """(safetensors header, None) or ({}, why the file is unusable). Reads only the header, so
    a truncated or garbled file is reported (naming it) without loading any tensor."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return {}, f"{file}: truncated ({size} bytes, the header is incomplete)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return {}, f"{file}: unreadable safetensors header ({e})"
    if 8 + n + end > size:
        return {}, f"{file}: truncated ({size} of {8 + n + end} bytes)"
    header.pop("__metadata__", None)
    return header, None


def _safetensors_problem(file: Path) -> str | None:
    return _read_header(file)[1]


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / MANIFEST
    if not file.is_file():
        return None  # written before manifests existed: checked file by file
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed (naming the file), or None when it looks complete."""
    if not path.is_dir():
        return f"{path}: not a directory"
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    if manifest is not None:
        for rel, size in manifest.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                return f"{f}: missing (listed in {MANIFEST}); the checkpoint is incomplete"
            if f.stat().st_size != size:
                return (f"{f}: truncated or damaged ({f.stat().st_size} bytes, {MANIFEST} "
                        f"records {size})")
    if not (path / "trainer_rank0.pt").is_file():
        return f"{path / 'trainer_rank0.pt'}: missing; the checkpoint is incomplete"
    weights = sorted((path / "model").glob("*.safetensors"))
    if not weights:
        return f"{path / 'model'}: no *.safetensors weights; the checkpoint is incomplete"
    for f in weights:
        if problem := _safetensors_problem(f):
            return problem
    return None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike,
                   warn: Callable[[str], None] | None = None) -> Path | None:
    """`auto` → the newest usable checkpoint of this run (skipping, with a warning, any that is
    incomplete or unreadable) or None when there is none; `none` → None; else that path, which
    must be usable."""
    if resume in ("none", "", None):
        return None
    if resume != "auto":
        path = Path(resume)
        if problem := checkpoint_problem(path):
            raise CheckpointError(f"checkpoint.resume={resume}: {problem}")
        return path
    found = list_checkpoints(run_dir)
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        skipped.append(problem)
        if warn is not None:
            warn(f"checkpoint.resume=auto: skipping {path.name}: {problem}")
    if skipped:
        raise CheckpointError(
            f"checkpoint.resume=auto: no usable checkpoint under {checkpoint_root(run_dir)}:\n  "
            + "\n  ".join(skipped) + "\nResume from a good copy with checkpoint.resume=PATH, or "
            "start fresh with checkpoint.resume=none (these are then moved aside, not deleted)")
    return None


# ---------------------------------------------------------------------- layout
def saved_layout(path: Path) -> tuple[int | None, int, int]:
    """(world size, ep_size, zero_stage) the checkpoint was written with."""
    manifest = read_manifest(path)
    if manifest is not None and "world" in manifest:
        return manifest["world"], manifest.get("ep_size", 1), manifest.get("zero_stage", 0)
    state = _load_pt(path / "trainer_rank0.pt", "cpu")
    return state.get("world"), state.get("ep_size", 1), state.get("zero_stage", 0)


def check_layout(path: Path, world: int, ep_size: int, reshardable: bool = True) -> None:
    """With `reshardable` (v4lab's optimizer: `train.reshard`) any layout resumes. Otherwise
    raises, naming the overrides that start fresh, if `path` was written by another world size
    or ep_size."""
    saved_world, saved_ep, _ = saved_layout(path)
    diffs = []
    if saved_world != world:
        diffs.append(f"written with world size {saved_world}, resuming with {world}")
    if saved_ep != ep_size:
        diffs.append(f"written with parallel.ep_size={saved_ep}, resuming with {ep_size}")
    if diffs and not reshardable:
        raise CheckpointError(
            f"{path}: {'; '.join(diffs)}. This optimizer's per-rank state cannot be "
            f"resharded (v4lab's MuonAdamW can), so training resumes only with the saved layout (world size "
            f"{saved_world}, parallel.ep_size={saved_ep}). To start a new run instead, pass "
            f"checkpoint.resume=none (the run directory's checkpoints are then moved aside into "
            f"checkpoints/abandoned_<time>/, not deleted) or a new run_name=... / run_dir=... .")


def check_resume(resume: str | None, run_dir: str | os.PathLike, world: int, ep_size: int,
                 model_cfg: Any = None) -> Path | None:
    """The start-up check (no side effects): the checkpoint to resume is usable, has this
    launch's layout and (given `model_cfg`) this model's tensor shapes. Cheap (file sizes,
    safetensors headers, one small pickle, a model on the meta device), so it runs before any
    data or model work."""
    path = resolve_resume(resume, run_dir)
    if path is None:
        return None
    check_layout(path, world, ep_size)
    if model_cfg is not None:
        from model.transformer import Transformer

        with torch.device("meta"):
            expected = {k: t.shape for k, t in Transformer(model_cfg).state_dict().items()}
        shapes = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            shapes.update({k: v["shape"] for k, v in _read_header(f)[0].items()})
        if problem := _fit_problems(path / "model", shapes, expected, model_cfg):
            raise CheckpointError(problem)
    return path


def start_point(resume: str | None, run_dir: str | os.PathLike, info: DistInfo) -> Path | None:
    """Cleans leftovers of crashes, resolves the checkpoint to resume (warning about skipped
    ones) and moves this run's later checkpoints aside; every rank returns the same path."""
    clean_partial(run_dir, info)
    path = resolve_resume(resume, run_dir, warn=_warner(info))
    barrier()  # every rank has resolved before rank 0 moves anything
    if info.is_main:
        set_aside_newer(run_dir, path, log=_warner(info))
    barrier()
    return path


def _warner(info: DistInfo) -> Callable[[str], None]:
    def warn(message: str) -> None:
        if info.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)
    return warn


def _step_at(path: Path) -> int:
    manifest = read_manifest(path)
    if manifest is not None and "step" in manifest:
        return int(manifest["step"])
    if _STEP_DIR.match(path.name):
        return step_of(path)
    return int(_load_pt(path / "trainer_rank0.pt", "cpu").get("step", 0))


def set_aside_newer(run_dir: str | os.PathLike, start: Path | None,
                    log: Callable[[str], None] = print) -> Path | None:
    """Moves the checkpoints this run would branch away from (a later step than `start`, or the
    same step from another directory; all of them when starting fresh) into
    `checkpoints/abandoned_<time>/`, so pruning and `resume=auto` follow the new branch and
    nothing is silently deleted. Returns that directory, or None when nothing moved."""
    start_step = _step_at(start) if start is not None else 0
    start_real = start.resolve() if start is not None else None
    later = [p for p in list_checkpoints(run_dir)
             if step_of(p) > start_step or (step_of(p) == start_step and p.resolve() != start_real)]
    if not later:
        return None
    root = checkpoint_root(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = root / f"abandoned_{stamp}", 1
    while target.exists():
        n += 1
        target = root / f"abandoned_{stamp}_{n}"
    target.mkdir()
    why = (f"resuming from {start} (step {start_step})" if start is not None
           else "starting fresh (checkpoint.resume=none)")
    (target / "REASON.txt").write_text(
        f"Moved here at {stamp} by a run {why}: these checkpoints belong to the branch it no "
        f"longer follows. Nothing reads this directory; delete it when not needed.\n")
    for p in later:
        os.rename(p, target / p.name)
    log(f"checkpoint: {why}; moved {len(later)} later checkpoint(s) "
        f"({', '.join(p.name for p in later)}) aside to {target}")
    return target


# ---------------------------------------------------------------------- saving
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def remove_checkpoint(path: Path) -> None:
    """Renames to `step_N.deleting` first: a kill mid-delete never leaves a half-deleted
    directory under a complete-looking name (the leftover is removed at the next start)."""
    trash = path.with_name(path.name + _DELETING)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(run_dir: str | os.PathLike, just_written: Path, keep: int) -> None:
    """Keeps `just_written` and the `keep - 1` newest *older* checkpoints (keep=0: all).
    Checkpoints with a later step are never touched: pruning must not delete this run's own
    new checkpoints in favour of an abandoned branch's (those are set aside at resume)."""
    if keep <= 0:
        return
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < step_of(just_written)]
    for old in older[:max(0, len(older) - (keep - 1))]:
        remove_checkpoint(old)


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
    stage = getattr(optimizer, "zero_stage", 0)
    torch.save({**trainer_state, "rng": rng_state(), "world": info.world, "ep_size": ep_size,
                "zero_stage": stage}, tmp / f"trainer_rank{info.rank}.pt")
    for name in (f"optimizer_rank{info.rank}.pt", f"trainer_rank{info.rank}.pt"):
        _fsync(tmp / name)
    if info.world > 1 and torch.distributed.is_initialized():  # each rank writes its share
        if info.is_main:
            (tmp / "model").mkdir()
        barrier()
        save_weights(model, tmp / "model", info, ep_groups, tokenizer_file)
    elif info.is_main:
        save_pretrained(model, tmp / "model", tokenizer_file=tokenizer_file)
    if info.is_main:
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()
    if info.is_main:
        files = {str(p.relative_to(tmp)): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(
            {"step": step, "world": info.world, "ep_size": ep_size, "zero_stage": stage,
             "files": files}, indent=1))
        _fsync_tree(tmp)
        trash = final.with_name(final.name + _DELETING)
        if final.exists():  # re-saving the same step (e.g. a signal right after a save)
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(final, trash)  # the new copy is in place before the old one is deleted
        os.replace(tmp, final)
        _fsync(root)
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        prune(run_dir, final, keep)
    barrier()
    return final


# ---------------------------------------------------------------------- loading
def _load_pt(file: Path, map_location: Any) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete (resume from "
                              f"another one with checkpoint.resume=PATH)")
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e}); the checkpoint is "
                              f"damaged (resume from another one with checkpoint.resume=PATH)"
                              ) from None


def load_checkpoint(path: Path, info: DistInfo, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores weights, this rank's optimizer state and RNG; returns the trainer state. At
    another world size, ep_size or zero_stage (v4lab's optimizer only) the optimizer state is
    resharded from every rank's file (`train.reshard`)."""
    from optim import MuonAdamW

    from . import reshard

    ep_rank, ep_size = getattr(model, "expert_parallel", (0, 1))
    reshardable = isinstance(optimizer, MuonAdamW)
    check_layout(path, info.world, ep_size, reshardable)  # before any rank's own file: a
    # missing trainer_rank1.pt is a world-size change only if the checkpoint says so
    saved = saved_layout(path)
    change = reshard.describe(saved, (info.world, ep_size, getattr(optimizer, "zero_stage", 0)))
    if not change:
        trainer_state = _load_pt(path / f"trainer_rank{info.rank}.pt", "cpu")
        load_weights(path / "model", model, info.device)
        optimizer.load_state_dict(_load_pt(path / f"optimizer_rank{info.rank}.pt", info.device))
        set_rng_state(trainer_state["rng"])
        return trainer_state
    saved_world, saved_ep, _ = saved
    for r in range(saved_world):  # every file is read: name a missing one before any work
        if not (path / f"optimizer_rank{r}.pt").is_file():
            raise CheckpointError(f"{path / f'optimizer_rank{r}.pt'}: missing; the checkpoint is "
                                  f"incomplete (resume from another one with "
                                  f"checkpoint.resume=PATH)")
    if info.is_main:
        print(f"resharding {path}: {change}", flush=True)
    trainer_state = _load_pt(path / f"trainer_rank{info.rank % saved_world}.pt", "cpu")
    load_weights(path / "model", model, info.device)
    optimizer.load_state_dict(reshard.resharded_state_dict(optimizer, path, saved_world,
                                                           saved_ep, ep_rank, ep_size))
    set_rng_state(trainer_state["rng"])
    reshard.reseed(info.rank, trainer_state["step"])
    return trainer_state


def _config_diff(model_dir: Path, model_cfg: Any) -> list[str]:
    """Model config fields that differ between the checkpoint's config.json and this run."""
    try:
        saved = json.loads((model_dir / "config.json").read_text()).get("v4lab") or {}
    except (OSError, ValueError):
        return []
    ours = model_cfg.to_dict() if model_cfg is not None else {}
    return [f"{k}: checkpoint {saved[k]!r} vs this run {v!r}" for k, v in ours.items()
            if k in saved and saved[k] != v and k != "seed"]


_RESUME_WAY_OUT = ("To train this model from scratch, pass checkpoint.resume=none or a new "
                   "run_name=... / run_dir=... .")


def _fit_problems(model_dir: Path, shapes: dict[str, Any], expected: dict[str, Any],
                  model_cfg: Any = None, way_out: str = _RESUME_WAY_OUT) -> str | None:
    """One message for tensors whose shape differs and for missing/unexpected names, with the
    model config fields that explain it and `way_out` (what the user can do instead)."""
    mismatched = [(k, tuple(shapes[k]), tuple(s)) for k, s in expected.items()
                  if k in shapes and tuple(shapes[k]) != tuple(s)]
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if not (mismatched or missing or unexpected):
        return None
    lines = [f"{model_dir}: the checkpoint does not fit this model"]
    if mismatched:
        lines.append(f"{len(mismatched)} tensor(s) differ in shape, e.g.")
        lines += [f"  {k}: checkpoint {list(a)} vs model {list(b)}"
                  for k, a, b in mismatched[:_SHOWN_MISMATCHES]]
    if missing:
        lines.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. "
                     f"{missing[:_SHOWN_MISMATCHES]}")
    if unexpected:
        lines.append(f"{len(unexpected)} tensor(s) not in the model, e.g. "
                     f"{unexpected[:_SHOWN_MISMATCHES]}")
    diff = _config_diff(model_dir, model_cfg)
    if diff:
        lines.append("model config differences: " + "; ".join(diff[:_SHOWN_MISMATCHES]))
    lines.append(f"It was written for another model config (compare {model_dir / 'config.json'} "
                 f"with this run's model.preset / model.overrides). {way_out}")
    return "\n".join(lines)


def load_weights(model_dir: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    """Loads consolidated weights into `model`, each tensor alone and only what this rank holds
    (`weights_io.read_into`: its experts' slice of each stack when `model.expert_parallel` =
    (ep_rank, ep_size), any ep_size dividing E; nothing of a zero_stage=3 block weight another
    rank owns). Shapes are compared first, from the headers, on the full stacks, so a checkpoint
    of another model gives one message naming the directory and the first few tensors."""
    model_dir = Path(model_dir)
    try:
        files, _ = tensor_files(model_dir)
    except FileNotFoundError as e:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights ({e})") from None
    for file in files:
        if problem := _safetensors_problem(file):
            raise CheckpointError(problem)
    headers = read_headers(files)
    _, ep_size = getattr(model, "expert_parallel", (0, 1))
    expected = {k: (t.shape[0] * ep_size, *t.shape[1:])
                if ep_size > 1 and ep.is_expert_param(k) else t.shape
                for k, t in model.state_dict().items()}
    shapes = {k: shape for k, (_, shape) in headers.items()}
    if problem := _fit_problems(model_dir, shapes, expected, getattr(model, "cfg", None)):
        raise CheckpointError(problem)
    try:
        read_into(model, headers)
    except Exception as e:  # noqa: BLE001 - safetensors' own errors name no file
        raise CheckpointError(f"{model_dir}: unreadable weights ({type(e).__name__}: {e})"
                              ) from None


def clean_partial(run_dir: str | os.PathLike, info: DistInfo) -> None:
    """Removes `.tmp` directories left by a crash mid-save and `.deleting` ones left by a kill
    mid-prune."""
    if info.is_main:
        root = checkpoint_root(run_dir)
        for pattern in ("step_*.tmp", f"step_*{_DELETING}"):
            for p in root.glob(pattern) if root.is_dir() else []:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
