"""Incremental decoding equals the full forward: ragged prefill + token-by-token decode, chunked
prefill, every layer kind in both CSA modes; cache memory; misuse errors."""

import pytest
import torch

from model.attention import AttentionContext
from model.cache import cache_bytes
from model.config import get_config
from model.rope import rope_frequencies
from model.summary import kv_cache_bytes

TOL = 1e-4  # fp32


@pytest.fixture
def csa_model(micro_model, request):
    """The session model in the requested CSA mode, restored afterwards."""
    micro_model.set_csa_mode(request.param)
    yield micro_model
    micro_model.set_csa_mode("sparse")


@pytest.mark.parametrize("csa_model", ["sparse", "dense"], indirect=True)
@torch.no_grad()
def test_ragged_prefill_then_decode_equals_full_forward(csa_model):
    model, cfg = csa_model, csa_model.cfg
    total, lens = 256, [3, 29, 70]  # shorter than, several times, many times the window
    assert total // 4 > cfg.index_topk  # sparse CSA really drops entries
    ids = torch.randint(0, cfg.vocab_size, (3, total), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits  # [3, total, vocab]

    cache = model.new_cache(3, total)
    width = max(lens)
    real = torch.arange(width)[None] < torch.tensor(lens)[:, None]
    prompt = torch.where(real, ids[:, :width], 7)  # padding that must not leak into the cache
    pre = model(prompt, token_mask=real, cache=cache).logits
    for b, n in enumerate(lens):
        assert (pre[b, :n] - full[b, :n]).abs().max() <= TOL
    assert cache.lengths.tolist() == lens

    rows, worst, steps = [0, 1, 2], 0.0, 0
    while rows:  # each row decodes from its own position; finished rows leave the batch
        pos = cache.lengths.clone()
        nxt = ids[rows].gather(1, pos[:, None])
        out = model(nxt, cache=cache).logits[:, 0]
        worst = max(worst, (out - full[rows, pos]).abs().max().item())
        keep = [i for i in range(len(rows)) if pos[i] + 1 < total]
        if len(keep) < len(rows):
            cache.select(keep)
            rows = [rows[i] for i in keep]
        steps += 1
    assert steps == total - min(lens)
    assert worst <= TOL, f"decode logits differ from the full forward by {worst}"


@torch.no_grad()
def test_chunked_ragged_prefill_equals_full_forward(micro_model):
    """Chunks at, below and above the window (direct and blocked attention), rows advancing by
    different amounts, some chunks with nothing real for a row."""
    model, cfg = micro_model, micro_model.cfg
    total = 110
    ids = torch.randint(0, cfg.vocab_size, (2, total), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    cache = model.new_cache(2, total)
    plan = [(4, [4, 2]), (9, [9, 9]), (1, [1, 0]), (20, [13, 20]), (8, [8, 8]), (40, [40, 33]),
            (35, [35, 35]), (3, [0, 3])]
    worst = 0.0
    for width, counts in plan:
        start = cache.lengths.clone()
        idx = (start[:, None] + torch.arange(width)).clamp(max=total - 1)
        real = torch.arange(width)[None] < torch.tensor(counts)[:, None]
        out = model(ids.gather(1, idx), token_mask=real, cache=cache).logits
        for b in range(2):
            n = counts[b]
            worst = max(worst, (out[b, :n] - full[b, start[b]:start[b] + n]).abs().max().item()
                        if n else 0.0)
    assert cache.lengths.tolist() == [sum(c[0] for _, c in plan), sum(c[1] for _, c in plan)]
    assert worst <= TOL


@pytest.mark.parametrize("csa_mode", ["sparse", "dense"])
@pytest.mark.parametrize("layer_id,kind", [(0, "swa"), (1, "csa"), (2, "hca")])
@torch.no_grad()
def test_every_layer_kind_cached_equals_full(micro_model, layer_id, kind, csa_mode):
    cfg = micro_model.cfg
    attn = micro_model.layers[layer_id].attn
    assert attn.kind == kind
    total = 150
    x = torch.randn(2, total, cfg.dim, generator=torch.Generator().manual_seed(layer_id))
    freqs = {c: rope_frequencies(cfg, c) for c in (False, True)}
    doc = torch.zeros(2, total, dtype=torch.long)
    full, _ = attn(x, AttentionContext(doc, torch.arange(total).expand(2, total), freqs, csa_mode))
    cache = micro_model.new_cache(2, total)
    outs, s0 = [], 0
    for width in [37] + [1] * 30 + [5, 78]:  # blocked prefill, decode, short and long chunks
        step = cache.begin(doc[:, :width], None, None)
        ctx = AttentionContext(doc[:, :width], step.positions, freqs, csa_mode, cache=cache,
                               step=step)
        outs.append(attn(x[:, s0:s0 + width], ctx)[0])
        cache.commit(step)
        s0 += width
    assert s0 == total
    diff = (torch.cat(outs, 1) - full).abs().max().item()
    assert diff <= TOL, f"{kind} ({csa_mode}): cached layer output differs by {diff}"


def test_cache_bytes_follow_the_layout_and_beat_dense():
    cfg, context = get_config("flash"), 32768
    measured = cache_bytes(cfg, context, torch.bfloat16)
    growing = sum(measured.parts[k] for k in ("window", "entries", "index_keys"))
    assert growing == kv_cache_bytes(cfg, context, "bf16").per_sequence
    assert measured.dense_per_token == 2 * cfg.head_dim * cfg.n_layers
    assert 5 < measured.dense_per_token / measured.per_token < 8  # ~6x smaller at 32K


@torch.no_grad()
def test_cache_misuse_is_a_clear_error(micro_model):
    cache = micro_model.new_cache(2, 8)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"):
        micro_model(ids, positions=torch.arange(1, 4).expand(2, 3), cache=cache)
    with pytest.raises(ValueError, match="right padding"):
        micro_model(ids, token_mask=torch.tensor([[True, False, True]] * 2), cache=cache)
    with pytest.raises(ValueError, match="doc_ids"):
        micro_model(ids, doc_ids=torch.zeros_like(ids), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        micro_model(ids[:1], cache=cache)
    micro_model(ids, cache=cache)
    with pytest.raises(ValueError, match="cache full"):
        micro_model(torch.zeros(2, 6, dtype=torch.long), cache=cache)
    assert cache.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("layer_id", [1, 2])
@torch.no_grad()
def test_cached_layer_through_the_triton_kernel(micro_model, layer_id, monkeypatch):
    """The decode path's index lists, run by the Triton sparse-attention kernel (interpreted on
    CPU), against the reference full forward."""
    pytest.importorskip("triton")
    cfg = micro_model.cfg
    attn = micro_model.layers[layer_id].attn
    total = 40
    x = torch.randn(1, total, cfg.dim, generator=torch.Generator().manual_seed(5))
    freqs = {c: rope_frequencies(cfg, c) for c in (False, True)}
    doc = torch.zeros(1, total, dtype=torch.long)
    full, _ = attn(x, AttentionContext(doc, torch.arange(total)[None], freqs, "sparse"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("V4_KERNELS", "triton")
    cache = micro_model.new_cache(1, total)
    outs, s0 = [], 0
    for width in [30] + [1] * 6 + [4]:
        step = cache.begin(doc[:, :width], None, None)
        ctx = AttentionContext(doc[:, :width], step.positions, freqs, "sparse", cache=cache,
                               step=step)
        outs.append(attn(x[:, s0:s0 + width], ctx)[0])
        cache.commit(step)
        s0 += width
    assert (torch.cat(outs, 1) - full).abs().max() <= TOL


def test_step_knows_on_the_host_whether_a_block_completes(micro_model):
    """`CacheStep.completes[ratio]`: some row's new tokens end a compression block (then the
    cached forward pools; otherwise it only appends to the tail state)."""
    cache = micro_model.new_cache(2, 64)
    cache.lengths = torch.tensor([3, 5])
    step = cache.begin(torch.zeros(2, 1, dtype=torch.long), None, None)
    assert step.completes[4] is True  # row 0 reaches position 3, the end of block 0
    cache.lengths = torch.tensor([4, 5])
    step = cache.begin(torch.zeros(2, 1, dtype=torch.long), None, None)
    assert step.completes[4] is False  # positions 4 and 5 end no block of 4
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    step = cache.begin(torch.zeros(2, 4, dtype=torch.long), None, mask)
    assert step.completes[4] is False  # both rows end at 7; the padding at 7 does not count
    step = cache.begin(torch.zeros(2, 4, dtype=torch.long), None, torch.ones_like(mask))
    assert step.completes[4] is True  # all real: both rows pass position 7
