"""`train.rollout`: the multi-turn tool path against a scripted perfect policy (loss mask exactly
0 on the inserted tool results, equal to the SFT mask of the reference conversation), aligned
per-token outputs with the real tiny model, skipped over-long prompts, the tool-turn limit."""

import pytest
import torch

from data.domains import get_domain
from encoding import tokenize_conversation
from model.sampling import KeptSets
from tests.inference.conftest import build_model, micro_config
from train.rollout import FINISH_REASONS, RolloutParams, rollout

from ._rollout_support import (Oracle, domain_tokenizer, domain_tokenizer_file,  # noqa: F401
                               scripted_logprob, stub_model)


@pytest.mark.parametrize("schema,mode", [("brief", "chat"), ("full", "chat"),
                                         ("full", "thinking")])
def test_calculator_rollout_masks_exactly_the_tool_result(domain_tokenizer, schema, mode):
    tok = domain_tokenizer
    domain = get_domain("calculator", schema=schema, thinking_mode=mode)
    items = domain.generate("test", 3, seed=1)
    oracle = Oracle(tok, items)
    result = rollout(stub_model(), tok, [(domain, it) for it in items],
                     RolloutParams(temperature=0.0, max_new_tokens=200, n=2, batch_size=4),
                     generate_fn=oracle)
    assert not result.skipped and len(result.samples) == 6
    # round 1: 6 rows in chunks of 4; round 2 (after the tool result): again 4 + 2
    assert [c["rows"] for c in oracle.calls] == [4, 2, 4, 2]
    for s in result.samples:
        item = items[s.request]
        # the SFT tokenisation of the reference conversation: ids and the assistant-only mask
        ids, mask = tokenize_conversation(tok, item.conversation, mode)
        n_prompt = len(s.prompt_ids)
        assert ids[:n_prompt] == s.prompt_ids
        assert s.response_ids == ids[n_prompt:]
        assert s.loss_mask == mask[n_prompt:]
        inserted = [i for i, m in enumerate(s.loss_mask) if m == 0]
        text = tok.decode([s.response_ids[i] for i in inserted], skip_special_tokens=False)
        assert text.startswith("<｜User｜><tool_result>") and item.answer in text
        assert s.text == item.reference_completion()
        assert s.finish == "eos" and s.tool_turns == 1 and s.error is None
        assert s.score.reward == 1.0 and s.score.correct and s.score.format_valid
        # the sampler's log-probs land on the generated tokens, in order, and 0 on inserted ones
        assert s.logprobs.shape == (len(s.response_ids),)
        assert all(s.logprobs[i] == 0 for i in inserted)
        turns, position = [], None
        for i, m in enumerate(s.loss_mask):
            if m:
                position = 0 if position is None else position + 1
                turns.append(float(s.logprobs[i]) == pytest.approx(scripted_logprob(position)))
            else:
                position = None
        assert all(turns) and len(turns) == s.generated_tokens
        assert torch.equal(s.raw_logprobs, 2 * s.logprobs)
    assert result.stats["inserted_tokens"] == sum(len(s.loss_mask) - s.generated_tokens
                                                  for s in result.samples)


def test_kept_sets_concatenate_over_turns_onto_the_generated_tokens(domain_tokenizer):
    """Each generate call's kept sets (one row per token it drew) are concatenated over the
    sample's turns: row j of `Sample.kept` is the j-th position with loss_mask == 1."""
    tok = domain_tokenizer
    domain = get_domain("calculator", schema="brief", thinking_mode="chat")
    items = domain.generate("test", 2, seed=1)
    oracle = Oracle(tok, items)

    def with_kept(*args, **kw):  # a kept set per drawn token: the token itself and token + 1
        out = oracle(*args, **kw)
        out.kept_sets = [KeptSets(torch.tensor([[t, t + 1] for t in row],
                                               dtype=torch.int32).reshape(-1),
                                  torch.full((len(row),), 2, dtype=torch.int32))
                         for row in out.tokens]
        return out

    result = rollout(stub_model(), tok, [(domain, it) for it in items],
                     RolloutParams(temperature=0.0, max_new_tokens=200,
                                   return_sampling_mask=True), generate_fn=with_kept)
    for s in result.samples:
        assert s.tool_turns == 1 and len(s.kept) == s.generated_tokens
        drawn = [t for t, m in zip(s.response_ids, s.loss_mask) if m]
        assert s.kept.ids[0::2].tolist() == drawn
    plain = rollout(stub_model(), tok, [(domain, items[0])],
                    RolloutParams(temperature=0.0, max_new_tokens=200), generate_fn=oracle)
    assert plain.samples[0].kept is None  # nothing was stored


def test_tool_turn_limit_and_turn_budget(domain_tokenizer):
    tok = domain_tokenizer
    domain = get_domain("calculator", schema="brief")
    items = domain.generate("test", 2)
    limited = rollout(stub_model(), tok, [(domain, it) for it in items],
                      RolloutParams(temperature=0.0, max_new_tokens=200, max_tool_turns=0),
                      generate_fn=Oracle(tok, items))
    for s in limited.samples:
        assert s.finish == "tool-limit" and s.tool_turns == 0 and all(s.loss_mask)
        assert not s.score.format_valid and s.score.reward == 0
    cut = rollout(stub_model(), tok, [(domain, items[0])],
                  RolloutParams(temperature=0.0, max_new_tokens=3), generate_fn=Oracle(tok, items))
    s = cut.samples[0]
    assert s.finish == "length" and len(s.response_ids) == 3 and not s.score.format_valid


def test_too_long_prompt_is_skipped_and_counted(domain_tokenizer):
    tok = domain_tokenizer
    short, long_ = get_domain("strings"), get_domain("calculator", schema="full")
    a, b = short.sample("test", 0), long_.sample("test", 0)
    n_short = len(tok.encode(a.prompt_text(), add_special_tokens=False))
    n_long = len(tok.encode(b.prompt_text(), add_special_tokens=False))
    assert n_short + 40 < n_long
    result = rollout(stub_model(n_short + 20), tok, [(long_, b), (short, a)],
                     RolloutParams(temperature=0.0, n=3), generate_fn=Oracle(tok, [a, b]))
    assert [(x.request, x.domain, x.item_id) for x in result.skipped] == [(0, "calculator", b.id)]
    assert "prompt_too_long" in result.skipped[0].reason and str(n_long) in result.skipped[0].reason
    assert [s.request for s in result.samples] == [1, 1, 1]
    assert all(s.score.reward == 1.0 for s in result.samples)


def test_tool_result_past_the_context_ends_the_sample(domain_tokenizer):
    """The tool result is only appended when the next turn still has room."""
    tok = domain_tokenizer
    domain = get_domain("calculator", schema="brief")
    item = domain.sample("test", 0)
    ids, mask = tokenize_conversation(tok, item.conversation, "chat")
    first_turn_end = mask.index(0, mask.index(1))  # where the tool result starts
    result = rollout(stub_model(first_turn_end + 2), tok, [(domain, item)],
                     RolloutParams(temperature=0.0, max_new_tokens=200),
                     generate_fn=Oracle(tok, [item]))
    s = result.samples[0]
    assert s.finish == "length" and all(s.loss_mask) and s.tool_turns == 0


def test_real_model_outputs_are_aligned_and_reproducible(domain_tokenizer):
    tok = domain_tokenizer
    model = build_model(micro_config(vocab_size=512, max_seq_len=512))
    requests = [(d, d.sample("test", i)) for d in (get_domain("strings"),
                                                   get_domain("calculator", schema="brief"))
                for i in range(2)]
    params = RolloutParams(temperature=1.0, top_k=50, max_new_tokens=6, n=2, seed=3,
                           batch_size=3, return_routes=True, return_sampling_mask=True)
    result = rollout(model, tok, requests, params)
    cfg = model.cfg
    assert len(result.samples) == 8 and not result.skipped
    for s in result.samples:
        n = len(s.response_ids)
        assert 0 < n == len(s.loss_mask) == s.logprobs.shape[0] == s.raw_logprobs.shape[0]
        assert s.routes.shape == (len(s.prompt_ids) + n, cfg.n_layers, cfg.n_activated_experts)
        assert len(s.kept) == s.generated_tokens  # one kept set per generated token, in order
        assert s.kept.counts.le(50).all()  # top_k kept at most 50 tokens
        gen = torch.tensor(s.loss_mask, dtype=torch.bool)
        drawn = torch.tensor(s.response_ids)[gen]
        assert s.kept.to_mask(cfg.vocab_size)[torch.arange(len(drawn)), drawn].all()
        assert (s.logprobs[gen] <= 0).all() and (s.logprobs[~gen] == 0).all()
        assert s.finish in FINISH_REASONS and s.score is not None
        assert s.text == tok.decode(s.response_ids, skip_special_tokens=False)
    again = rollout(model, tok, requests, params)
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in result.samples]
    assert result.stats["generated_tokens"] == sum(s.generated_tokens for s in result.samples)
    assert result.stats["seconds"] >= result.stats["generate_seconds"] > 0


def test_speculative_rollout_equals_the_plain_one_under_greedy(domain_tokenizer):
    """`RolloutParams(speculative=True)` (GRPO's and distillation's `speculative` key) reaches
    the engine's MTP drafting (`model/speculative_engine.py`; `generate`'s with engine=False),
    and a greedy rollout is the same sample for sample: tokens, routes and log-probs (the
    equivalence itself, continued tool turns included: tests/inference/test_speculative*.py)."""
    model = build_model(micro_config(vocab_size=512, max_seq_len=512))
    requests = [(d, d.sample("test", i)) for d in (get_domain("strings"),
                                                   get_domain("calculator", schema="brief"))
                for i in range(2)]
    kw = dict(temperature=0.0, max_new_tokens=12, batch_size=4, return_routes=True)
    plain = rollout(model, domain_tokenizer, requests, RolloutParams(**kw))
    for engine in (True, False):
        fast = rollout(model, domain_tokenizer, requests,
                       RolloutParams(speculative=True, engine=engine, **kw))
        assert engine == ("drafted" in fast.stats) and fast.stats.get("drafted", 1) > 0
        for a, b in zip(plain.samples, fast.samples):
            assert a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
            assert torch.equal(a.routes, b.routes)
            torch.testing.assert_close(a.raw_logprobs, b.raw_logprobs, rtol=0, atol=1e-4)


def test_bad_params_are_errors():
    with pytest.raises(ValueError, match="n=0"):
        RolloutParams(n=0).validate()
    with pytest.raises(ValueError, match="max_tool_turns"):
        RolloutParams(max_tool_turns=-1).validate()
    with pytest.raises(ValueError, match="top_p"):
        RolloutParams(top_p=0.0).validate()
