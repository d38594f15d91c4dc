"""MoE permute/unpermute kernels vs reference and `model.dispatcher.LocalDispatcher` (G-K9)."""

import torch

from v4kernels import moe_permute, moe_unpermute
from v4kernels.moe_permute import moe_permute_ref, moe_unpermute_ref
from model.dispatcher import LocalDispatcher
from tests.kernels._util import DEVICE, close, grads, randn


def _routes(t, k, n_exp, skip=()):
    """Distinct experts per token, never routing to the experts in `skip`."""
    allowed = torch.tensor([e for e in range(n_exp) if e not in skip])
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(t)])
    return ids.to(DEVICE)


def test_permute_matches_dispatcher_and_gradient():
    t, k, n_exp, d = 9, 3, 6, 20
    x = randn(t, d, grad=True)
    ids, w = _routes(t, k, n_exp, skip=(2,)), torch.rand(t, k, device=DEVICE)
    x_sorted, counts, order, inverse = moe_permute(x, ids, n_exp)
    assert type(x_sorted.grad_fn).__name__ == "_PermuteFnBackward"
    xs_m, counts_m, handle = LocalDispatcher(n_exp).dispatch(x, ids, w)
    assert torch.equal(x_sorted, xs_m) and torch.equal(counts, counts_m)
    assert counts[2] == 0 and torch.equal(order, handle.order)
    g = randn(t * k, d)
    close(grads([x_sorted], [x], [g])[0], grads([moe_permute_ref(x, order, k)], [x], [g])[0])


def test_unpermute_matches_combine_and_index_add():
    t, k, n_exp, d = 8, 2, 4, 24
    x = randn(t, d)
    ids = _routes(t, k, n_exp)
    weights = torch.rand(t, k, device=DEVICE, requires_grad=True)
    _, _, order, inverse = moe_permute(x, ids, n_exp)
    y = randn(t * k, d, grad=True)
    disp = LocalDispatcher(n_exp)
    _, _, handle = disp.dispatch(x, ids, weights.detach())
    out = moe_unpermute(y, inverse, order, k)
    assert type(out.grad_fn).__name__ == "_UnpermuteFnBackward"
    assert out.dtype == torch.float32
    assert torch.equal(out, disp.combine(y, handle))
    out_w = moe_unpermute(y, inverse, order, k, weights)
    assert torch.equal(out_w, disp.combine(y, handle, weighted=True))
    # weighted unpermute == index_add_ of the weighted copies onto their tokens
    token_of_copy = order // k
    w_sorted = weights.detach().reshape(-1)[order]
    expect = torch.zeros(t, d, device=DEVICE).index_add_(0, token_of_copy,
                                                          y.detach() * w_sorted[:, None])
    close(out_w, expect, what="vs index_add_")
    g = randn(t, d)
    for a, r, name in zip(grads([out_w], (y, weights), [g]),
                          grads([moe_unpermute_ref(y, inverse, k, weights)], (y, weights), [g]),
                          ("dy", "dweights")):
        close(a, r, what=name)


def test_roundtrip_identity_and_determinism():
    """permute ∘ unpermute is the identity bit for bit (k = 1; fp16 rows), one expert receiving
    every token, and repeated runs are bitwise equal (gathers only, no atomics)."""
    t, d = 11, 40
    x = randn(t, d, dtype=torch.float16)
    ids = torch.full((t, 1), 3, device=DEVICE)
    x_sorted, counts, order, inverse = moe_permute(x, ids, 5)
    assert counts.tolist() == [0, 0, 0, t, 0]
    back = moe_unpermute(x_sorted, inverse, order, 1)
    assert torch.equal(back, x.float())
    ids2 = _routes(t, 2, 5)
    runs = []
    for _ in range(2):
        xs, _, order2, inverse2 = moe_permute(x, ids2, 5)
        runs.append(moe_unpermute(xs * 3, inverse2, order2, 2, torch.rand(t, 2, generator=
                                  torch.Generator().manual_seed(1)).to(DEVICE)))
    assert torch.equal(runs[0], runs[1])
