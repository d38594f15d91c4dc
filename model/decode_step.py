"""The engine's decode step (`model/engine.py`): one token per running slot through the model,
eager or through `torch.compile` (CUDA graphs on a GPU), and the batch sizes it is padded to."""

from __future__ import annotations

from typing import Callable

import torch

def decode_step(model, tok: torch.Tensor, view, routes: bool):
    """The decode step: tokens `[k]` into the cache rows `view` -> (next logits `[k, vocab]`,
    the rows' new lengths `[k]`, the fed tokens' routes `[k, layers, topk]` or None). It
    calls the model's `forward` itself, without the module's hooks: a training wrapper's
    bookkeeping hooks (DeepSpeed's throughput timer reads a step counter) would be traced into
    a compiled step and recompile it after every optimizer step."""
    out = model.forward(tok[:, None], cache=view)
    fed = torch.stack(out.routes[:model.cfg.n_layers], dim=2)[:, 0] if routes else None
    return out.logits[:, 0], view.lengths, fed


def bucket_sizes(max_batch: int, buckets: bool | None, compiled: bool,
                 device_type: str) -> list[int] | None:
    """The batch sizes a decode forward runs at (a batch is padded up to the next one), or None
    (no padding). `buckets=True` (the default for a compiled step on CUDA): 2, 4, 8, then
    multiples of 8 and max_batch, as vLLM's CUDA-graph capture sizes, so `reduce-overhead`
    records a graph per bucket (at most max_batch / 8 + 4) instead of one per size a
    continuous batch passes through, wasting under 8 rows. A compiled step elsewhere (the
    default None) pads only a lone row to 2: the compiler specialises size 1, so a batch
    shrinking to one row would compile a second graph. False: never pad."""
    if buckets is False or (buckets is None and not compiled) or max_batch == 1:
        return None
    if buckets is None and device_type != "cuda":
        return list(range(2, max_batch + 1))
    sizes = {2, 4, 8, *range(16, max_batch + 1, 8), max_batch}
    return sorted(s for s in sizes if s <= max_batch)


_COMPILED: dict[str, Callable] = {}


def compiled_decode_step(device: torch.device, backend: str = "inductor") -> Callable:
    """`decode_step` through `torch.compile`, one per device type and backend (`inductor`;
    `aot_eager` traces the same graph without generating kernels), shared by every engine (a
    new engine per rollout reuses the compiled graph of the same model). The engine marks the
    view `static` (`ModelCache._static_step`: no host synchronisation, shapes set by the cache
    alone), so the step traces as one graph with a dynamic batch size; it guarantees what the
    static step does not check (one token per row, room in every row). On CUDA,
    `mode="reduce-overhead"` captures the graph as CUDA graphs. Compiling takes minutes on a
    CPU (reported separately by the benchmarks) and pays off over long runs."""
    key = f"{device.type}/{backend}"
    if key not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        compiled = torch.compile(decode_step, dynamic=True, mode=mode, backend=backend)

        def step(*args):
            # no duck sizing: the first batch often equals the cache's row count, and equal
            # sizes would be traced as one symbol (a recompile when the batch shrinks)
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return compiled(*args)

        _COMPILED[key] = step
    return _COMPILED[key]
