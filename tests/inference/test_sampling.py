"""Sampling distribution: greedy, temperature, top-k, top-p kept sets, exact draws, seeding;
kept sets as index lists (`KeptSets`) and the training-side renormalisation over them."""

import math

import pytest
import torch

from model.sampling import (KeptSets, SamplingParams, draw, logprobs_over_kept, restricts,
                            sampling_distribution)


def test_greedy_keeps_only_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    logp, keep = sampling_distribution(logits, SamplingParams(temperature=0))
    assert keep.tolist() == [[False, True, False], [True, False, False]]
    assert logp[0, 1] == 0 and logp[1, 0] == 0


def test_temperature_scales_the_softmax():
    logits = torch.randn(2, 11)
    logp, keep = sampling_distribution(logits, SamplingParams(temperature=0.5))
    assert keep.all()
    torch.testing.assert_close(logp, torch.log_softmax(logits / 0.5, -1))


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    logp, keep = sampling_distribution(logits, SamplingParams(top_k=2))
    assert keep.tolist() == [[False, True, False, True, False]]
    torch.testing.assert_close(logp[0, [1, 3]].exp().sum(), torch.tensor(1.0))
    assert torch.isinf(logp[0, [0, 2, 4]]).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    for p, kept in [(0.5, 1), (0.51, 2), (0.75, 2), (0.76, 3), (0.95, 4), (1e-6, 1)]:
        _, keep = sampling_distribution(probs.log(), SamplingParams(top_p=p))
        assert keep.sum().item() == kept, p
        assert keep[0, :kept].all()
    logp, _ = sampling_distribution(probs.log(), SamplingParams(top_p=0.8))
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.5, 0.25, 0.15, 0]]) / 0.9)


def test_top_k_then_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    _, keep = sampling_distribution(probs.log(), SamplingParams(top_k=3, top_p=0.75))
    # top-k renormalises to 4/9, 3/9, 2/9: the first two reach 7/9 >= 0.75
    assert keep.tolist() == [[True, True, False, False]]


def test_draws_follow_the_distribution_and_the_seed():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logp = probs.log().expand(20000, 4).contiguous()
    tokens = draw(logp, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[3] == 0
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / len(tokens))
    again = draw(logp, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-2)])
def test_bad_parameters_are_rejected(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw).validate()


# ------------------------------------------------------------------------- kept sets (CSR)
def _random_mask(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, vocab, generator=g) < 0.3
    mask[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] = True  # >= 1 kept
    return mask


def test_kept_sets_round_trip_cat_and_select():
    a, b = _random_mask(5, 37, 0), _random_mask(3, 37, 1)
    ka, kb = KeptSets.from_mask(a), KeptSets.from_mask(b)
    assert ka.ids.dtype == ka.counts.dtype == torch.int32 and len(ka) == 5
    assert ka.counts.tolist() == a.sum(1).tolist()
    for r in range(5):  # ascending ids within each row
        row = ka.ids[ka.offsets[r]:ka.offsets[r + 1]]
        assert row.tolist() == a[r].nonzero()[:, 0].tolist()
    assert torch.equal(ka.to_mask(37), a)
    both = KeptSets.cat([ka, kb])
    assert len(both) == 8 and torch.equal(both.to_mask(37), torch.cat([a, b]))
    assert len(KeptSets.cat([])) == 0 and KeptSets.cat([]).to_mask(37).shape == (0, 37)
    picked = both.select([6, 0, 6])
    assert torch.equal(picked.to_mask(37), torch.cat([b[1:2], a[0:1], b[1:2]]))
    assert len(both.select(torch.zeros(0, dtype=torch.long))) == 0


def test_kept_sets_reject_empty_rows_and_bad_fields():
    """A kept set always holds at least the most likely token, so an empty row is corrupt."""
    mask = _random_mask(4, 10, 2)
    mask[2] = False
    with pytest.raises(ValueError, match=r"counts\[2\]=0"):
        KeptSets.from_mask(mask)
    with pytest.raises(ValueError, match="counts sum to 3"):
        KeptSets(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="KeptSets.ids"):
        KeptSets(torch.tensor([1, 2]), torch.tensor([2], dtype=torch.int32))  # int64
    with pytest.raises(ValueError, match="mask"):
        KeptSets.from_mask(mask.float())
    with pytest.raises(ValueError, match="select"):
        KeptSets.from_mask(_random_mask(2, 10, 3)).select([2])


@pytest.mark.parametrize("params, vocab, expect", [
    (SamplingParams(temperature=0), 10, True), (SamplingParams(top_p=0.9), 10, True),
    (SamplingParams(top_k=5), 10, True), (SamplingParams(top_k=10), 10, False),
    (SamplingParams(top_k=10), None, True), (SamplingParams(temperature=0.7), 10, False)])
def test_restricts(params, vocab, expect):
    assert restricts(params, vocab) is expect
    if not expect:  # the claim behind storing nothing: the kept set is the whole vocabulary
        assert sampling_distribution(torch.randn(3, 10), params)[1].all()


COMBOS = [SamplingParams(0.7, 1.0, 0), SamplingParams(1.0, 1.0, 5), SamplingParams(0.7, 0.9, 0),
          SamplingParams(0.7, 0.8, 20), SamplingParams(1.3, 0.5, 3), SamplingParams(0.5, 0.95, 40)]


@pytest.mark.parametrize("params", COMBOS, ids=str)
def test_logprobs_over_kept_equal_the_sampler_with_dense_gradient(params):
    """Same fp32 ingredients as `sampling_distribution` (logits / T, then a log-sum-exp over
    the kept logits) in another summation order: a few ulps of |lse| <= ~10, so 1e-5 absolute
    is loose; the gradient entries are probabilities (<= 1), compared at 1e-6."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(16, 64, generator=g) * 3).requires_grad_()
    logp, keep = sampling_distribution(logits.detach(), params)
    tokens = draw(logp, g)
    kept = KeptSets.from_mask(keep) if restricts(params, 64) else None
    assert (kept is None) == bool(keep.all())
    got = logprobs_over_kept(logits, tokens, kept, params.temperature)
    assert got.dtype == torch.float32 and got.shape == (16,)
    torch.testing.assert_close(got.detach(), logp.gather(1, tokens[:, None])[:, 0],
                               rtol=0, atol=1e-5)
    weight = torch.randn(16, generator=g)
    (grad,) = torch.autograd.grad((got * weight).sum(), logits)
    dense = torch.log_softmax((logits / params.temperature).masked_fill(~keep, float("-inf")),
                              -1).gather(1, tokens[:, None])[:, 0]
    (want,) = torch.autograd.grad((dense * weight).sum(), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)
    assert (grad[~keep] == 0).all()  # dropped tokens get no gradient


def test_logprobs_over_kept_bf16_greedy_and_errors():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 30, generator=g).bfloat16()
    params = SamplingParams(0.7, 0.9, 10)
    logp, keep = sampling_distribution(logits, params)  # upcasts to fp32 itself
    tokens = draw(logp, g)
    got = logprobs_over_kept(logits, tokens, KeptSets.from_mask(keep), 0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, logp.gather(1, tokens[:, None])[:, 0], rtol=0, atol=1e-5)
    # greedy: the kept set is the argmax alone, log-prob exactly 0 at any temperature
    _, greedy = sampling_distribution(logits, SamplingParams(temperature=0))
    top = logits.float().argmax(-1)
    assert (logprobs_over_kept(logits, top, KeptSets.from_mask(greedy), 1.0) == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        logprobs_over_kept(logits, top, KeptSets.from_mask(greedy), 0.0)
    outside = top.clone()
    outside[3] = (top[3] + 1) % 30
    with pytest.raises(ValueError, match=r"tokens\[3\].*row 3"):
        logprobs_over_kept(logits, outside, KeptSets.from_mask(greedy), 1.0)
    with pytest.raises(ValueError, match="rows"):
        logprobs_over_kept(logits[:5], top[:5], KeptSets.from_mask(greedy), 1.0)
    with pytest.raises(ValueError, match="tokens"):
        logprobs_over_kept(logits, top[:, None], None, 1.0)
