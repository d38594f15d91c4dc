"""Sparse attention over index lists vs its reference and vs `model.attention_core`."""

import pytest
import torch

from v4kernels import hybrid_indices, sparse_attention, sparse_attention_ref, window_indices
from model.attention_core import hybrid_attention
from tests.kernels._util import DEVICE, close, grads, randn


def _ragged_indices(b, s, k, n):
    """Random rows with −1 padding, one all-masked query, duplicated rows, int32."""
    idx = torch.randint(0, n, (b, s, k))
    idx[torch.rand(b, s, k) < 0.3] = -1
    idx[0, 1] = -1                         # a query that sees nothing but the sink
    idx[-1, -1, :2] = idx[-1, -1, 2]       # the same row listed three times
    return idx.to(device=DEVICE, dtype=torch.int32)


@pytest.mark.parametrize("b, s, h, c, n, k", [(2, 4, 3, 8, 9, 20), (1, 3, 17, 24, 5, 7)])
def test_forward_backward_fp32(b, s, h, c, n, k):
    """k = 20 spans two index tiles; h = 17 spans two head blocks; c = 24 is not a power of 2."""
    q, kv, sink = randn(b, s, h, c, grad=True), randn(b, n, c, grad=True), randn(h, grad=True)
    idx = _ragged_indices(b, s, k, n)
    scale = c ** -0.5
    out, lse = sparse_attention(q, kv, idx, sink, scale, return_lse=True)
    assert type(out.grad_fn).__name__ == "_SparseAttentionFnBackward"
    out_r, lse_r = sparse_attention_ref(q, kv, idx, sink, scale, return_lse=True)
    close(out, out_r, what="out")
    close(lse, lse_r, what="lse")
    # the all-masked query: zero output, lse = sink
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    close(lse[0, 1], sink.detach(), what="lse of an empty list")
    g = randn(b, s, h, c)
    for a, r, name in zip(grads([out], (q, kv, sink), [g]), grads([out_r], (q, kv, sink), [g]),
                          ("dq", "dkv", "dsink")):
        close(a, r, what=name)


def test_fp16_inputs():
    """fp16 q/kv use fp16 dot operands (p is rounded to fp16 before p·V), so compare with the
    fp32 reference at 2e-3."""
    b, s, h, c, n, k = 1, 3, 2, 16, 6, 10
    q = randn(b, s, h, c, dtype=torch.float16, grad=True)
    kv = randn(b, n, c, dtype=torch.float16, grad=True)
    sink = randn(h, grad=True)
    idx = _ragged_indices(b, s, k, n)
    out = sparse_attention(q, kv, idx, sink, c ** -0.5, out_dtype=torch.float16)
    out_r = sparse_attention_ref(q, kv, idx, sink, c ** -0.5)
    assert out.dtype == torch.float16
    close(out.float(), out_r, atol=2e-3, rtol=2e-3, what="out fp16")
    g = randn(b, s, h, c)
    for a, r, name in zip(grads([out], (q, kv, sink), [g.half()]),
                          grads([out_r], (q, kv, sink), [g.half().float()]),
                          ("dq", "dkv", "dsink")):
        assert a.dtype == r.dtype
        close(a.float(), r.float(), atol=5e-3, rtol=5e-3, what=name + " fp16")


def test_empty_index_list_is_sink_only():
    q, kv, sink = randn(1, 2, 2, 16), randn(1, 3, 16), randn(2)
    idx = torch.empty(1, 2, 0, dtype=torch.int64, device=DEVICE)
    out, lse = sparse_attention(q, kv, idx, sink, 0.25, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    close(lse, sink.expand(1, 2, 2))


@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_matches_model_hybrid_attention(mode):
    """Window + compressed entries + sink, with two documents in one row: the kernel on
    `hybrid_indices` equals `hybrid_attention` (output, gradients, and the compressed-entry
    probabilities rebuilt from the returned lse)."""
    b, s, h, c, window, n_comp = 2, 10, 2, 16, 4, 3
    q, kv, comp = randn(b, s, h, c, grad=True), randn(b, s, c, grad=True), randn(b, n_comp, c,
                                                                                  grad=True)
    sink = randn(h, grad=True)
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 10], device=DEVICE)
    if mode == "csa":
        comp_idx = torch.randint(-1, n_comp, (b, s, 2), device=DEVICE)
        ref, p_ref = hybrid_attention(q, kv, doc, window, sink, comp, comp_idx=comp_idx)
        idx = hybrid_indices(doc, window, s, comp_idx=comp_idx)
    else:
        comp_mask = (torch.arange(n_comp, device=DEVICE)[None, None, :] * 3 + 2
                     < torch.arange(s, device=DEVICE)[None, :, None]).expand(b, s, n_comp)
        ref, p_ref = hybrid_attention(q, kv, doc, window, sink, comp, comp_mask=comp_mask)
        idx = hybrid_indices(doc, window, s, comp_mask=comp_mask)
    kv_all = torch.cat((kv, comp), dim=1)
    out, lse = sparse_attention(q, kv_all, idx, sink, c ** -0.5, return_lse=True)
    close(out, ref, what="out vs model")
    g = randn(b, s, h, c)
    for a, r, name in zip(grads([out], (q, kv, comp, sink), [g]),
                          grads([ref], (q, kv, comp, sink), [g]), ("dq", "dkv", "dcomp", "dsink")):
        close(a, r, what=name + " vs model")
    # indexer target: p_j = exp(z_j − lse) over the compressed part of each list
    comp_rows = idx[..., window:]
    z = torch.einsum("bshc,bskc->bhsk", q.detach(), kv_all.detach()[
        torch.arange(b, device=DEVICE)[:, None, None], comp_rows.clamp(min=0)]) * c ** -0.5
    p = torch.exp(z - lse.permute(0, 2, 1)[..., None]) * (comp_rows >= 0)[:, None]
    close(p, p_ref.detach(), what="compressed-entry probabilities")


@pytest.mark.reference_only
def test_window_indices():
    doc = torch.tensor([[0, 0, 0, 1, 1]])
    idx = window_indices(doc, 3)
    assert idx.tolist() == [[[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [-1, -1, 3], [-1, 3, 4]]]


def test_bad_shapes_raise():
    q, kv, sink = randn(1, 2, 2, 16), randn(1, 3, 16), randn(2)
    with pytest.raises(ValueError):
        sparse_attention(q, kv, torch.zeros(1, 2, 3, device=DEVICE), sink, 1.0)  # float idx
    with pytest.raises(ValueError):
        sparse_attention(q, randn(1, 3, 8), torch.zeros(1, 2, 3, dtype=torch.long), sink, 1.0)
