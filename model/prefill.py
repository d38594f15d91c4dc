"""Prefill in chunks: a prompt of any length into the cache, with peak memory bounded by the
chunk instead of the prompt (issue #36, "long prompts in inference").

The cache already takes multi-token steps at any position (`ModelCache.begin`: a chunk continues
each row at `cache.lengths`; right padding is masked), so a long prefill is the same forward over
successive `chunk`-token slices of the right-padded prompts. Inside a chunk, attention reads the
sliding-window ring and the compressed entries written by the earlier chunks (the compressors
carry their partial block across the boundary), so the result equals one-shot prefill up to
summation order: tested for the logits and every cache entry (tests/inference/test_prefill.py).
A row whose prompt ended in an earlier chunk has no valid token in the later ones (all masked),
and its next-token logits are taken from the chunk that holds its last prompt token.

Under expert parallelism every forward is a collective and ranks hold prompts of different
lengths, so there the prefill stays one forward (`chunk=None`); chunking it needs the ranks to
agree on a chunk count first (not done yet).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 8192  # tokens per prefill forward: prompts up to this length run in one


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, lens: torch.Tensor, cache,
            chunk: int | None, return_routes: bool, on_chunk=None
            ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Right-padded prompts `ids` `[batch, width]` (`mask` marks real tokens, `lens` their
    counts) into `cache`; -> the logits after each row's last prompt token `[batch, vocab]`,
    and (`return_routes`) the main layers' routes `[batch, width, n_layers, topk]` on CPU.
    `on_chunk(output, start, stop)`: called after each forward over the columns
    [start, stop), its output with the main streams kept (the speculative engine feeds
    them to the MTP block chunk by chunk)."""
    width = ids.shape[1]
    keep = on_chunk is not None
    if chunk is None or chunk >= width:
        out = model(ids, token_mask=mask, cache=cache, logits_index=(lens - 1)[:, None],
                    keep_streams=keep)
        if keep:
            on_chunk(out, 0, width)
        return out.logits[:, 0], _routes(model, out) if return_routes else None
    if chunk < 1:
        raise ValueError(f"prefill_chunk={chunk}: must be >= 1 (or None for one forward)")
    logits, routes = None, []
    last = lens - 1                                                      # [batch]
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        inside = (last >= start) & (last < stop)                         # rows ending here
        index = (last - start).clamp(0, stop - start - 1)[:, None]      # [batch, 1]
        out = model(ids[:, start:stop], token_mask=mask[:, start:stop], cache=cache,
                    logits_index=index, keep_streams=keep)
        if keep:
            on_chunk(out, start, stop)
        step = out.logits[:, 0]                                          # [batch, vocab]
        logits = step if logits is None else torch.where(inside[:, None], step, logits)
        if return_routes:
            routes.append(_routes(model, out))
    return logits, torch.cat(routes, dim=1) if return_routes else None


def _routes(model, out) -> torch.Tensor:
    return torch.stack(out.routes[:model.cfg.n_layers], dim=2).cpu()   # [b, seq, layers, k]
