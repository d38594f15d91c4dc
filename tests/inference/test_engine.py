"""The rollout engine (`model/engine.py`) against `generate`: continuous batching and shared
prompt prefixes change when rows are computed, not what they compute.

Greedy tokens must equal `generate`'s exactly (ragged prompts, EOS mid-batch, more requests
than rows so finished rows are refilled, n samples forked from one prefill). Log-probs are
compared to 1e-5: the same fp32 computation in batches of other sizes, whose matmuls may sum in
another order (~1e-6 on log-probs of order 1-10).
"""

import pytest
import torch

from model.engine import Engine
from model.generation import generate

PROMPTS = [[0, 5, 9, 13], [0, 7], [0, 3, 3, 8, 21, 40, 2], [0, 11, 12], [0, 99, 98, 97, 96]]


def engine_tokens(model, prompts, max_batch, n=1, **kw):
    engine = Engine(model, max_batch=max_batch, temperature=0.0, return_logprobs=True, **kw)
    ids = [engine.add(p, n=n, max_new_tokens=12) for p in prompts]
    out = engine.run()
    return [out[i] for i in ids], engine


@pytest.mark.parametrize("max_batch", [2, 8])
def test_greedy_equals_generate_with_refill_and_eos(micro_model, max_batch):
    probe = generate(micro_model, PROMPTS, max_new_tokens=12, temperature=0.0)
    eos = probe.tokens[0][3]  # the first prompt stops mid-batch, at its 4th token
    ref = generate(micro_model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos,
                   return_logprobs=True)
    outs, engine = engine_tokens(micro_model, PROMPTS, max_batch, eos_id=eos)
    assert [o.tokens[0] for o in outs] == ref.tokens
    assert [o.finish_reasons[0] for o in outs] == ref.finish_reasons
    assert "eos" in ref.finish_reasons and "length" in ref.finish_reasons
    for o, want in zip(outs, ref.raw_logprobs):
        torch.testing.assert_close(o.raw_logprobs[0], want, rtol=1e-5, atol=1e-5)
    if max_batch == 2:  # five requests through two rows: rows were refilled
        assert engine.stats["steps"] > max(len(t) for t in ref.tokens)


def test_forked_samples_equal_separate_prompts(micro_model):
    """n samples share one prefill; under greedy decoding each equals the prompt run alone."""
    outs, engine = engine_tokens(micro_model, PROMPTS[:2], max_batch=8, n=3)
    ref = generate(micro_model, [p for p in PROMPTS[:2] for _ in range(3)], max_new_tokens=12,
                   temperature=0.0)
    assert [t for o in outs for t in o.tokens] == ref.tokens
    assert engine.stats["prefill_tokens"] == sum(len(p) for p in PROMPTS[:2])  # once each


def test_sampled_rows_are_reproducible_and_bad_requests_rejected(micro_model):
    def sample(seed):
        engine = Engine(micro_model, max_batch=4, temperature=1.0, seed=seed)
        ids = [engine.add(p, n=2, max_new_tokens=6) for p in PROMPTS[:3]]
        out = engine.run()
        return [out[i].tokens for i in ids]

    assert sample(3) == sample(3)
    engine = Engine(micro_model, max_batch=4)
    with pytest.raises(ValueError, match="n=5"):
        engine.add([0, 1], n=5)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add([])
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        engine.add([0, 1], max_new_tokens=-1)


def test_per_request_parameters_and_seeds(micro_model):
    """A request's own seed makes its samples independent of what else runs; a greedy request
    among sampled ones still equals `generate`'s greedy output."""
    def seeded(others: int):
        engine = Engine(micro_model, max_batch=8, temperature=1.0, seed=11)
        mine = engine.add(PROMPTS[0], n=2, max_new_tokens=8, temperature=0.8, top_k=20, seed=5)
        greedy = engine.add(PROMPTS[1], max_new_tokens=8, temperature=0.0)
        for p in PROMPTS[2:2 + others]:
            engine.add(p, n=2, max_new_tokens=8)
        out = engine.run()
        return out[mine].tokens, out[greedy].tokens[0]

    alone, greedy_alone = seeded(0)
    crowded, greedy_crowded = seeded(3)
    assert alone == crowded and alone[0] != alone[1]
    ref = generate(micro_model, [PROMPTS[1]], max_new_tokens=8, temperature=0.0)
    assert greedy_alone == greedy_crowded == ref.tokens[0]
    with pytest.raises(ValueError, match="top_p=0"):
        Engine(micro_model).add([0, 1], top_p=0.0)


def test_routes_and_kept_sets_equal_generate(micro_model):
    """Keep Routing and Keep Sampling Mask through the engine: greedy rows (refilled through
    two slots, one request forked to two samples) return `generate`'s routes for prompt and
    generated tokens, and its kept sets."""
    ref = generate(micro_model, PROMPTS, max_new_tokens=10, temperature=0.0,
                   return_routes=True, return_sampling_mask=True)
    engine = Engine(micro_model, max_batch=3, temperature=0.0, return_routes=True,
                    return_sampling_mask=True)
    ids = [engine.add(p, n=2 if i == 2 else 1, max_new_tokens=10) for i, p in enumerate(PROMPTS)]
    out = engine.run()
    for i, want in enumerate(ref.routes):
        for sample in range(len(out[ids[i]].tokens)):
            assert out[ids[i]].tokens[sample] == ref.tokens[i]
            assert torch.equal(out[ids[i]].routes[sample], want)
            got, kept = out[ids[i]].kept_sets[sample], ref.kept_sets[i]
            assert torch.equal(got.ids, kept.ids) and torch.equal(got.counts, kept.counts)


def test_sampled_single_request_equals_generate(micro_model):
    """One request alone draws from the engine's generator exactly as `generate` draws for
    the same single row: tokens, log-probs and top-k kept sets equal."""
    kw = dict(temperature=0.9, top_k=7, seed=4)
    ref = generate(micro_model, [PROMPTS[2]], max_new_tokens=12, return_logprobs=True,
                   return_sampling_mask=True, **kw)
    engine = Engine(micro_model, max_batch=4, return_logprobs=True, return_sampling_mask=True,
                    **kw)
    engine.add(PROMPTS[2], max_new_tokens=12)
    out = engine.run()[0]
    assert out.tokens == ref.tokens
    torch.testing.assert_close(out.logprobs[0], ref.logprobs[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.kept_sets[0].ids, ref.kept_sets[0].ids)
    assert int(out.kept_sets[0].counts.max()) <= 7


def test_driven_engine_grows_cache_cancels_and_stops(micro_model):
    """Stepping by hand: a request added while others run (a longer one: the slot cache grows
    and the running rows keep their state), a cancelled request, and per-request stop
    sequences; every other output still equals `generate`'s."""
    long_prompt = [0] + list(range(30, 90))
    ref = generate(micro_model, [PROMPTS[0], long_prompt], max_new_tokens=20, temperature=0.0)
    stop = ref.tokens[1][4:6]
    engine = Engine(micro_model, max_batch=4, temperature=0.0)
    first = engine.add(PROMPTS[0], max_new_tokens=20)
    doomed = engine.add(PROMPTS[1], max_new_tokens=20)
    done, seen = [], []
    with engine.inference():
        done += engine.step()
        small = engine.cache.max_len
        late = engine.add(long_prompt, max_new_tokens=20, stop=[stop],
                          on_token=lambda s, t: seen.append(t))
        engine.cancel(doomed)
        while engine.busy:
            done += engine.step()
    assert engine.cache.max_len > small
    assert sorted(done) == [first, doomed, late]
    assert engine.output(doomed).finish_reasons == ["cancelled"]
    assert engine.output(first).tokens[0] == ref.tokens[0]
    got = engine.output(late)
    assert got.tokens[0] == ref.tokens[1][:6] == seen and got.finish_reasons == ["stop"]


@pytest.mark.parametrize("routes", [False, True])
def test_continued_sample_equals_the_transcript_prefilled_again(micro_model, routes):
    """A parked sample continued with a few more tokens (a tool result) generates what a fresh
    request over the whole transcript generates, with the transcript's routes, while feeding
    only the new tokens (and the parent's last token, when its row was not fed it)."""
    engine = Engine(micro_model, max_batch=4, temperature=0.0, return_routes=routes,
                    return_logprobs=True)
    first = engine.add(PROMPTS[2], n=2, max_new_tokens=6, keep=True)
    other = engine.add(PROMPTS[0], max_new_tokens=9)
    tool = [7, 8, 9, 10]
    with engine.inference():
        while first not in engine.step():
            pass
        turn = engine.output(first).tokens[0]
        before = engine.stats["prefill_tokens"]
        nxt = engine.add(tool, parent=(first, 0), max_new_tokens=8, keep=True)
        engine.drop(first, 1)
        with pytest.raises(ValueError, match="no parked sample"):
            engine.add(tool, parent=(first, 1))
        while engine.busy:
            engine.step()
    fed = engine.stats["prefill_tokens"] - before
    assert fed == len(tool) + (0 if routes else 1)
    transcript = PROMPTS[2] + turn + tool
    ref = generate(micro_model, [transcript], max_new_tokens=8, temperature=0.0,
                   return_routes=routes, return_logprobs=True)
    got = engine.output(nxt)
    assert got.tokens == ref.tokens and engine.output(other).finish_reasons == ["length"]
    torch.testing.assert_close(got.raw_logprobs[0], ref.raw_logprobs[0], rtol=1e-5, atol=1e-5)
    if routes:
        assert torch.equal(got.routes[0], ref.routes[0])


def test_bucketed_batches_pad_with_free_slots_and_change_nothing(micro_model):
    """`buckets=True` (the default for CUDA graphs): each decode forward runs a power-of-two
    batch, free slots decoding a pad token at position 0; the real rows' tokens, log-probs
    and routes are those of the unpadded engine (1e-5: the same fp32 computation in a batch
    of another size), through refills and a parked row's continuation."""
    seen = []

    def run(buckets):
        engine = Engine(micro_model, max_batch=7, temperature=0.0, buckets=buckets,
                        return_logprobs=True, return_routes=True)
        if buckets:
            step = engine.decode_fn
            engine.decode_fn = lambda m, tok, view, r: seen.append(len(tok)) or step(m, tok,
                                                                                   view, r)
        ids = [engine.add(p, n=2, max_new_tokens=5 + 2 * i, keep=i == 0)
               for i, p in enumerate(PROMPTS)]
        with engine.inference():
            while ids[0] not in engine.step():
                pass
            ids.append(engine.add([3, 4, 5], parent=(ids[0], 1), max_new_tokens=6))
            while engine.busy:
                engine.step()
        return [engine.output(i) for i in ids]

    plain, padded = run(False), run(True)
    assert set(seen) <= {2, 4, 7} and len(set(seen)) > 1 and len(seen) > 10
    for a, b in zip(plain, padded):
        assert a.tokens == b.tokens
        for x, y in zip(a.raw_logprobs, b.raw_logprobs):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        for x, y in zip(a.routes, b.routes):
            assert torch.equal(x, y)


def test_compiled_decode_step_equals_eager():
    """`compile=...`: the static, sync-free decode step traced by `torch.compile` as one graph
    with a dynamic batch (rows finish and are refilled) gives the eager engine's greedy tokens,
    routes, and log-probs within 1e-4 (fp32; a compiler may fuse and reorder reductions, ~1e-6
    relative on values of order 1-10); after the weights change in place (a training step)
    the same graph serves the new weights, still equal to eager; the whole step is one graph
    (no graph break, no recompile as the batch shrinks, none when a wrapper's hook state
    changes: DeepSpeed's forward pre-hook reads its step counter). The `eager` backend runs the graph
    Dynamo captures (what inductor would compile) without generating C++ kernels, which take
    minutes on this CPU; `python bench/generate.py --compile` and `python
    bench/rollout_engine.py --compile` check inductor's tokens against `generate`. A
    two-layer model (sliding window, then CSA with its indexer) keeps the trace short."""
    from torch._dynamo.utils import counters

    from tests.inference.conftest import build_model, micro_config

    model = build_model(micro_config(compress_ratios=(0, 4, 0), n_layers=2, n_mtp_layers=1,
                                      n_hash_layers=1))

    def run(compile, buckets=None):
        engine = Engine(model, max_batch=4 if buckets else 3, temperature=0.0,
                        compile=compile, return_logprobs=True, return_routes=True,
                        buckets=buckets)
        # equal budgets: the batch goes 3 -> 2 and never to 1 (a second trace, specialised)
        ids = [engine.add(p, n=2 if i == 1 else 1, max_new_tokens=9)
               for i, p in enumerate(PROMPTS[:4])]
        out = engine.run()
        return [out[i] for i in ids]

    def check(eager_run, compiled_run):
        for eager, compiled in zip(eager_run, compiled_run):
            assert compiled.tokens == eager.tokens
            for a, b in zip(eager.raw_logprobs, compiled.raw_logprobs):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            for a, b in zip(eager.routes, compiled.routes):
                assert torch.equal(a, b)

    class Timer:  # a training wrapper's hook state, as DeepSpeed's throughput timer
        global_step_count = 0

    timer = Timer()

    def bookkeeping(module, args, kwargs):
        if timer.global_step_count >= 0:
            timer.global_step_count += 0
        return None

    model.register_forward_pre_hook(bookkeeping, with_kwargs=True)
    before = run(False)
    earlier = counters["stats"]["unique_graphs"]  # other tests in this process compile too
    check(before, run("eager"))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == earlier + 1
    timer.global_step_count = 7  # an optimizer step: not traced, so no recompile
    check(before, run("eager"))
    assert counters["stats"]["unique_graphs"] == graphs
    # buckets at max_batch 4: the batch goes 4 -> 1, run as 4 -> 2: the same graph
    check(before, run("eager", buckets=True))
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    after = run(False)
    assert [r.tokens for r in after] != [r.tokens for r in before]
    check(after, run("eager"))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for new weights
