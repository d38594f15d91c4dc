"""The routed experts' grouped SwiGLU GEMMs (`model.moe.Experts` picks one): a padded
batched-matmul path for any device, `torch._grouped_mm` for CUDA bf16 training and for CPU
inference (where it runs as an opaque op under `torch.compile`), and V4's clamped SwiGLU."""

from __future__ import annotations

import torch
from torch import Tensor

import v4kernels

# Each expert's row group is padded to this many rows on the `_grouped_mm` path: the CUDA kernel
# (and its backward, whose weight gradient contracts over these rows) wants 16-byte aligned group
# starts; 16 rows is enough for every dtype >= 1 byte.
GROUPED_MM_ALIGN = 16


def swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """V4's clamped SwiGLU in fp32 (spec §5.3): the clamp bounds activation outliers so the
    FP8/FP4 quantisation of h stays accurate; the gate is clamped from above only because
    silu is already bounded below. `limit <= 0` disables the clamp (as the reference does)."""
    return v4kernels.swiglu(gate, up, limit)  # Triton on GPU, else the fp32 reference


def experts_padded(x: Tensor, counts: Tensor, weights: Tensor | None, w1: Tensor, w3: Tensor,
                   w2: Tensor, limit: float) -> Tensor:
    """Loop-free grouped SwiGLU for any device: scatter the expert-sorted rows into
    [E, capacity, dim] (capacity = largest group), three `bmm`s, gather the rows back.

    Works with autograd everywhere, at the price of compute/memory on padding rows (E*capacity
    rows instead of N) and one host sync to read the capacity. That is fine for CPU tests and
    fallbacks; the CUDA bf16 path is `experts_grouped_mm`.
    x [N, dim] sorted by expert, counts [E] (sum N), weights [N] | None -> [N, dim] (x dtype).
    """
    n, dim = x.shape
    n_exp = w1.shape[0]
    if n == 0:
        return x.new_zeros(0, dim)
    device = x.device
    eid = torch.repeat_interleave(torch.arange(n_exp, device=device), counts,
                                  output_size=n)                          # [N] expert per row
    starts = counts.cumsum(0) - counts                                    # [E]
    pos = torch.arange(n, device=device) - starts[eid]                    # [N] row within group
    # the largest group, read on the host; while compiling, the static bound (every row in
    # one expert: a row picks distinct experts) so the graph has no host synchronisation
    capacity = n if torch.compiler.is_compiling() else int(counts.max())
    xp = x.new_zeros(n_exp, capacity, dim).index_put((eid, pos), x)       # [E, C, dim]
    gate = torch.bmm(xp, w1.transpose(1, 2))                              # [E, C, inter]
    up = torch.bmm(xp, w3.transpose(1, 2))                                # [E, C, inter]
    h = swiglu(gate, up, limit)                                           # [E, C, inter] fp32
    if weights is not None:
        wp = weights.new_zeros(n_exp, capacity, dtype=torch.float32).index_put(
            (eid, pos), weights.float())                                  # [E, C]
        h = h * wp[..., None]
    out = torch.bmm(h.to(x.dtype), w2.transpose(1, 2))                    # [E, C, dim]
    return out[eid, pos]                                                  # [N, dim]


def experts_grouped_mm(x: Tensor, counts: Tensor, weights: Tensor | None, w1: Tensor,
                       w3: Tensor, w2: Tensor, limit: float,
                       align: int = GROUPED_MM_ALIGN, mm=None) -> Tensor:
    """Grouped SwiGLU with `torch._grouped_mm` (one kernel per projection over all experts).

    `Experts` picks it for training only on CUDA bf16 (see `grouped_mm_usable`): it needs
    16-byte aligned strides, and on CPU what it supports (backward, bf16) varies by torch
    version; CPU inference uses its forward (`cpu_inference_grouped_mm`). The tests compare
    it with the padded path where it runs. Each expert's rows are copied into a group padded
    to a multiple of `align` rows; the buffer size is the static bound N + E*(align-1) (rounded up
    to `align`), so nothing here syncs with the host. The last group absorbs the slack rows
    (zeros in, zeros out), keeping every group boundary aligned.
    Same arguments and result as `experts_padded`; `mm` replaces `torch._grouped_mm` (the CPU
    inference path passes its compile-safe wrapper).
    """
    mm = mm or torch._grouped_mm
    n, dim = x.shape
    n_exp = w1.shape[0]
    device = x.device
    padded = (counts + align - 1) // align * align                         # [E]
    n_pad = -(-(n + n_exp * (align - 1)) // align) * align                  # static bound
    eid = torch.repeat_interleave(torch.arange(n_exp, device=device), counts,
                                  output_size=n)                          # [N]
    starts = counts.cumsum(0) - counts                                    # [E]
    pstarts = padded.cumsum(0) - padded                                   # [E]
    dest = torch.arange(n, device=device) - starts[eid] + pstarts[eid]    # [N] padded row
    offs = padded.cumsum(0).to(torch.int32)                               # [E] group ends
    offs[-1] = n_pad
    xp = x.new_zeros(n_pad, dim).index_put((dest,), x)                    # [n_pad, dim]
    gate = mm(xp, w1.transpose(-2, -1), offs=offs)                        # [n_pad, inter]
    up = mm(xp, w3.transpose(-2, -1), offs=offs)                          # [n_pad, inter]
    h = swiglu(gate, up, limit)                                           # [n_pad, inter] fp32
    if weights is not None:
        wp = weights.new_zeros(n_pad, dtype=torch.float32).index_put((dest,), weights.float())
        h = h * wp[:, None]
    out = mm(h.to(x.dtype), w2.transpose(-2, -1), offs=offs)              # [n_pad, dim]
    return out.index_select(0, dest)                                      # [N, dim]


def grouped_mm_usable(x: Tensor, w1: Tensor) -> bool:
    """`_grouped_mm` only where forward and backward are known to work: CUDA, bf16, dims that
    keep 16-byte aligned strides, Hopper or newer."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if x.shape[-1] % 8 or w1.shape[1] % 8:
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


_CPU_GROUPED: dict[torch.dtype, bool] = {}


@torch.library.custom_op("v4lab::cpu_grouped_mm", mutates_args=())
def cpu_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """`torch._grouped_mm` as an opaque op for `torch.compile`: its fake (meta) kernel only
    accepts bf16, while the CPU kernel runs fp32 too."""
    return torch._grouped_mm(a, b, offs=offs)


@cpu_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


def cpu_inference_grouped_mm(x: Tensor, w1: Tensor) -> bool:
    """`_grouped_mm` for a CPU forward without autograd (decoding, rollouts, evaluation): one
    GEMM per expert over exactly its rows, where `experts_padded` pads every expert to the
    largest group (and, while compiling, to every row: E times the work). Its CPU kernel is
    forward-only and version-dependent, so whether it runs for a dtype is probed once (1.2x
    faster than padded at 64 rows, 3x faster than the compiled static bound: issue #38)."""
    if x.is_cuda or torch.is_grad_enabled() or not hasattr(torch, "_grouped_mm"):
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w1.shape[1] * x.element_size()) % 16:
        return False  # its kernel needs 16-byte aligned row strides
    if torch.compiler.is_compiling():  # probed by the eager prefill before any decode step
        return _CPU_GROUPED.get(x.dtype, False)
    if x.dtype not in _CPU_GROUPED:
        try:
            probe = torch.ones(2, 8, dtype=x.dtype)
            w = torch.ones(2, 8, 8, dtype=x.dtype)
            offs = torch.tensor([1, 2], dtype=torch.int32)
            out = torch._grouped_mm(probe, w.transpose(-2, -1), offs=offs)
            _CPU_GROUPED[x.dtype] = bool((out == 8).all())
        except (RuntimeError, NotImplementedError, TypeError):
            _CPU_GROUPED[x.dtype] = False
    return _CPU_GROUPED[x.dtype]
