"""Runtime guards of the trainer: the failures that must stop a run loudly instead of letting
it limp on (weights that are not numbers), the context a failed checkpoint write needs (which
path, how much space is left), and end-of-run work that must never hide the error that ended
the run.
"""

from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

import torch

from .dist import any_rank


class NonFiniteError(RuntimeError):
    """The run cannot make progress: its weights, or its very first loss, are not finite."""


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters and buffers holding NaN or ±inf (router biases are
    buffers and steer every token, so they count). A ZeRO-3 block weight another rank owns has
    no storage here and is checked by its owner."""
    tensors = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point() and t.numel() and t.untyped_storage().nbytes()]
    if not tensors:
        return []
    # one flag per tensor, fetched at once: a single device sync, not one per tensor
    device = tensors[0][1].device
    finite = torch.stack([torch.isfinite(t.detach()).all().to(device) for _, t in tensors])
    finite = finite.cpu()
    return [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]


def check_finite_weights(model: torch.nn.Module, where: str, device: torch.device) -> None:
    """Stops every rank (collective: the ranks agree) when any rank's weights are non-finite.
    Training from such weights only skips every step, so it must not start."""
    bad = non_finite_tensors(model)
    if any_rank(bool(bad), device):
        names = (", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
                 if bad else "none on this rank (another rank's are)")
        raise NonFiniteError(f"non-finite weights (NaN/inf) {where}: {names}. Training cannot "
                             f"recover from them; resume from an earlier checkpoint "
                             f"(checkpoint.resume=<dir>) or start fresh (checkpoint.resume=none)")


def free_space(path: Path) -> str:
    """'X GiB free of Y GiB on the filesystem holding <path>' (the nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:  # the report must not fail in turn
        return f"free space on the filesystem holding {probe} unknown ({e})"
    return (f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB on the "
            f"filesystem holding {probe}")


def save_failure(path: Path, step: int, exc: BaseException) -> str:
    """The message for a checkpoint write that failed: torch reports a full disk as a bare
    `PytorchStreamWriter failed writing file` without the path or the cause."""
    return (f"checkpoint save of step {step} to {path} failed: {type(exc).__name__}: {exc}. "
            f"{free_space(path)}. The previous complete checkpoints are untouched; a partial "
            f"{path.name}.tmp is removed on the next start")


def finish(steps: Iterable[tuple[str, Callable[[], object]]],
           error: BaseException | None) -> None:
    """Runs end-of-run `steps` (closing loaders, loggers, plots). Each one runs even if an
    earlier one failed. With `error` propagating they are best-effort: a failure is reported on
    stderr and the caller re-raises `error`, the real cause. Without one, the first failure is
    raised once all have run."""
    first = None
    for what, fn in steps:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported or re-raised below
            if error is None:
                first = first or e
                continue
            try:
                print(f"while stopping on {type(error).__name__}: {error}\n{what} also failed "
                      f"({type(e).__name__}: {e}); the original error follows",
                      file=sys.stderr, flush=True)
                traceback.print_exception(e, file=sys.stderr)
            except Exception:  # noqa: BLE001 - stderr itself may be gone
                pass
    if first is not None:
        raise first
