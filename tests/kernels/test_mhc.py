"""mHC coefficient kernel (pre/post/Sinkhorn comb in one launch) vs reference and model."""

import pytest
import torch

from v4kernels import hc_split_sinkhorn, hc_split_sinkhorn_ref, sinkhorn_gemm, sinkhorn_ref
from model.mhc import HyperConnectionSite, hc_mixes, hc_pre, n_mix, sinkhorn
from tests.kernels._util import DEVICE, close, grads, randn

EPS = 1e-6


def _inputs(tokens, hc):
    mixes = randn(*tokens, n_mix(hc), scale=2.0, grad=True)
    scale = (torch.rand(3) + 0.5).to(DEVICE).requires_grad_()
    base = randn(n_mix(hc), grad=True)
    return mixes, scale, base


@pytest.mark.parametrize("tokens, hc, iters", [((2, 9), 4, 20), ((5,), 3, 6), ((3,), 1, 2)])
def test_forward_backward_fp32(tokens, hc, iters):
    """hc=4 with the official 20 rounds over two token blocks (18 tokens, block 16); hc=3 and
    hc=1 exercise the padding of the hc×hc tile to a power of two."""
    mixes, scale, base = _inputs(tokens, hc)
    out = hc_split_sinkhorn(mixes, scale, base, hc, iters, EPS)
    assert type(out[0].grad_fn).__name__ == "_HcSplitSinkhornFnBackward"
    ref = hc_split_sinkhorn_ref(mixes, scale, base, hc, iters, EPS)
    for a, b, name in zip(out, ref, ("pre", "post", "comb")):
        assert a.shape == b.shape and a.dtype == torch.float32
        close(a, b, what=name)
    close(out[2].sum(-2), torch.ones_like(out[2].sum(-2)), atol=1e-5, rtol=0,
          what="comb columns")
    seeds = [randn(*o.shape) for o in out]
    for a, b, name in zip(grads(out, (mixes, scale, base), seeds),
                          grads(ref, (mixes, scale, base), seeds), ("dmixes", "dscale", "dbase")):
        close(a, b, what=name)


def test_backward_with_unused_outputs():
    """Only comb used (e.g. a test loss): the missing output gradients count as zero."""
    mixes, scale, base = _inputs((4,), 4)
    comb = hc_split_sinkhorn(mixes, scale, base, 4, 20, EPS)[2]
    comb_ref = hc_split_sinkhorn_ref(mixes, scale, base, 4, 20, EPS)[2]
    g = randn(4, 4, 4)
    for a, b in zip(grads([comb], (mixes, scale, base), [g]),
                    grads([comb_ref], (mixes, scale, base), [g])):
        close(a, b)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        hc_split_sinkhorn(randn(3, 20), randn(3), randn(24), 4, 20, EPS)


@pytest.mark.reference_only
def test_sinkhorn_reference_equals_model():
    logits = torch.randn(6, 4, 4) * 3
    assert torch.equal(sinkhorn_ref(logits, 20, EPS), sinkhorn(logits, 20, EPS))


@pytest.mark.reference_only
def test_reference_equals_model_hc_pre(monkeypatch):
    """pre/post/comb from the model's mixes reproduce hc_pre bit for bit."""
    monkeypatch.setenv("V4_KERNELS", "ref")
    hc, dim = 4, 8
    owner = torch.nn.Module()
    HyperConnectionSite.create(owner, "attn", hc, dim)
    HyperConnectionSite.init(owner, "attn", hc, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        owner.hc_attn_scale.copy_(torch.tensor([0.7, 1.3, 2.0]))
    x = torch.randn(2, 3, hc, dim)
    fn, base, scale = owner.hc_attn_fn, owner.hc_attn_base, owner.hc_attn_scale
    x_in, post, comb = hc_pre(x, fn, base, scale, 20, EPS, EPS)
    pre_k, post_k, comb_k = hc_split_sinkhorn(hc_mixes(x, fn, EPS), scale, base, hc, 20, EPS)
    assert torch.equal(post_k, post) and torch.equal(comb_k, comb)
    assert torch.equal(torch.einsum("bsj,bsjd->bsd", pre_k, x.float()).to(x.dtype), x_in)


def test_sinkhorn_gemm_equals_reference():
    """The CPU path's 4-op rounds (`baddbmm` sums) against the plain reference, values and
    gradients. Each normalisation divides by a 4-term sum that the GEMM may round 1 ulp
    differently, and 39 rounds compound at most a few ulps: rtol 1e-5 on values in (0, 1],
    gradients (magnitude ~1) atol 1e-5."""
    logits = (torch.randn(3, 5, 4, 4) * 3).requires_grad_()
    ref, fast = sinkhorn_ref(logits, 20, EPS), sinkhorn_gemm(logits, 20, EPS)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
    g = torch.randn_like(ref)
    (d_ref,) = torch.autograd.grad(ref, logits, g)
    (d_fast,) = torch.autograd.grad(fast, logits, g)
    torch.testing.assert_close(d_fast, d_ref, rtol=1e-4, atol=1e-5)
