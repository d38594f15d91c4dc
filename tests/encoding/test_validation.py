"""Invalid input fails with a ValueError that names the message index and the field."""

from __future__ import annotations

import pytest

from encoding import encode_messages

USER = {"role": "user", "content": "Q"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def assert_invalid(messages, match, mode="chat", **kw):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages, mode, **kw)


def test_unknown_role():
    assert_invalid([USER, {"role": "bot", "content": "x"}], r"messages\[1\]\.role: unknown role 'bot'")


def test_message_must_be_a_dict():
    assert_invalid([USER, "hello"], r"messages\[1\]: expected a dict")
    assert_invalid("hello", r"messages: expected a list")


def test_tool_message_without_a_preceding_call():
    assert_invalid([USER, {"role": "tool", "content": "r"}], r"messages\[1\]\.role: tool result with no preceding")
    # An assistant turn without calls in between closes the earlier calls.
    assert_invalid(
        [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "r"},
         {"role": "assistant", "content": "done"}, {"role": "tool", "content": "late"}],
        r"messages\[4\]\.role: tool result with no preceding",
    )


def test_tool_call_id_must_match_a_call():
    messages = [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c9", "content": "r"}]
    assert_invalid(messages, r"messages\[2\]\.tool_call_id: 'c9' matches none")


def test_call_in_context_is_a_valid_preceding_call():
    context = [USER, {"role": "assistant", "tool_calls": [CALL]}]
    out = encode_messages([{"role": "tool", "tool_call_id": "c1", "content": "r"}], "chat", context=context)
    assert "<tool_result>r</tool_result>" in out
    assert_invalid([USER], r"context\[0\]\.role: unknown role", context=[{"role": "x"}])


def test_unknown_thinking_mode_and_effort():
    assert_invalid([USER], r"thinking_mode: expected 'chat' or 'thinking', got 'think'", mode="think")
    assert_invalid([USER], r"reasoning_effort: expected None, 'high' or 'max', got 'low'", reasoning_effort="low")


@pytest.mark.parametrize("content", [["a", "b"], 3, {"text": "x"}])
def test_non_string_content(content):
    assert_invalid([USER, {"role": "assistant", "content": content}], r"messages\[1\]\.content: expected a string")
    assert_invalid([{"role": "user", "content": content}], r"messages\[0\]\.content: expected a string")


def test_non_string_reasoning():
    assert_invalid([USER, {"role": "assistant", "reasoning_content": 1}], r"messages\[1\]\.reasoning_content")


def test_bad_tool_content():
    base = [USER, {"role": "assistant", "tool_calls": [CALL]}]
    assert_invalid(base + [{"role": "tool", "content": None}], r"messages\[2\]\.content: a tool result must be")
    assert_invalid(base + [{"role": "tool", "content": [{"type": "text"}]}], r"messages\[2\]\.content: text part")


def test_unknown_task():
    assert_invalid([{"role": "user", "content": "Q", "task": "summarize"}], r"messages\[0\]\.task: unknown task 'summarize'")


def test_tools_only_on_system_or_developer():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert_invalid([{"role": "user", "content": "Q", "tools": tools}], r"messages\[0\]\.tools: only rendered on system")
    assert_invalid([{"role": "system", "content": "S", "tools": [{"name": "f"}]}], r"messages\[0\]\.tools\[0\]")
    assert_invalid([{"role": "system", "content": "S", "tools": {"a": 1}}], r"messages\[0\]\.tools: expected a list")


def test_json_fields_must_serialise():
    assert_invalid([{"role": "system", "content": "S", "response_format": {"x": {1, 2}}}], r"messages\[0\]\.response_format: not JSON")
    bad_call = {"type": "function", "function": {"name": "f", "arguments": {"x": object()}}}
    assert_invalid([USER, {"role": "assistant", "tool_calls": [bad_call]}], r"messages\[1\]\.tool_calls\[0\]\.function\.arguments")


def test_developer_needs_content():
    assert_invalid([{"role": "developer", "content": ""}], r"messages\[0\]\.content: a developer message needs content")
    assert_invalid([{"role": "latest_reminder"}], r"messages\[0\]\.content: required")


@pytest.mark.parametrize(
    "call, field",
    [
        ({"type": "function"}, r"tool_calls\[0\]\.function: expected a mapping"),
        ({"function": {"arguments": "{}"}}, r"tool_calls\[0\]\.function\.name"),
        ({"function": {"name": "f", "arguments": 3}}, r"tool_calls\[0\]\.function\.arguments"),
        ({"function": {"name": "f", "arguments": {1: "x"}}}, r"tool_calls\[0\]\.function\.arguments: parameter names"),
    ],
)
def test_malformed_tool_calls(call, field):
    assert_invalid([USER, {"role": "assistant", "tool_calls": [call]}], r"messages\[1\]\." + field)


def test_tool_calls_only_on_assistant_and_wo_eos_bool():
    assert_invalid([{"role": "user", "content": "Q", "tool_calls": [CALL]}], r"messages\[0\]\.tool_calls: only assistant")
    assert_invalid([USER, {"role": "assistant", "content": "A", "wo_eos": "yes"}], r"messages\[1\]\.wo_eos")
