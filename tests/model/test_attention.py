"""Attention pieces against brute-force references: the blocked window + compressed-entry core,
the document-aware compressor, RoPE/YaRN, causality and document isolation per layer kind."""

import math

import pytest
import torch

from model.attention import Attention, AttentionContext
from model.attention_core import hybrid_attention
from model.compressor import BlockLayout, Compressor
from model.config import get_config
from model.rope import apply_rope, rope_frequencies
from model.packing import positions_from_doc_ids

torch.manual_seed(0)
TINY = get_config("tiny")


def packed_doc_ids(batch, seq, lengths):
    """Documents of the given lengths, repeated to fill each row."""
    ids = []
    for _ in range(batch):
        row, d = [], 0
        while len(row) < seq:
            row += [d] * lengths[d % len(lengths)]
            d += 1
        ids.append(row[:seq])
    return torch.tensor(ids)


def naive_attention(q, kv, doc, window, sink, comp=None, comp_allowed=None):
    """Dense [seq, seq + n] reference: explicit candidate masks, sink column in the softmax."""
    b, s, h, c = q.shape
    t = torch.arange(s)
    win = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    allowed = win[None] & (doc[:, :, None] == doc[:, None, :])  # [b, s, s]
    keys = kv
    if comp is not None:
        keys = torch.cat((kv, comp), dim=1)
        allowed = torch.cat((allowed, comp_allowed), dim=2)
    scores = torch.einsum("bshc,bkc->bhsk", q, keys) / math.sqrt(c)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    scores = torch.cat((scores, sink[None, :, None, None].expand(b, h, s, 1)), dim=-1)
    p = torch.softmax(scores, dim=-1)[..., :-1]
    return torch.einsum("bhsk,bkc->bshc", p, keys)


@pytest.mark.parametrize("mode", ["window", "dense", "sparse"])
def test_hybrid_attention_matches_naive(mode):
    b, s, h, c, w, n = 2, 37, 3, 8, 5, 9
    q, kv = torch.randn(b, s, h, c), torch.randn(b, s, c)
    sink = torch.randn(h)
    doc = packed_doc_ids(b, s, [13, 7, 20])
    if mode == "window":
        out, _ = hybrid_attention(q, kv, doc, w, sink)
        ref = naive_attention(q, kv, doc, w, sink)
    else:
        comp = torch.randn(b, n, c)
        vis = torch.rand(b, s, n) < 0.5
        vis[:, :3] = False  # queries with no compressed entry at all
        if mode == "dense":
            out, _ = hybrid_attention(q, kv, doc, w, sink, comp, comp_mask=vis)
            ref = naive_attention(q, kv, doc, w, sink, comp, vis)
        else:
            idx = torch.rand(b, s, n).argsort(-1)[..., :4]  # distinct picks per query
            idx[torch.rand(b, s, 4) < 0.3] = -1
            idx[:, :3] = -1
            out, _ = hybrid_attention(q, kv, doc, w, sink, comp, comp_idx=idx)
            allowed = torch.zeros(b, s, n + 1, dtype=torch.bool)
            allowed.scatter_(2, torch.where(idx >= 0, idx, n), True)
            allowed = allowed[..., :n]
            ref = naive_attention(q, kv, doc, w, sink, comp, allowed)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def naive_compress(comp: Compressor, x, doc, pos):
    """Loop over documents and blocks, straight from spec §4.4."""
    m, c = comp.ratio, comp.head_dim
    kv, gate = x @ comp.wkv.weight.t(), x @ comp.wgate.weight.t()
    rows = []
    for bi in range(x.shape[0]):
        entries = []
        for t in range(x.shape[1]):
            if pos[bi, t] % m or t + m > x.shape[1] or doc[bi, t + m - 1] != doc[bi, t]:
                continue
            blk = slice(t, t + m)
            if comp.overlap:
                k_cur, z_cur = kv[bi, blk, c:], gate[bi, blk, c:] + comp.ape[:, c:]
                if pos[bi, t] >= m:
                    prev = slice(t - m, t)
                    k_prev, z_prev = kv[bi, prev, :c], gate[bi, prev, :c] + comp.ape[:, :c]
                    k_cur, z_cur = torch.cat((k_prev, k_cur)), torch.cat((z_prev, z_cur))
            else:
                k_cur, z_cur = kv[bi, blk], gate[bi, blk] + comp.ape
            e = (torch.softmax(z_cur, dim=0) * k_cur).sum(0)
            entries.append((e, pos[bi, t]))
        rows.append(entries)
    return rows


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 4), (False, 8)])
def test_compressor_matches_per_block_loop(overlap, ratio):
    dim, c, rd = 16, 12, 4
    comp = Compressor(dim, c, ratio, overlap, 1e-6)
    for p in comp.parameters():
        torch.nn.init.normal_(p)
    b, s = 2, 41
    x = torch.randn(b, s, dim)
    doc = packed_doc_ids(b, s, [17, 3, 11, 30])
    pos = positions_from_doc_ids(doc)
    layout = BlockLayout.build(doc, pos, ratio)
    freqs = torch.rand(rd // 2)
    out = comp(x, layout, freqs)
    ref = naive_compress(comp, x, doc, pos)
    for bi, entries in enumerate(ref):
        assert int(layout.valid[bi].sum()) == len(entries)
        for j, (e, p) in enumerate(entries):
            want = apply_rope(comp.norm(e)[None, None], p.view(1, 1), freqs)[0, 0]
            torch.testing.assert_close(out[bi, j], want, atol=1e-5, rtol=1e-5)
            assert layout.position[bi, j] == p


def test_block_visibility_rule():
    """Entry s of a document is usable by query t iff (s+1)·m ≤ pos_t + 1 (spec §4.4)."""
    doc = packed_doc_ids(1, 30, [10, 20])
    pos = positions_from_doc_ids(doc)
    layout = BlockLayout.build(doc, pos, 4)
    vis = layout.visible(doc)[0]
    for t in range(30):
        for j in range(layout.n_entries):
            same = layout.doc[0, j] == doc[0, t]
            s = layout.position[0, j] // 4
            assert bool(vis[t, j]) == bool(same and (s + 1) * 4 <= pos[0, t] + 1)


def test_rope_inverse_and_relative():
    cfg = get_config("flash")
    freqs = rope_frequencies(cfg, compressed=True)
    x = torch.randn(1, 5, 2, cfg.head_dim)
    pos = torch.tensor([[0, 3, 100, 5000, 70000]])
    back = apply_rope(apply_rope(x, pos, freqs), pos, freqs, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    def dot(tq, tk):
        rq = apply_rope(q.view(1, 1, -1), torch.tensor([[tq]]), freqs)
        rk = apply_rope(k.view(1, 1, -1), torch.tensor([[tk]]), freqs)
        return float((rq * rk).sum())
    assert abs(dot(10, 3) - dot(1007, 1000)) < 1e-3


def test_yarn_ramp_matches_spec():
    """θ=160000, 64 rope dims, L=65536, β 32/1 → pairs < 15 kept, ≥ 25 divided by 16; SWA
    layers plain θ=10000."""
    cfg = get_config("flash")
    plain = 1.0 / 160000 ** (torch.arange(0, 64, 2).double() / 64)
    yarn = rope_frequencies(cfg, compressed=True).double()
    torch.testing.assert_close(yarn[:15], plain[:15])
    torch.testing.assert_close(yarn[25:], plain[25:] / 16)
    assert ((yarn[15:25] < plain[15:25]) & (yarn[15:25] > plain[15:25] / 16)).all()
    swa = rope_frequencies(cfg, compressed=False).double()
    torch.testing.assert_close(swa, 1.0 / 10000 ** (torch.arange(0, 64, 2).double() / 64))


def _layer(layer_id, seed=0):
    torch.manual_seed(seed)
    att = Attention(TINY, layer_id)
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return att


def _ctx(doc, mode="sparse", indexer_loss=False):
    pos = positions_from_doc_ids(doc)
    freqs = {c: rope_frequencies(TINY, c) for c in (False, True)}
    return AttentionContext(doc, pos, freqs, mode, indexer_loss)


@pytest.mark.parametrize("layer_id", [0, 1, 2])  # swa, csa, hca
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_layer_causality(layer_id, mode):
    att = _layer(layer_id)
    b, s = 2, 300
    x = torch.randn(b, s, TINY.dim)
    doc = torch.zeros(b, s, dtype=torch.long)
    y, _ = att(x, _ctx(doc, mode))
    for t in (15, 16, 63, 64, 131, 250):  # around window / ratio-4 / ratio-16 boundaries
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(b, s - t - 1, TINY.dim)
        y2, _ = att(x2, _ctx(doc, mode))
        assert torch.equal(y[:, :t + 1], y2[:, :t + 1]), f"layer {layer_id} leaks future at t={t}"
        assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("layer_id", [0, 1, 2])
def test_layer_document_isolation(layer_id):
    att = _layer(layer_id)
    lengths = [70, 45, 93]
    x = torch.randn(1, sum(lengths), TINY.dim)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    y, _ = att(x, _ctx(doc))
    start = 0
    for d, n in enumerate(lengths):
        alone, _ = att(x[:, start:start + n], _ctx(torch.zeros(1, n, dtype=torch.long)))
        torch.testing.assert_close(y[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_indexer_loss_trains_only_the_indexer():
    att = _layer(1)
    x = torch.randn(2, 64, TINY.dim)
    for mode in ("dense", "sparse"):
        att.zero_grad()
        _, loss = att(x, _ctx(torch.zeros(2, 64, dtype=torch.long), mode, indexer_loss=True))
        assert loss > 0
        loss.backward()
        for name, p in att.named_parameters():
            got = p.grad is not None and p.grad.abs().sum() > 0
            assert got == name.startswith("indexer."), (mode, name)


def test_indexer_topk_ties_prefer_recent_and_skip_invisible():
    from model.indexer import Indexer
    scores = torch.tensor([[[0.0, 0.0, 5.0, 0.0, 0.0, -1e30]]])
    visible = torch.tensor([[[True, True, True, True, True, False]]])
    idx = Indexer.select(scores, visible, topk=3)
    assert idx.tolist() == [[[2, 4, 3]]]
    assert Indexer.select(scores, visible, topk=6).tolist() == [[[2, 4, 3, 1, 0, -1]]]
