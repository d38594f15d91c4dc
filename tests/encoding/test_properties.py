"""Property tests: random conversations never crash the encoder; parse inverts encode."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from encoding import encode_messages, parse_message_from_completion_text, tokenize_conversation
from encoding.encode import encode_segments
from encoding.special_tokens import BOS, SPECIAL_TOKENS, THINK_START
from encoding.validate import ROLES, VALID_TASKS
from tests.encoding._support import masked_runs

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that resemble the format's markup, so random text probes the parser's boundaries.
_FRAGMENTS = ["<", ">", "/", "｜", "DSML", "think", "\n", "\n\n", '"', "{", "}", " ", "▁", "=",
              "tool_calls", "invoke", "名", "😀", "string=\"true\">", "</"]
_FORBIDDEN = tuple(SPECIAL_TOKENS)

text = (
    st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=6), max_size=6)
    .map("".join)
    .filter(lambda s: not any(token in s for token in _FORBIDDEN))
)
keys = st.text(alphabet="abxyz_名 -", min_size=1, max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(keys, json_values, max_size=4)
modes = st.sampled_from(["chat", "thinking"])


@st.composite
def tool_calls(draw, with_ids=True, as_mapping=False):
    calls = []
    for k in range(draw(st.integers(1, 3))):
        args = draw(arguments)
        call = {"type": "function", "function": {
            "name": draw(st.sampled_from(["search", "get_weather", "open"])),
            "arguments": args if as_mapping else json.dumps(args, ensure_ascii=False),
        }}
        if with_ids:
            call["id"] = f"call_{k}"
        calls.append(call)
    return calls


def assistant(draw, *, common):
    msg = {"role": "assistant"}
    if draw(st.booleans()):
        msg["reasoning_content"] = draw(text)
    msg["content"] = draw(st.none() | text)
    if draw(st.integers(0, 3)) == 0:
        msg["tool_calls"] = draw(tool_calls(as_mapping=common))
    if draw(st.integers(0, 5)) == 0:
        msg["wo_eos"] = True
    return msg


@st.composite
def conversations(draw, common=False):
    """Valid conversations. `common`: only what CHAT_TEMPLATE supports (tools passed separately)."""
    msgs = []
    if draw(st.booleans()):
        system = {"role": "system", "content": draw(text)}
        if not common and draw(st.booleans()):
            system["tools"] = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
        if not common and draw(st.integers(0, 3)) == 0:
            system["response_format"] = {"type": "json_object"}
        msgs.append(system)
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            msgs.append({"role": "latest_reminder", "content": draw(text)})
        role = "developer" if not common and draw(st.integers(0, 5)) == 0 else "user"
        content = draw(text) if role == "user" else draw(text.filter(bool))
        msgs.append({"role": role, "content": content})
        if draw(st.integers(0, 4)) == 0:
            msgs.append({"role": "user", "content": draw(text)})
        if not common and draw(st.integers(0, 6)) == 0:
            msgs[-1]["task"] = draw(st.sampled_from(VALID_TASKS))
        if draw(st.integers(0, 4)) == 0:
            continue  # conversation may end (or continue) on a user turn
        reply = assistant(draw, common=common)
        msgs.append(reply)
        if not common and reply.get("tool_calls"):
            ids = [c["id"] for c in reply["tool_calls"]]
            for call_id in draw(st.permutations(ids)):
                msgs.append({"role": "tool", "tool_call_id": call_id, "content": draw(text)})
    return msgs


@SETTINGS
@given(conversations(), modes, st.booleans(), st.sampled_from([None, "high", "max"]))
def test_random_conversations_encode(messages, mode, drop, effort):
    before = copy.deepcopy(messages)
    out = encode_messages(messages, mode, drop_thinking=drop, reasoning_effort=effort)
    assert messages == before
    assert out.startswith(BOS)
    for msg in messages:
        if msg["role"] in ("user", "assistant", "system") and msg.get("content"):
            assert msg["content"] in out
    last = messages[-1] if messages else None
    if last and last["role"] == "user" and "task" not in last and mode == "chat":
        assert out.endswith("<｜Assistant｜></think>")


_JUNK = st.none() | st.booleans() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2)
_junk_messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "reasoning_content", "tool_calls", "tools", "tool_call_id",
                         "task", "wo_eos", "response_format"]),
        _JUNK | st.sampled_from(ROLES + VALID_TASKS) | st.just([{"type": "function", "function": {"name": "f", "arguments": "{"}}]),
    ),
    max_size=5,
)


@SETTINGS
@given(_junk_messages, st.sampled_from(["chat", "thinking", "other", None]))
def test_junk_input_raises_only_value_error(messages, mode):
    try:
        out = encode_messages(messages, mode)
    except ValueError:
        return
    assert isinstance(out, str)


@SETTINGS
@given(modes, st.data())
def test_parse_inverts_encode_for_assistant_turns(mode, data):
    prefix = data.draw(conversations())
    # The turn is parsed as the model's answer to a user turn; a task output has no reasoning slot.
    messages = prefix + [{"role": "user", "content": data.draw(text)}]
    reply = assistant(data.draw, common=False)
    reply.pop("wo_eos", None)
    prompt = encode_messages(messages, mode)
    full = encode_messages(messages + [reply], mode)
    assert full.startswith(prompt)
    parsed = parse_message_from_completion_text(full[len(prompt):], mode)
    assert parsed["content"] == (reply.get("content") or "")
    assert parsed["reasoning_content"] == (reply.get("reasoning_content", "") if mode == "thinking" else "")
    calls = reply.get("tool_calls") or []
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == [c["function"]["name"] for c in calls]
    for got, want in zip(parsed["tool_calls"], calls):
        assert got["function"]["arguments"] == want["function"]["arguments"]
        assert json.loads(got["function"]["arguments"]) == json.loads(want["function"]["arguments"])
    lenient = parse_message_from_completion_text(full[len(prompt):], mode, strict=False)
    assert lenient.pop("parse_issues") == [] and lenient == parsed


@SETTINGS
@given(conversations(common=True).filter(bool), modes, st.booleans(), st.booleans())  # HF rejects []
def test_chat_template_matches_encoder_on_common_conversations(tokenizer, messages, mode, drop, with_tools):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}] if with_tools else None
    rendered = tokenizer.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, thinking_mode=mode, drop_thinking=drop, tools=tools
    )
    reference = copy.deepcopy(messages)
    if tools:
        if reference and reference[0]["role"] == "system":
            reference[0]["tools"] = tools
        else:
            reference.insert(0, {"role": "system", "content": "", "tools": tools})
    assert rendered == encode_messages(reference, mode, drop_thinking=drop)


@SETTINGS
@given(conversations(), modes, st.booleans())
def test_loss_mask_covers_exactly_the_trained_assistant_text(tokenizer, messages, mode, drop):
    ids, mask = tokenize_conversation(tokenizer, messages, mode, drop_thinking=drop)
    segments = encode_segments(messages, mode, drop_thinking=drop)
    assert tokenizer.decode(ids) == "".join(s.text for s in segments)
    trained = [s.text for s in segments if s.generated and s.faithful and s.text]
    assert "".join(masked_runs(tokenizer, ids, mask)) == "".join(trained)
    if mode == "thinking" and drop:
        # Only reasoning-bearing or task-output turns are trained; their opening `<think>` is not.
        assert all(bit == 0 for token, bit in zip(ids, mask) if token == tokenizer.convert_tokens_to_ids(THINK_START))
