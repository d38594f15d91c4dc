"""Chunked prefill (`model/prefill.py`) equals one-shot prefill: the next-token logits, every
tensor of the cache, the routes, and what `generate` then produces (the cache's own multi-token
steps are tested in test_cache.py; this is the prefill loop and its per-row logits).

The micro model has a window of 8 and compression ratios 4 and 8; chunks of 6 and 11 tokens cut
through windows and compression blocks at every offset, and the two rows end in different
chunks. fp32 on CPU: the chunked forward attends to the same keys with the same weights, summed
in another grouping (ring + cached entries instead of one causal pass), so values agree to a few
float32 ulps of their magnitude; 1e-5 relative (plus 1e-6 absolute for entries near 0) is ~100×
that and far below any real difference (a wrong position or a lost entry moves logits by O(1)).
"""

from __future__ import annotations

import pytest
import torch

from model.generation import generate
from model.prefill import prefill


def prompts_batch(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (len(lengths), max(lengths)), generator=g)
    lens = torch.tensor(lengths)
    mask = torch.arange(ids.shape[1])[None] < lens[:, None]
    return ids.masked_fill(~mask, 0), mask, lens


@pytest.mark.parametrize("chunk", [6, 11])
def test_chunked_prefill_equals_one_forward(micro_model, micro_cfg, chunk):
    ids, mask, lens = prompts_batch(micro_cfg, [37, 20])
    with torch.no_grad():
        whole = micro_model.new_cache(2, 64)
        want, want_routes = prefill(micro_model, ids, mask, lens, whole, None, True)
        parts = micro_model.new_cache(2, 64)
        got, got_routes = prefill(micro_model, ids, mask, lens, parts, chunk, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(parts.lengths, whole.lengths) and parts.lengths.tolist() == [37, 20]
    for layer, cache in whole.layers.items():
        for name, tensor in cache.tensors().items():
            # every cache tensor ends in a sink slot that takes the writes that have no place
            # (padding, positions outside a ring): never read, so not compared
            torch.testing.assert_close(parts.layers[layer].tensors()[name][:, :-1],
                                       tensor[:, :-1], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=f"{layer}.{name}": f"{n}: {m}")
    valid = mask[..., None, None].expand_as(want_routes)
    assert torch.equal(got_routes[valid], want_routes[valid])


def test_generate_with_a_small_prefill_chunk_gives_the_same_tokens(micro_model, micro_cfg):
    prompts = [list(range(3, 40)), list(range(5, 19))]
    one = generate(micro_model, prompts, max_new_tokens=12, temperature=0, prefill_chunk=None)
    chunked = generate(micro_model, prompts, max_new_tokens=12, temperature=0, prefill_chunk=5)
    assert chunked.tokens == one.tokens
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        generate(micro_model, prompts, max_new_tokens=2, temperature=0, prefill_chunk=0)
