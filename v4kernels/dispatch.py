"""Which implementation runs: the Triton kernel or the plain-PyTorch reference.

Rule (issue #9): a call goes to the Triton kernel when every tensor argument is on CUDA, Triton
imports, and `V4_KERNELS` is not "ref"; otherwise it goes to the reference. `V4_KERNELS=triton`
forces the kernels, which on CPU tensors is only possible under the Triton interpreter
(`TRITON_INTERPRET=1`); that is how the CPU tests and a CPU debugging session run them.

Why kernels are decorated lazily. `triton.jit` decides at *decoration* time whether a function is
compiled or interpreted (it reads `TRITON_INTERPRET` then), and Triton decorates its own standard
library (`tl.sum`, `tl.max`, `tl.sigmoid`, `tl.zeros`, ...) when it is first imported. If the mode
were fixed at import, the kernel tests would depend on whether anything imported triton before
them, and setting the variable process-wide would leak into every other test directory. So:
- `lazy_jit` keeps the raw function and decorates it on first launch, once per mode, reading
  `TRITON_INTERPRET` at launch time (on a GPU this costs one dict lookup per launch);
- an interpreted launch temporarily swaps triton's compiled-mode standard-library functions for
  interpreted twins (`_interpreted_stdlib`) when triton was imported in compiled mode, and puts
  them back afterwards. The interpreter is single-threaded test/debug machinery; do not launch
  compiled kernels from another thread during an interpreted launch.

Kernel files use `from __future__ import annotations`, so `BLOCK: tl.constexpr` stays a string
(Triton only looks for the word "constexpr") and the modules import even without Triton.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch

try:  # Triton is optional: without it every dispatcher uses the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
ENV_MODE = "V4_KERNELS"  # "auto" (default), "ref", "triton"
MODES = ("auto", "ref", "triton")


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter: `TRITON_INTERPRET` read now, with
    triton's own parsing (its knobs re-read the environment on every access)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def kernel_mode() -> str:
    mode = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}: choose one of {MODES}")
    return mode


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """The dispatch rule. `None` entries (optional arguments) are ignored."""
    mode = kernel_mode()
    if mode == "ref" or not HAS_TRITON:
        if mode == "triton" and not HAS_TRITON:
            raise RuntimeError(f"{ENV_MODE}=triton but triton is not importable")
        return False
    present = [t for t in tensors if t is not None]
    all_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "auto":
        return all_cuda
    if all_cuda or interpreting():
        return True
    raise RuntimeError(f"{ENV_MODE}=triton with CPU tensors needs TRITON_INTERPRET=1")


class LazyKernel:
    """A Triton kernel decorated on first launch, separately for compiled and interpreted mode.

    `kernel[grid](...)` works like a `triton.jit` function. Kernels must not call other lazy
    kernels (the compiler needs real `JITFunction`s there), so every kernel here is one function.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._by_mode: dict[bool, object] = {}
        functools.update_wrapper(self, fn)

    def resolve(self):
        if not HAS_TRITON:
            raise RuntimeError(f"{self.fn.__name__}: triton is not importable")
        mode = interpreting()
        kernel = self._by_mode.get(mode)
        if kernel is None:  # triton.jit reads TRITON_INTERPRET right now
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        launch = self.resolve()[grid]
        if not interpreting():
            return launch

        def interpreted_launch(*args, **kwargs):
            with _interpreted_stdlib():
                return launch(*args, **kwargs)
        return interpreted_launch


_STDLIB_TWINS: dict[str, object] = {}


def _make_twin(fn: Callable):
    """An interpreted twin of a standard-library function that undoes its own patches.

    Triton's `InterpretedFunction.__call__` (a device-function call) patches `triton.language`
    for the interpreter and never restores it. In an all-interpreted process that is harmless;
    here compiled kernels may be built later in the same process (e.g. GPU code paths, AOT
    compile checks), which would then see the interpreter's stand-ins. The patches are scoped
    to the call instead."""
    from triton.runtime import interpreter

    class _ScopedTwin(interpreter.InterpretedFunction):
        def __call__(self, *args, **kwargs):
            scope = interpreter._patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            except Exception as e:
                raise interpreter.InterpreterError(repr(e)) from e
            finally:
                scope.restore()

    return _ScopedTwin(fn)


@contextlib.contextmanager
def _interpreted_stdlib():
    """While interpreting, make `tl.<fn>` / `tl.standard.<fn>` interpreted functions even if
    triton was imported in compiled mode (then they are `JITFunction`s, which refuse to be called
    outside a compiled kernel). Private combine functions are left alone: the interpreter
    recognises them by identity and calls their `.fn` directly."""
    from triton.runtime.jit import JITFunction

    saved = []
    try:
        for module in (tl, tl.standard):
            for name, value in list(vars(module).items()):
                if name.startswith("_") or not isinstance(value, JITFunction):
                    continue
                twin = _STDLIB_TWINS.get(name)
                if twin is None:
                    twin = _STDLIB_TWINS[name] = _make_twin(value.fn)
                saved.append((module, name, value))
                setattr(module, name, twin)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def lazy_jit(fn: Callable) -> LazyKernel:
    return LazyKernel(fn)


# Dot-operand modes passed to kernels as a constexpr int. The interpreter computes a bf16 `tl.dot`
# on raw bit patterns (triton#11584), so bf16 operands are cast to fp32 there; on a GPU they stay
# bf16 (tensor cores) with fp32 accumulation. fp32 inputs use IEEE fp32 dots (no TF32) so fp32
# results can be compared with the reference at 1e-5.
DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2


def dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return DOT_FP16
    if dtype == torch.bfloat16 and not interpreting():
        return DOT_BF16
    return DOT_FP32


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
