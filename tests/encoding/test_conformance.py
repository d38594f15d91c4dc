"""The four official DeepSeek-V4 encoding cases, byte for byte, plus the official parsing checks.

Skipped (with the reason) when the conformance folder is absent; see `_support.conformance_root`.
"""

from __future__ import annotations

import copy

import pytest

from encoding import encode_messages, parse_message_from_completion_text
from encoding.special_tokens import ASSISTANT, THINK_START, USER
from tests.encoding._support import CONFORMANCE_MODES, load_case

_OPEN = ASSISTANT + THINK_START


@pytest.mark.parametrize("case", sorted(CONFORMANCE_MODES))
def test_official_case_matches_byte_for_byte(conformance_encoding_dir, case):
    messages, expected = load_case(conformance_encoding_dir, case)
    before = copy.deepcopy(messages)
    got = encode_messages(messages, CONFORMANCE_MODES[case])
    assert got.encode("utf-8") == expected.encode("utf-8")
    assert messages == before, "encode_messages must not mutate its input"


def test_case1_first_assistant_turn_parses_to_the_tool_call(conformance_encoding_dir):
    _, expected = load_case(conformance_encoding_dir, 1)
    start = expected.index(_OPEN) + len(_OPEN)
    completion = expected[start : expected.index(USER, start)]
    parsed = parse_message_from_completion_text(completion, "thinking")
    assert parsed["reasoning_content"] == (
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
    )
    assert parsed["content"] == ""
    assert len(parsed["tool_calls"]) == 1
    function = parsed["tool_calls"][0]["function"]
    assert function["name"] == "get_weather"
    assert function["arguments"] == '{"location": "Beijing", "unit": "celsius"}'


def test_case1_last_assistant_turn_parses_to_the_answer(conformance_encoding_dir):
    _, expected = load_case(conformance_encoding_dir, 1)
    completion = expected[expected.rindex(_OPEN) + len(_OPEN) :]
    parsed = parse_message_from_completion_text(completion, "thinking")
    assert parsed["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in parsed["content"]
    assert parsed["tool_calls"] == []


def test_case2_last_assistant_turn_parses(conformance_encoding_dir):
    _, expected = load_case(conformance_encoding_dir, 2)
    completion = expected[expected.rindex(_OPEN) + len(_OPEN) :]
    parsed = parse_message_from_completion_text(completion, "thinking")
    assert parsed["reasoning_content"] == "The user asks about the capital of France. It is Paris."
    assert parsed["content"] == "The capital of France is Paris."
    assert parsed["tool_calls"] == []


def test_case2_drops_the_first_reasoning(conformance_encoding_dir):
    _, expected = load_case(conformance_encoding_dir, 2)
    assert "The user said hello" not in expected
    messages, _ = load_case(conformance_encoding_dir, 2)
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    assert "The user said hello, I should greet back.</think>" in kept


@pytest.mark.parametrize("case", sorted(CONFORMANCE_MODES))
def test_every_official_assistant_turn_round_trips(conformance_encoding_dir, case):
    """Each assistant turn, encoded as the last turn, parses back to its own fields."""
    messages, _ = load_case(conformance_encoding_dir, case)
    mode = CONFORMANCE_MODES[case]
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or messages[i - 1].get("task"):
            continue
        prompt = encode_messages(messages[:i], mode)
        full = encode_messages(messages[: i + 1], mode)
        assert full.startswith(prompt)
        parsed = parse_message_from_completion_text(full[len(prompt) :], mode)
        assert parsed["content"] == (msg.get("content") or "")
        if mode == "thinking":
            assert parsed["reasoning_content"] == msg.get("reasoning_content", "")
        names = [c["function"]["name"] for c in parsed["tool_calls"]]
        assert names == [c["function"]["name"] for c in msg.get("tool_calls") or []]
