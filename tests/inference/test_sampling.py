"""Sampling distribution: greedy, temperature, top-k, top-p kept sets, exact draws, seeding."""

import math

import pytest
import torch

from model.sampling import SamplingParams, draw, sampling_distribution


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
