"""MTP speculation inside the rollout engine (`model/speculative_engine.py`): the engine's
scheduling (refills, forked prefixes, parked and continued rows) with the draft-and-verify step
of `model/speculative.py` changes how many tokens a step emits, not which ones.

The micro model has a 16-token vocabulary so that its random MTP block agrees with the main
model often enough for the accept and the reject path to run many times (each test asserts
that both did; the argument of tests/inference/test_speculative.py). Greedy tokens must equal
plain `generate`'s exactly: a two-token verify chunk differs from two one-token steps by fp32
rounding only (~1e-6 on O(1) logits), which flips an argmax only at a tie that close. Log-probs
are compared at 1e-4 for the same reason (raw log-probs are O(1-10))."""

import pytest
import torch

from model.engine import Engine
from model.generation import generate
from model.sampling import SamplingParams, logprobs_over_kept, sampling_distribution
from model.speculative_engine import SpeculativeEngine
from tests.inference.conftest import build_model, micro_config
from tests.inference.test_speculative import PROMPTS, _chi2


@pytest.fixture(scope="module")
def model():
    return build_model(micro_config(vocab_size=16), seed=1)


def both_paths_ran(stats) -> None:
    assert 0 < stats["accepted"] < stats["drafted"], stats


def run(model, prompts, max_batch, n=1, max_new_tokens=30, **kw):
    engine = SpeculativeEngine(model, max_batch=max_batch, **kw)
    ids = [engine.add(p, n=n, max_new_tokens=max_new_tokens) for p in prompts]
    out = engine.run()
    return [out[i] for i in ids], engine


@pytest.mark.parametrize("max_batch", [2, 8])
def test_greedy_equals_plain_generate_with_refill_eos_routes_and_kept_sets(model, max_batch):
    """Five EOS ids end rows on accepted drafts, bonus tokens and replacements; two rows for
    four prompts make the engine refill slots."""
    kw = dict(temperature=0.0, return_logprobs=True, return_routes=True,
              return_sampling_mask=True)
    stopped = 0
    for eos in (None, 1, 4, 9, 12):
        ref = generate(model, PROMPTS, max_new_tokens=30, eos_id=eos, **kw)
        outs, engine = run(model, PROMPTS, max_batch, eos_id=eos, **kw)
        assert [o.tokens[0] for o in outs] == ref.tokens, eos
        assert [o.finish_reasons[0] for o in outs] == ref.finish_reasons, eos
        both_paths_ran(engine.stats)
        stopped += ref.finish_reasons.count("eos")
        for i, o in enumerate(outs):
            assert torch.equal(o.routes[0], ref.routes[i]), (eos, i)
            torch.testing.assert_close(o.raw_logprobs[0], ref.raw_logprobs[i], rtol=0,
                                       atol=1e-4)
            assert torch.equal(o.logprobs[0], ref.logprobs[i])
            assert torch.equal(o.kept_sets[0].ids, ref.kept_sets[i].ids)
    assert stopped >= 5


def test_forked_samples_and_mixed_requests(model):
    """n greedy samples share one prefill and each equals its prompt alone; a sampled request
    with its own seed beside them draws the same tokens whatever else runs."""
    outs, engine = run(model, PROMPTS[:2], 8, n=3, temperature=0.0)
    ref = generate(model, [p for p in PROMPTS[:2] for _ in range(3)], max_new_tokens=30,
                   temperature=0.0)
    assert [t for o in outs for t in o.tokens] == ref.tokens
    assert engine.stats["prefill_tokens"] == sum(len(p) for p in PROMPTS[:2])

    def seeded(extra):
        engine = SpeculativeEngine(model, max_batch=8, temperature=0.0)
        mine = engine.add(PROMPTS[1], n=2, max_new_tokens=12, temperature=1.0, seed=5)
        for p in extra:
            engine.add(p, max_new_tokens=20)
        return engine.run()[mine].tokens, engine.stats

    alone, _ = seeded([])
    crowded, stats = seeded(PROMPTS)
    assert alone == crowded and alone[0] != alone[1]
    both_paths_ran(stats)


def test_sampled_distribution_is_exactly_plain_sampling(model):
    """6000 samples of one prompt at temperature 1, top-p 0.9 (n forked from one prefill,
    through 1000-row steps): the 2nd and 3rd tokens' empirical distributions against the exact
    ones from full forwards; chi-square threshold 50 as in tests/inference/test_speculative.py
    (a correct sampler gives ~chi2(<=15); beyond 50 with probability < 1e-5)."""
    params, cfg = SamplingParams(1.0, 0.9, 0), model.cfg
    prompt, n = [0, 5, 9, 3], 6000
    engine = SpeculativeEngine(model, max_batch=1000, temperature=1.0, top_p=0.9, seed=11)
    ids = [engine.add(prompt, n=1000, max_new_tokens=3) for _ in range(n // 1000)]
    out = engine.run()
    both_paths_ran(engine.stats)
    toks = torch.tensor([t for i in ids for t in out[i].tokens])  # [n, 3]
    v = cfg.vocab_size
    with torch.no_grad():
        p1 = sampling_distribution(model(torch.tensor([prompt])).logits[:, -1], params)[0][0]
        pairs = torch.tensor([prompt + [a] for a in range(v)])
        p2 = sampling_distribution(model(pairs).logits[:, -1], params)[0].exp()
        triples = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
        p3 = sampling_distribution(model(triples).logits[:, -1], params)[0].exp()
    joint2 = p1.exp()[:, None] * p2
    for column, exact in ((1, joint2.sum(0)), (2, (joint2.reshape(-1, 1) * p3).sum(0))):
        counts = torch.bincount(toks[:, column], minlength=v).double()
        assert _chi2(counts, exact.double() * n) < 50, (column, counts, exact * n)


def test_returned_logprobs_and_routes_replay_in_a_training_forward(model):
    out, engine = run(model, PROMPTS, 3, max_new_tokens=20, temperature=0.8, top_k=6, seed=2,
                      eos_id=1, return_logprobs=True, return_routes=True,
                      return_sampling_mask=True)
    both_paths_ran(engine.stats)
    cfg = model.cfg
    for o, prompt in zip(out, PROMPTS):
        gen = o.tokens[0]
        seq = torch.tensor([list(prompt) + gen])
        assert o.routes[0].shape[0] == seq.shape[1]
        replay = [r[None] for r in o.routes[0].unbind(1)] + [None] * cfg.n_mtp_layers
        with torch.no_grad():
            logits = model(seq, routes=replay).logits[0, len(prompt) - 1:-1]
        got = logprobs_over_kept(logits, torch.tensor(gen), o.kept_sets[0], 0.8)
        torch.testing.assert_close(got, o.logprobs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("routes", [False, True])
def test_continued_sample_equals_the_transcript_prefilled_again(model, routes):
    """Parked speculative rows continued with a tool result generate what plain `generate`
    does over the whole transcript, with the transcript's routes; the continuation feeds the
    new tokens plus at most the one token whose successor its MTP row had not read, for every
    one of several turn endings (EOS ids that end turns in different places of a round)."""
    tool = [7, 8, 9, 10]
    for eos in (1, 4, 9, 12):
        engine = SpeculativeEngine(model, max_batch=4, temperature=0.0, eos_id=eos,
                                   return_routes=routes, return_logprobs=True)
        first = engine.add(PROMPTS[1], n=2, max_new_tokens=20, keep=True)
        engine.add(PROMPTS[0], max_new_tokens=25)
        with engine.inference():
            while first not in engine.step():
                pass
            turns = engine.output(first).tokens
            before = engine.stats["prefill_tokens"]
            nxt = [engine.add(tool, parent=(first, s), max_new_tokens=12) for s in range(2)]
            engine.run()
        assert engine.stats["prefill_tokens"] - before <= 2 * (len(tool) + 1)
        for s in range(2):
            transcript = PROMPTS[1] + turns[s] + tool
            ref = generate(model, [transcript], max_new_tokens=12, temperature=0.0, eos_id=eos,
                           return_routes=routes, return_logprobs=True)
            got = engine.output(nxt[s])
            assert got.tokens == ref.tokens, (eos, s)
            torch.testing.assert_close(got.raw_logprobs[0], ref.raw_logprobs[0], rtol=0,
                                       atol=1e-4)
            if routes:
                assert torch.equal(got.routes[0], ref.routes[0]), (eos, s)


def test_top_logprobs_equal_the_plain_engine(model):
    def top(cls):
        engine = cls(model, max_batch=4, temperature=0.0)
        ids = [engine.add(p, max_new_tokens=10, top_logprobs=3) for p in PROMPTS]
        engine.run()
        return [engine.top_logprobs(i) for i in ids]

    for a, b in zip(top(Engine), top(SpeculativeEngine)):
        assert [t for t, _ in a[0]] == [t for t, _ in b[0]]
        torch.testing.assert_close(torch.tensor([v for _, v in a[0]]),
                                   torch.tensor([v for _, v in b[0]]), rtol=0, atol=1e-4)


def test_refusals():
    plain = build_model(micro_config(vocab_size=16, n_mtp_layers=0,
                                     compress_ratios=(0, 4, 8, 4)))
    with pytest.raises(ValueError, match="no MTP block"):
        SpeculativeEngine(plain)
    with pytest.raises(ValueError, match="compile"):
        SpeculativeEngine(build_model(micro_config(vocab_size=16)), compile=True)


@pytest.mark.parametrize("routes", [False, True])
def test_drafts_equal_speculative_generate_on_first_and_continued_turns(model, routes):
    """The outputs are exact whatever the drafts are, so this checks the MTP side: a row's
    drafts depend only on its MTP cache, so a one-row engine drafts and accepts exactly what
    `generate(speculative=True)` does over the same transcript, on a fresh prompt (the MTP
    block read the prefill chunk by chunk: prefill_chunk 3) and on a continued turn (the parked
    MTP row caught up and the main row rewound to it), for turns ending in different places of
    a round. After every step, each running row's MTP cache holds one position per main
    position except its pending ones (the invariant the drafts rest on)."""
    tool = [7, 8, 9, 10]

    def steps(engine):
        with engine.inference():
            while engine.busy:
                engine.step()
                k, cache = len(engine.active), engine.cache
                running = torch.tensor([engine.rows[r].finish is None for r in engine.active],
                                       dtype=torch.bool)
                gap = cache.main.lengths[:k] - cache.mtp.lengths[:k]
                assert torch.equal(gap[running], engine.pend_valid.sum(1)[running])

    for eos in (1, 4, 9, 12, 15):
        engine = SpeculativeEngine(model, max_batch=2, temperature=0.0, eos_id=eos,
                                   return_routes=routes, prefill_chunk=3)
        kw = dict(temperature=0.0, eos_id=eos, speculative=True, return_routes=routes)
        first = engine.add(PROMPTS[1], max_new_tokens=20, keep=True)
        steps(engine)
        turn = engine.output(first).tokens[0]
        ref = generate(model, [PROMPTS[1]], max_new_tokens=20, **kw)
        assert turn == ref.tokens[0]
        assert (engine.stats["drafted"], engine.stats["accepted"]) == \
            (ref.stats["drafted"], ref.stats["accepted"]), eos
        before = dict(engine.stats)
        nxt = engine.add(tool, parent=(first, 0), max_new_tokens=12)
        steps(engine)
        ref = generate(model, [PROMPTS[1] + turn + tool], max_new_tokens=12, **kw)
        assert engine.output(nxt).tokens == ref.tokens
        assert (engine.stats["drafted"] - before["drafted"],
                engine.stats["accepted"] - before["accepted"]) == \
            (ref.stats["drafted"], ref.stats["accepted"]), eos


def test_slot_caches_grow_together_for_a_longer_request_and_a_parked_row(model):
    """Both slot caches (main and MTP) are sized for the first requests and grown together
    when a longer one arrives; a row parked before the growth continues after it."""
    engine = SpeculativeEngine(model, max_batch=3, temperature=0.0, return_routes=True)
    a = engine.add([0, 5, 9], max_new_tokens=5, keep=True)
    engine.run()
    small = engine.cache.max_len
    long_prompt = [0] + [3, 7, 11, 2] * 20
    b = engine.add(long_prompt, max_new_tokens=40)
    c = engine.add([1, 2], parent=(a, 0), max_new_tokens=30)
    out = engine.run()
    assert engine.cache.max_len == engine.cache.mtp.max_len > small
    for got, transcript, new in ((out[b], long_prompt, 40),
                                 (out[c], [0, 5, 9] + out[a].tokens[0] + [1, 2], 30)):
        ref = generate(model, [transcript], max_new_tokens=new, temperature=0.0,
                       return_routes=True)
        assert got.tokens == ref.tokens and torch.equal(got.routes[0], ref.routes[0])
    both_paths_ran(engine.stats)
