"""`generate`: equals recomputing the full forward every step, returns what GRPO replays (routes,
log-probs, kept sets), stops where asked, and rejects bad prompts; a training forward with the
routes replayed and the kept sets applied reproduces the sampler's log-probs (Keep Routing +
Keep Sampling Mask)."""

import pytest
import torch

from model.generation import generate
from model.sampling import KeptSets, logprobs_over_kept

PROMPTS = [[0, 5, 9], [0] + list(range(10, 40)), [0, 7]]


@torch.no_grad()
def _naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq


def test_greedy_equals_full_recompute_and_returns_replayable_routes(micro_model):
    model, cfg = micro_model, micro_model.cfg
    model.train()
    out = generate(model, PROMPTS, max_new_tokens=24, temperature=0, return_logprobs=True,
                   return_routes=True, return_sampling_mask=True)
    assert out.finish_reasons == ["length"] * 3
    assert model.training  # restored
    model.eval()
    for i, prompt in enumerate(PROMPTS):
        seq = _naive_greedy(model, prompt, 24)
        assert out.tokens[i] == seq[len(prompt):]
        ids = torch.tensor([seq])
        with torch.no_grad():
            full = model(ids)
        routes = torch.stack(full.routes[:cfg.n_layers], dim=2)[0]  # [seq, layers, k]
        assert out.routes[i].shape == (len(seq), cfg.n_layers, cfg.n_activated_experts)
        assert torch.equal(out.routes[i], routes)
        # replaying the recorded routes reproduces the forward, in a training (autograd) forward
        replay = [r[None] for r in out.routes[i].unbind(1)] + [None] * cfg.n_mtp_layers
        again = model(ids, routes=replay).logits
        again.sum().backward()
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(again.detach(), full.logits, rtol=0, atol=0)
        logp = torch.log_softmax(full.logits[0, len(prompt) - 1:-1], -1)
        picked = logp.gather(1, torch.tensor(out.tokens[i])[:, None])[:, 0]
        torch.testing.assert_close(out.raw_logprobs[i], picked, rtol=0, atol=1e-4)
        assert (out.logprobs[i] == 0).all()  # greedy: a point mass
        kept = out.kept_sets[i]  # greedy keeps exactly the argmax
        assert isinstance(kept, KeptSets) and len(kept) == 24 and (kept.counts == 1).all()
        mask = kept.to_mask(cfg.vocab_size)
        assert mask[torch.arange(24), torch.tensor(out.tokens[i])].all()


def test_sampling_outputs_are_consistent_and_seeded(micro_model):
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.8, top_k=40, seed=5,
              return_logprobs=True, return_sampling_mask=True)
    a = generate(micro_model, PROMPTS, **kw)
    b = generate(micro_model, PROMPTS, **kw)
    assert a.tokens == b.tokens
    c = generate(micro_model, PROMPTS, **{**kw, "seed": 6})
    assert c.tokens != a.tokens
    for toks, logp, raw, kept in zip(a.tokens, a.logprobs, a.raw_logprobs, a.kept_sets):
        assert len(kept) == len(toks) and kept.ids.device.type == "cpu"
        assert kept.counts.min() >= 1 and kept.counts.max() <= 40
        mask = kept.to_mask(micro_model.cfg.vocab_size)
        assert mask[torch.arange(len(toks)), torch.tensor(toks)].all()  # drawn from the kept set
        assert (logp <= 0).all() and (logp >= raw).all()  # renormalised over a subset


def test_no_kept_sets_are_stored_when_sampling_keeps_the_whole_vocabulary(micro_model):
    vocab = micro_model.cfg.vocab_size
    for kw in (dict(temperature=0.9), dict(temperature=1.0, top_k=vocab)):
        out = generate(micro_model, PROMPTS, max_new_tokens=3, seed=0,
                       return_sampling_mask=True, **kw)
        assert out.kept_sets == [None] * len(PROMPTS), kw
    assert generate(micro_model, PROMPTS, max_new_tokens=3, top_k=5).kept_sets is None


def test_training_forward_with_replayed_routes_and_kept_sets_reproduces_sampler_logprobs(
        micro_model):
    """Keep Routing + Keep Sampling Mask end to end (posttraining.md §1.2 items 4-5).

    One full (no-cache) training forward over prompt + generated tokens with the sampler's
    routes replayed, renormalised over the stored kept sets at temperature 0.7, gives back the
    sampler's own log-probs. fp32 throughout; the cached decode and the full forward compute
    the same function with matmuls summed in another order (fp32 rounding ~1e-7 relative per
    op over a few layers; logits here are O(1), so logit differences ~1e-6, scaled by 1/0.7
    and at most doubled through the log-sum-exp; measured ~5e-7): 1e-4 absolute leaves a
    wide margin and is still far below the effect of dropping the mask (≈ log(vocab / kept)
    ≈ 3.4 here, checked > 1e-2). top_k=12 and top_p=0.9 both cut (11 tokens kept a step)."""
    model, cfg = micro_model, micro_model.cfg
    temperature = 0.7
    out = generate(model, PROMPTS, max_new_tokens=16, temperature=temperature, top_p=0.9,
                   top_k=12, seed=3, return_logprobs=True, return_sampling_mask=True,
                   return_routes=True)
    model.train()
    try:
        full_gap = []
        for i, prompt in enumerate(PROMPTS):
            gen = out.tokens[i]
            seq = torch.tensor([list(prompt) + gen])
            replay = [r[None] for r in out.routes[i].unbind(1)] + [None] * cfg.n_mtp_layers
            fwd = model(seq, routes=replay)
            for layer in range(cfg.n_layers):  # the replayed experts were used
                assert torch.equal(fwd.routes[layer][0], out.routes[i][:, layer])
            at = slice(len(prompt) - 1, len(prompt) - 1 + len(gen))  # positions predicting gen
            logits = fwd.logits[0, at]
            tokens = torch.tensor(gen)
            kept = out.kept_sets[i]
            assert len(kept) == len(gen) and bool((kept.counts <= 12).all())  # top_k cut
            got = logprobs_over_kept(logits, tokens, kept, temperature)
            torch.testing.assert_close(got.detach(), out.logprobs[i], rtol=0, atol=1e-4)
            got.sum().backward()  # a training loss through the renormalised log-probs
            grad = model.layers[-1].ffn.gate.weight.grad
            assert grad is not None and torch.isfinite(grad).all()
            model.zero_grad(set_to_none=True)
            whole = logprobs_over_kept(logits.detach(), tokens, None, temperature)
            full_gap.append((whole - out.logprobs[i]).abs().max())
        assert max(full_gap) > 1e-2  # without the kept sets the log-probs are different
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_stops_on_eos_stop_sequences_and_strings(micro_model):
    ref = generate(micro_model, PROMPTS, max_new_tokens=10, temperature=0)
    row = ref.tokens[1]
    eos = row[4]
    out = generate(micro_model, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out.tokens[1] == row[:row.index(eos) + 1] and out.finish_reasons[1] == "eos"
    out = generate(micro_model, PROMPTS, max_new_tokens=10, temperature=0,
                   stop_token_sequences=[row[2:4]])
    first = next(i for i in range(1, 10) if row[i - 1:i + 1] == row[2:4])
    assert out.tokens[1] == row[:first + 1] and out.finish_reasons[1] == "stop"
    decode = lambda ids: " ".join(f"<{t}>" for t in ids)
    out = generate(micro_model, PROMPTS, max_new_tokens=10, temperature=0,
                   stop_strings=[f"<{row[3]}>"], decode=decode)
    assert out.tokens[1] == row[:row.index(row[3]) + 1] and out.finish_reasons[1] == "stop"
    # the other rows are unaffected by one row stopping early
    assert out.tokens[0] == ref.tokens[0][:len(out.tokens[0])]


def test_streaming_callback_and_stats(micro_model):
    seen = []
    out = generate(micro_model, PROMPTS[:2], max_new_tokens=5, temperature=0,
                   on_token=lambda row, tok: seen.append((row, tok)))
    assert sorted(seen) == sorted((r, t) for r in range(2) for t in out.tokens[r])
    assert out.stats["prefill_tokens"] == 3 + 31 and out.stats["decode_tokens"] == 10


def test_context_limit_and_bad_prompts(micro_model):
    cfg = micro_model.cfg
    long = [1] * (cfg.max_seq_len - 3)
    out = generate(micro_model, [long], max_new_tokens=10, temperature=0)
    assert len(out.tokens[0]) == 3 and out.finish_reasons == ["length"]
    with pytest.raises(ValueError, match=r"prompts\[1\].*context"):
        generate(micro_model, [[1], [1] * cfg.max_seq_len], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty"):
        generate(micro_model, [[]])
    with pytest.raises(ValueError, match="empty batch"):  # allowed only under EP (a peer works)
        generate(micro_model, [])
    with pytest.raises(ValueError, match="pad_id=512.*vocabulary"):
        generate(micro_model, [[1], [1, 2]], pad_id=cfg.vocab_size)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(micro_model, [[cfg.vocab_size]])
    with pytest.raises(ValueError, match="decode"):
        generate(micro_model, [[1]], stop_strings=["x"])
