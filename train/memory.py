"""Peak memory of one section of a step (e.g. the distillation loss), on any device.

`memory_gib` in the step metrics is the whole process's peak; a loss that is meant to stay
within one chunk of `[tokens, vocab]` logits needs its own figure. `SectionPeak` measures the
peak of the bytes that tensors *created inside the section* hold at once, above what was live
when it began:

- CUDA: the caching allocator's own counter (`max_memory_allocated`), reset at entry. The reset
  would hide an earlier, higher peak from `memory_gib`, so the running peak before the reset is
  carried (`process_peak_bytes` returns the max of both) and no figure is lost.
- CPU (no allocator counter): a `TorchDispatchMode` sees every op's outputs; each new storage
  counts its bytes until the last tensor that holds it is freed (a weakref finaliser). Views of
  a storage already counted add nothing. This counts exactly the tensors the section's ops
  allocate (the allocator's rounding and fragmentation are not included), which is the figure
  that shows whether a chunked loss stays chunked.

Use it around code that runs once per section (it adds a Python call per op on CPU):

    with SectionPeak(device) as peak:
        loss = chunked_reverse_kl(...)
    peak.bytes  # peak above the bytes live at entry
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_carried_cuda_peak = 0.0  # the process's CUDA peak from before the last SectionPeak reset


def process_peak_bytes(device: torch.device) -> float:
    """The process's CUDA peak allocation, including peaks from before any SectionPeak reset."""
    return max(_carried_cuda_peak, float(torch.cuda.max_memory_allocated(device)))


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owners: dict[int, list] = {}  # storage pointer -> [bytes, live tensors]

    def _release(self, ptr: int) -> None:
        owner = self._owners.get(ptr)
        if owner is None:
            return
        owner[1] -= 1
        if owner[1] == 0:
            self.live -= owner[0]
            del self._owners[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            owner = self._owners.get(ptr)
            if owner is None:
                inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor) and a.device.type != "meta"}
                if ptr in inputs:  # a view or an in-place result of an older tensor
                    continue
                owner = self._owners[ptr] = [storage.nbytes(), 0]
                self.live += owner[0]
                self.peak = max(self.peak, self.live)
            owner[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


class SectionPeak:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes = 0.0
        self._mode: _LiveBytes | None = None
        self._base = 0.0

    def __enter__(self) -> "SectionPeak":
        global _carried_cuda_peak
        if self.device.type == "cuda":
            _carried_cuda_peak = process_peak_bytes(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
        else:
            self._mode = _LiveBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = float(torch.cuda.max_memory_allocated(self.device)) - self._base
        else:
            self._mode.__exit__(*exc)
            self.bytes = float(self._mode.peak)

    @property
    def gib(self) -> float:
        return self.bytes / 2**30


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor this process holds (found through the
    garbage collector): on CPU, where no allocator counts, what `memory_allocated` would say."""
    import gc
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on torch's deprecated module shims warns
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                    continue
                storage = obj.untyped_storage()
            except Exception:  # objects whose isinstance or storage access fails
                continue
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
