"""MTP speculative decoding (`generate(..., speculative=True)`): greedy output is plain greedy
output token for token (ragged prompts, EOS inside a speculated pair, routes and kept sets
included); sampled output keeps the exact distribution of plain sampling; the log-probs and
routes it returns are the main model's, so a replayed training forward reproduces them.

The micro model has a 16-token vocabulary, so that its random MTP block agrees with the main
model often enough for both the accept and the reject path to run many times (each test
asserts that both did), and so that the sampled distribution can be checked cell by cell."""

import pytest
import torch

from model.generation import generate
from model.sampling import SamplingParams, logprobs_over_kept, sampling_distribution
from tests.inference.conftest import build_model, micro_config

PROMPTS = [[0, 5, 9], [0] + [3, 7, 11, 2, 14, 6, 8, 12, 4, 10, 13, 9, 5, 15], [0, 7],
           [0, 2, 4, 6, 8, 10, 12]]


@pytest.fixture(scope="module")
def small_vocab_model():
    return build_model(micro_config(vocab_size=16), seed=1)


def _both_paths_ran(stats) -> None:
    assert 0 < stats["accepted"] < stats["drafted"], stats


def test_greedy_equals_plain_greedy_with_eos_inside_a_speculated_pair(small_vocab_model):
    """fp32: a two-token verify chunk and two one-token steps differ by rounding only (~1e-6
    on O(1) logits), so greedy picks agree unless two logits tie that closely, which random
    weights make vanishingly rare; raw log-probs are compared at 1e-4 (the same argument as
    tests/inference/test_generation.py). Five EOS ids each end rows at different points, so
    EOS falls on accepted drafts, on bonus tokens and on replacements of rejected drafts."""
    model = small_vocab_model
    kw = dict(max_new_tokens=40, temperature=0, return_logprobs=True, return_routes=True,
              return_sampling_mask=True)
    plain = generate(model, PROMPTS, **kw)
    spec = generate(model, PROMPTS, speculative=True, **kw)
    assert spec.tokens == plain.tokens
    _both_paths_ran(spec.stats)
    stopped_early = 0
    for eos in (1, 4, 9, 12, 15):
        a = generate(model, PROMPTS, eos_id=eos, **kw)
        b = generate(model, PROMPTS, eos_id=eos, speculative=True, **kw)
        assert b.tokens == a.tokens, eos
        assert b.finish_reasons == a.finish_reasons, eos
        stopped_early += sum(r == "eos" for r in a.finish_reasons)
        for i in range(len(PROMPTS)):
            assert torch.equal(b.routes[i], a.routes[i]), (eos, i)
            torch.testing.assert_close(b.raw_logprobs[i], a.raw_logprobs[i], rtol=0, atol=1e-4)
            assert torch.equal(b.logprobs[i], a.logprobs[i])
            assert torch.equal(b.kept_sets[i].ids, a.kept_sets[i].ids)
    assert stopped_early >= 5  # EOS ends rows mid-generation in many of the runs


def test_sampled_distribution_is_exactly_plain_sampling(small_vocab_model):
    """6000 copies of one prompt, temperature 1 and top-p 0.9: the empirical distributions of
    the 2nd and 3rd generated tokens (the first speculated, and a bonus-or-next one) against the
    exact ones computed from full forwards over every continuation. Chi-square over the 16
    cells (cells expected below 5 merged): a correct sampler gives ~chi2(<=15), mean <= 15, and
    is beyond 50 with probability < 1e-5. Measured at this seed: 16 and 33 (plain sampling
    gives 14 and 8; at 24000 copies both are at 6-10, so the 33 is noise); with the residual
    replaced by p the 2nd token's is 176, with every draft accepted 281: the 2nd token is where
    the accept/reject rule acts."""
    model, cfg = small_vocab_model, small_vocab_model.cfg
    params = SamplingParams(1.0, 0.9, 0)
    prompt, n = [0, 5, 9, 3], 6000
    out = generate(model, [prompt] * n, max_new_tokens=3, temperature=1.0, top_p=0.9, seed=11,
                   speculative=True)
    _both_paths_ran(out.stats)
    toks = torch.tensor(out.tokens)  # [n, 3]
    with torch.no_grad():
        p1 = sampling_distribution(model(torch.tensor([prompt])).logits[:, -1], params)[0][0].exp()
        v = cfg.vocab_size
        pairs = torch.tensor([prompt + [a] for a in range(v)])
        p2 = sampling_distribution(model(pairs).logits[:, -1], params)[0].exp()  # [v, v]
        triples = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
        p3 = sampling_distribution(model(triples).logits[:, -1], params)[0].exp()
    joint2 = p1[:, None] * p2                                  # [t1, t2]
    exact2 = joint2.sum(0)
    exact3 = (joint2.reshape(-1, 1) * p3).sum(0)
    for column, exact in ((1, exact2), (2, exact3)):
        counts = torch.bincount(toks[:, column], minlength=v).double()
        assert _chi2(counts, exact.double() * n) < 50, (column, counts, exact * n)


def _chi2(observed: torch.Tensor, expected: torch.Tensor) -> float:
    small = expected < 5
    obs = torch.cat((observed[~small], observed[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


def test_returned_logprobs_and_routes_are_the_main_models(small_vocab_model):
    """A training forward over prompt + generated tokens with the returned routes replayed and
    the kept sets applied gives back the returned log-probs (1e-4: the cached-vs-full argument
    of tests/inference/test_generation.py), at temperature 0.8 with top-k 6."""
    model, cfg = small_vocab_model, small_vocab_model.cfg
    out = generate(model, PROMPTS, max_new_tokens=20, temperature=0.8, top_k=6, seed=2,
                   eos_id=1, return_logprobs=True, return_routes=True,
                   return_sampling_mask=True, speculative=True)
    _both_paths_ran(out.stats)
    for i, prompt in enumerate(PROMPTS):
        gen = out.tokens[i]
        seq = torch.tensor([list(prompt) + gen])
        assert out.routes[i].shape[0] == seq.shape[1]
        replay = [r[None] for r in out.routes[i].unbind(1)] + [None] * cfg.n_mtp_layers
        with torch.no_grad():
            fwd = model(seq, routes=replay)
            free = model(seq)
        for layer in range(cfg.n_layers):  # the routes are the ones the model itself picks
            assert torch.equal(free.routes[layer][0], out.routes[i][:, layer])
        logits = fwd.logits[0, len(prompt) - 1:len(prompt) - 1 + len(gen)]
        got = logprobs_over_kept(logits, torch.tensor(gen), out.kept_sets[i], 0.8)
        torch.testing.assert_close(got, out.logprobs[i], rtol=0, atol=1e-4)
        raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None])[:, 0]
        torch.testing.assert_close(out.raw_logprobs[i], raw, rtol=0, atol=1e-4)


def test_refuses_a_model_without_mtp():
    model = build_model(micro_config(vocab_size=16, n_mtp_layers=0,
                                     compress_ratios=(0, 4, 8, 4)))
    with pytest.raises(ValueError, match="no MTP block"):
        generate(model, PROMPTS, max_new_tokens=4, speculative=True)
