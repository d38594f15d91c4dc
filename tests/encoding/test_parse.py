"""Parsing completions (spec §9.8): strict errors with offsets, lenient recovery, round trips."""

from __future__ import annotations

import json
import pickle

import pytest

from encoding import ParseError, encode_messages, parse_message_from_completion_text as parse
from encoding.special_tokens import EOS, THINK_END

CALL = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Beijing</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
SECOND = (
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="q" string="true">x</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
)


def test_thinking_answer():
    assert parse("Simple arithmetic.</think>2 + 2 = 4." + EOS, "thinking") == {
        "role": "assistant",
        "reasoning_content": "Simple arithmetic.",
        "content": "2 + 2 = 4.",
        "tool_calls": [],
    }


def test_chat_answer():
    assert parse("Hi" + EOS, "chat") == {
        "role": "assistant", "content": "Hi", "reasoning_content": "", "tool_calls": [],
    }


def test_tool_call():
    parsed = parse("R</think>let me check" + CALL + EOS, "thinking")
    assert parsed["content"] == "let me check"
    assert parsed["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing", "days": 3}'}}
    ]


def test_eos_after_the_tool_block_is_optional_like_the_release():
    assert parse("x" + CALL, "chat")["tool_calls"][0]["function"]["name"] == "get_weather"


def _strict_error(text, mode="thinking"):
    with pytest.raises(ParseError) as info:
        parse(text, mode)
    return info.value


def test_missing_think_end_reports_offset():
    error = _strict_error("reasoning only" + EOS)
    assert error.offset == len("reasoning only" + EOS)
    assert error.expected == repr(THINK_END)
    assert "offset" in str(error) and "</think>" in str(error)
    assert isinstance(error, ValueError)


def test_tool_block_before_think_end_is_an_error():
    assert _strict_error("R" + CALL + EOS).offset == 1


def test_missing_eos():
    error = _strict_error("R</think>cut off")
    assert error.offset == len("R</think>cut off")
    assert "end▁of▁sentence" in error.expected


def test_text_after_eos():
    assert _strict_error("R</think>A" + EOS + "junk").offset == len("R</think>A" + EOS)


def test_text_after_tool_block():
    text = "R</think>" + CALL + "junk" + EOS
    assert _strict_error(text).offset == len("R</think>" + CALL)


@pytest.mark.parametrize("token", ["<think>", THINK_END, "｜DSML｜", "<｜begin▁of▁sentence｜>"])
def test_special_strings_inside_content(token):
    error = _strict_error("A" + token + "B" + EOS, "chat")
    assert error.offset == 1


def test_bad_string_attribute_offset():
    text = "R</think>" + CALL.replace('string="false"', 'string="maybe"') + EOS
    error = _strict_error(text)
    assert text[error.offset :].startswith('maybe">3')


def test_duplicate_parameter():
    text = "R</think>" + CALL.replace('name="days"', 'name="city"') + EOS
    assert "duplicate" in str(_strict_error(text))


def test_non_json_value_for_string_false():
    text = "R</think>" + CALL.replace(">3<", ">three<") + EOS
    error = _strict_error(text)
    assert text[error.offset :].startswith("three")


def test_parse_error_pickles():
    error = pickle.loads(pickle.dumps(_strict_error("x")))
    assert isinstance(error, ParseError) and error.offset == 1 and "offset 1" in str(error)


def test_unknown_mode_and_non_string_text():
    with pytest.raises(ValueError, match="thinking_mode"):
        parse("x" + EOS, "fast")
    with pytest.raises(ValueError, match="text"):
        parse(None, "chat")


# ---- lenient mode ---------------------------------------------------------------------------


def kinds(parsed):
    return [issue["kind"] for issue in parsed["parse_issues"]]


def test_lenient_well_formed_has_no_issues():
    parsed = parse("R</think>A" + CALL + EOS, "thinking", strict=False)
    assert parsed["parse_issues"] == []
    assert parsed["tool_calls"][0]["function"]["name"] == "get_weather"


def test_lenient_truncated_reasoning():
    parsed = parse("still thinking about", "thinking", strict=False)
    assert parsed["reasoning_content"] == "still thinking about"
    assert parsed["content"] == ""
    assert kinds(parsed) == ["missing_think_end", "missing_eos"]


def test_lenient_missing_think_end_before_eos():
    parsed = parse("an answer" + EOS, "thinking", strict=False)
    assert parsed["reasoning_content"] == "an answer"
    assert kinds(parsed) == ["missing_think_end"]


def test_lenient_missing_think_end_before_tool_block():
    parsed = parse("R" + CALL + EOS, "thinking", strict=False)
    assert parsed["reasoning_content"] == "R"
    assert parsed["tool_calls"][0]["function"]["name"] == "get_weather"
    assert kinds(parsed) == ["missing_think_end"]


def test_lenient_truncated_content():
    parsed = parse("R</think>The answer is", "thinking", strict=False)
    assert (parsed["reasoning_content"], parsed["content"]) == ("R", "The answer is")
    assert kinds(parsed) == ["missing_eos"]
    assert parsed["parse_issues"][0]["offset"] == len("R</think>The answer is")


def test_lenient_truncated_second_tool_call_keeps_the_first():
    text = "R</think>" + CALL[: -len("</｜DSML｜tool_calls>")] + SECOND[:40]
    parsed = parse(text, "thinking", strict=False)
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather"]
    assert kinds(parsed) == ["malformed_tool_calls"]
    with pytest.raises(ParseError):
        parse(text, "thinking")


def test_lenient_recovers_values():
    text = "R</think>" + CALL.replace(">3<", ">three<").replace(
        "</｜DSML｜invoke>", '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>'
    ) + EOS + "tail"
    parsed = parse(text, "thinking", strict=False)
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"city": "Beijing", "days": "three"}
    assert kinds(parsed) == ["invalid_parameter_json", "duplicate_parameter", "trailing_text"]


def test_lenient_flags_special_tokens_but_keeps_text():
    parsed = parse("A<think>B" + EOS, "chat", strict=False)
    assert parsed["content"] == "A<think>B"
    assert kinds(parsed) == ["special_token_in_text"]


# ---- round trips ----------------------------------------------------------------------------

ASSISTANT_TURNS = [
    {"role": "assistant", "reasoning_content": "R", "content": "plain"},
    {"role": "assistant", "reasoning_content": "", "content": "multi\n\nline 名"},
    {"role": "assistant", "reasoning_content": "call it", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": json.dumps({"a": "x", "b": [1, 2.5, None], "c": {"d": False}})}},
        {"type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]},
    {"role": "assistant", "reasoning_content": "R", "content": "with text", "tool_calls": [
        # Special strings other than the DSML marker may appear inside parameter values.
        {"type": "function", "function": {"name": "h", "arguments": {"s": "</think> and <think>"}}},
    ]},
]


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("turn", range(len(ASSISTANT_TURNS)))
def test_parse_inverts_encode(mode, turn):
    msg = ASSISTANT_TURNS[turn]
    messages = [{"role": "user", "content": "Q"}, msg]
    prompt = encode_messages(messages[:1], mode)
    full = encode_messages(messages, mode)
    assert full.startswith(prompt)
    parsed = parse(full[len(prompt) :], mode)
    assert parsed["content"] == (msg.get("content") or "")
    assert parsed["reasoning_content"] == (msg["reasoning_content"] if mode == "thinking" else "")
    expected_calls = msg.get("tool_calls") or []
    assert len(parsed["tool_calls"]) == len(expected_calls)
    for got, want in zip(parsed["tool_calls"], expected_calls):
        assert got["function"]["name"] == want["function"]["name"]
        arguments = want["function"]["arguments"]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        assert got["function"]["arguments"] == arguments
