"""Rollouts through the engine (`RolloutParams(engine=True)`, the default) against the
batch-synchronous `generate` path (`engine=False`): under greedy decoding the same samples,
tool turns included (a sample's next turn joins the continuous batch as soon as its tool result
is in, instead of waiting for the round), with the same per-token outputs.

A random micro model neither stops nor calls tools on its own, so the test makes both happen
the same way on both paths: EOS is the token the greedy model produces most often (a tokenizer
proxy with that `eos_token_id`), and a turn counts as a calculator call when its text has an
odd number of characters (the parser is wrapped; the calculator then really runs and its
result is inserted and tokenised). Log-probs agree to 1e-5: the same fp32 computation in
batches of other compositions (~1e-6 on values of order 1-10)."""

from collections import Counter
from types import SimpleNamespace

import torch

import train.rollout as rollout_module
from data.domains import get_domain
from tests.inference.conftest import build_model, micro_config
from train.rollout import RolloutParams, rollout

from ._rollout_support import domain_tokenizer, domain_tokenizer_file  # noqa: F401

CALL = {"role": "assistant", "content": "", "reasoning_content": "",
        "tool_calls": [{"type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "23 + 82"}'}}]}


def test_engine_rollout_equals_generate_rollout_with_tool_turns(domain_tokenizer,
                                                                monkeypatch):
    model = build_model(micro_config(vocab_size=512, max_seq_len=512))
    calc = get_domain("calculator", schema="brief")
    requests = [(calc, calc.sample("test", i)) for i in range(3)]
    requests += [(get_domain("strings"), get_domain("strings").sample("test", 0))]
    probe = rollout(model, domain_tokenizer, requests,
                    RolloutParams(temperature=0.0, max_new_tokens=16))
    common = Counter(t for s in probe.samples for t in s.response_ids).most_common(1)[0][0]
    tok = SimpleNamespace(encode=domain_tokenizer.encode, decode=domain_tokenizer.decode,
                          eos_token_id=common)
    real_parse = rollout_module.parse_message_from_completion_text

    def parse(text, mode, strict=False):
        return dict(CALL) if len(text) % 2 else real_parse(text, mode, strict=strict)

    monkeypatch.setattr(rollout_module, "parse_message_from_completion_text", parse)
    kw = dict(temperature=0.0, max_new_tokens=16, n=3, batch_size=4, max_tool_turns=2,
              return_routes=True, return_sampling_mask=True)
    plain = rollout(model, tok, requests, RolloutParams(engine=False, **kw))
    fast = rollout(model, tok, requests, RolloutParams(engine=True, **kw))
    assert "engine_steps" in fast.stats and "engine_steps" not in plain.stats
    assert sum(s.tool_turns for s in fast.samples) >= 2
    assert {s.finish for s in fast.samples} >= {"eos"}
    for a, b in zip(plain.samples, fast.samples):
        assert (a.request, a.sample, a.finish, a.tool_turns) == (b.request, b.sample, b.finish,
                                                                b.tool_turns)
        assert a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
        assert torch.equal(a.routes, b.routes)
        assert torch.equal(a.kept.ids, b.kept.ids) and torch.equal(a.kept.counts, b.kept.counts)
        torch.testing.assert_close(a.raw_logprobs, b.raw_logprobs, rtol=1e-5, atol=1e-5)
        assert a.score == b.score
    # the engine prefilled each request's prompt once for its three samples
    assert fast.stats["prefill_tokens"] < plain.stats["prefill_tokens"]
