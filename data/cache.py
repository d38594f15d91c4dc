"""Where data artefacts live, how their cache keys are made, and how they are written atomically.

Every artefact (the default corpus, a trained tokenizer, a token shard directory) is written under
a temporary name and renamed into place only when complete. A reader therefore sees either nothing
or a finished artefact: an interrupted run (Ctrl-C, OOM kill, a malformed record found late) can
never leave a cache that a later run would read as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

CACHE_ENV = "V4LAB_CACHE"


def default_cache_dir() -> Path:
    """`$V4LAB_CACHE` if set, else `~/.cache/v4lab`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "v4lab"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, n_hex: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object (sorted keys): stable across processes
    and machines, unlike Python's `hash`."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n_hex]


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a local file for cache keys: resolved path, size and mtime. Rewriting a file
    changes its mtime, so a stale cache is never reused for edited data."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `final`; on normal exit it is renamed to `final`
    in one step, on any exception it is deleted. If another process finished the same artefact
    first (the rename finds `final` already there), ours is discarded and theirs is kept: both were
    built from the same inputs, since the cache key names the inputs."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def rank0_first(build: Callable[[], T]) -> T:
    """Runs `build` on global rank 0 first, then on the other ranks, which then find its
    artefacts in the cache instead of all tokenising the same corpus. Without an initialised
    process group it simply runs. If rank 0 fails the others still get past the barrier and fail
    on their own, so nothing hangs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    if dist.get_rank() == 0:
        try:
            return build()
        finally:
            dist.barrier()
    dist.barrier()
    return build()
