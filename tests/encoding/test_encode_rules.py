"""One test per rendering rule of spec §9.2-§9.7, with exact expected strings."""

from __future__ import annotations

import copy
import json

import pytest

from encoding import encode_messages
from encoding.encode import REASONING_EFFORT_MAX
from encoding.special_tokens import (
    ASSISTANT as A,
    BOS,
    EOS,
    LATEST_REMINDER as LR,
    TASK_TOKENS,
    THINK_END as TE,
    THINK_START as TS,
    USER as U,
)
from encoding.tools import render_tools_block

SYS = {"role": "system", "content": "S"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气 lookup",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def two_turns():
    return [
        SYS,
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "reasoning_content": "R2", "content": "A2"},
    ]


def test_readme_quick_start_prompt():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert encode_messages(messages, "thinking") == (
        BOS + "You are a helpful assistant." + U + "What is 2+2?" + A + TS
    )


def test_chat_mode_never_renders_reasoning():
    assert encode_messages(two_turns(), "chat") == (
        BOS + "S" + U + "Q1" + A + TE + "A1" + EOS + U + "Q2" + A + TE + "A2" + EOS
    )


def test_thinking_mode_drops_earlier_reasoning_by_default():
    assert encode_messages(two_turns(), "thinking") == (
        BOS + "S" + U + "Q1" + A + TE + "A1" + EOS + U + "Q2" + A + TS + "R2" + TE + "A2" + EOS
    )


def test_thinking_mode_keeps_all_reasoning_without_dropping():
    assert encode_messages(two_turns(), "thinking", drop_thinking=False) == (
        BOS + "S" + U + "Q1" + A + TS + "R1" + TE + "A1" + EOS
        + U + "Q2" + A + TS + "R2" + TE + "A2" + EOS
    )


def test_drop_thinking_is_ignored_in_chat_mode():
    assert encode_messages(two_turns(), "chat", drop_thinking=False) == encode_messages(
        two_turns(), "chat"
    )


def test_any_tools_keep_every_turns_reasoning():
    messages = two_turns()
    messages[0] = {**SYS, "tools": TOOLS}
    out = encode_messages(messages, "thinking")
    assert U + "Q1" + A + TS + "R1" + TE + "A1" + EOS in out
    assert out == encode_messages(messages, "thinking", drop_thinking=False)


def test_empty_tools_list_does_not_disable_dropping():
    messages = two_turns()
    messages[0] = {**SYS, "tools": []}
    assert "R1" not in encode_messages(messages, "thinking")


def test_missing_reasoning_renders_an_empty_think_block():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert encode_messages(messages, "thinking") == BOS + U + "Q" + A + TS + TE + "A" + EOS


def test_system_with_tools_appends_the_tools_block():
    out = encode_messages([{**SYS, "tools": TOOLS}, {"role": "user", "content": "Q"}], "chat")
    block = render_tools_block(TOOLS)
    assert out == BOS + "S\n\n" + block + U + "Q" + A + TE
    assert block.startswith("## Tools\n\nYou have access to a set of tools")
    assert block.endswith(
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
        "tool calls.\n"
    )
    schema_line = json.dumps(TOOLS[0]["function"], ensure_ascii=False)
    assert "### Available Tool Schemas\n\n" + schema_line + "\n\n" in block
    assert "天气" in schema_line  # non-ASCII kept verbatim


def test_response_format_is_appended_to_the_system_message():
    schema = {"type": "json_object", "名": 1}
    out = encode_messages([{**SYS, "response_format": schema}], "chat")
    assert out == (
        BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
        "reply:\n" + json.dumps(schema, ensure_ascii=False)
    )


def test_tools_come_before_response_format():
    out = encode_messages([{**SYS, "tools": TOOLS, "response_format": {"a": 1}}], "chat")
    assert out.index("## Tools") < out.index("## Response Format")


def test_developer_renders_as_a_user_turn_with_tools():
    messages = [{"role": "developer", "content": "D", "tools": TOOLS}]
    assert encode_messages(messages, "thinking") == (
        BOS + U + "D\n\n" + render_tools_block(TOOLS) + A + TS
    )


def test_earlier_developer_turns_are_removed_when_reasoning_is_dropped():
    messages = [
        {"role": "developer", "content": "D"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "Q"},
    ]
    # The assistant turn loses its prefix with the developer turn (released-encoder behaviour).
    assert encode_messages(messages, "thinking") == BOS + "A1" + EOS + U + "Q" + A + TS
    # Chat mode, or thinking mode without dropping, keeps the developer turn.
    assert encode_messages(messages, "chat").startswith(BOS + U + "D" + A + TE + "A1")
    assert encode_messages(messages, "thinking", drop_thinking=False).startswith(
        BOS + U + "D" + A + TS + "R1" + TE + "A1"
    )


def test_latest_reminder_has_no_closing_tag():
    messages = [SYS, {"role": "latest_reminder", "content": "2026-01-01"}, {"role": "user", "content": "Q"}]
    assert encode_messages(messages, "chat") == BOS + "S" + LR + "2026-01-01" + U + "Q" + A + TE


def test_user_followed_by_latest_reminder_still_gets_the_assistant_prefix():
    """Released-encoder behaviour: the transition is written before a latest_reminder turn."""
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "latest_reminder", "content": "R"},
        {"role": "assistant", "content": "A"},
    ]
    assert encode_messages(messages, "chat") == BOS + U + "Q" + A + TE + LR + "R" + "A" + EOS


def test_user_followed_by_user_is_one_turn():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_messages(messages, "chat") == BOS + U + "a\n\nb" + A + TE


def test_user_merging_quirks_around_tasks():
    """Released-encoder behaviour: a task user turn is never merged into, but a later task user
    message merged into an earlier user turn loses its task (only the first message's keys stay)."""
    after_task = [{"role": "user", "content": "a", "task": "query"}, {"role": "user", "content": "b"}]
    assert encode_messages(after_task, "chat") == BOS + U + "a" + U + "b" + A + TE
    merged = [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "task": "action"}]
    assert encode_messages(merged, "chat") == BOS + U + "a\n\nb" + A + TE


def _tool_conversation(result_order):
    calls = [
        {"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": k})}}
        for k in range(3)
    ]
    return [
        SYS,
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *({"role": "tool", "tool_call_id": f"c{k}", "content": f"r{k}"} for k in result_order),
    ]


def test_tool_results_are_merged_and_ordered_by_call_id():
    out = encode_messages(_tool_conversation([2, 0, 1]), "chat")
    assert out.endswith(
        EOS + U + "<tool_result>r0</tool_result>\n\n<tool_result>r1</tool_result>\n\n"
        "<tool_result>r2</tool_result>" + A + TE
    )
    assert out == encode_messages(_tool_conversation([0, 1, 2]), "chat")


def test_user_text_after_tool_results_is_another_block():
    messages = _tool_conversation([1, 0]) + [{"role": "user", "content": "more"}]
    out = encode_messages(messages, "chat")
    assert out.endswith(
        U + "<tool_result>r0</tool_result>\n\n<tool_result>r1</tool_result>\n\nmore" + A + TE
    )


def test_tool_result_content_parts():
    messages = _tool_conversation([0])
    messages[-1]["content"] = [{"type": "text", "text": "x"}, {"type": "image_url"}, {"type": "text", "text": "y"}]
    assert encode_messages(messages, "chat").endswith(
        U + "<tool_result>x\n\n[Unsupported image_url]\n\ny</tool_result>" + A + TE
    )


def test_assistant_tool_call_rendering_in_thinking_mode():
    messages = _tool_conversation([0, 1, 2])[:3]
    messages[2]["reasoning_content"] = "R"
    out = encode_messages(messages, "thinking")
    invoke = (
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k" string="false">{k}'
        "</｜DSML｜parameter>\n</｜DSML｜invoke>"
    )
    assert out.endswith(
        A + TS + "R" + TE + "\n\n<｜DSML｜tool_calls>\n"
        + "\n".join(invoke.format(k=k) for k in range(3))
        + "\n</｜DSML｜tool_calls>" + EOS
    )


def test_reasoning_effort_max_prefix_follows_bos_in_thinking_mode():
    messages = [SYS, {"role": "user", "content": "Q"}]
    assert encode_messages(messages, "thinking", reasoning_effort="max") == (
        BOS + REASONING_EFFORT_MAX + "S" + U + "Q" + A + TS
    )
    assert REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum")
    assert REASONING_EFFORT_MAX.endswith("left unchecked.\n\n")
    assert encode_messages(messages, "chat", reasoning_effort="max") == encode_messages(messages, "chat")
    assert encode_messages(messages, "thinking", reasoning_effort="high") == encode_messages(
        messages, "thinking"
    )


@pytest.mark.parametrize("task", ["query", "authority", "domain", "read_url"])
def test_non_action_task_token_follows_the_user_content(task):
    messages = [{"role": "user", "content": "Q", "task": task}, {"role": "assistant", "content": "out"}]
    for mode in ("chat", "thinking"):
        assert encode_messages(messages, mode) == BOS + U + "Q" + TASK_TOKENS[task] + "out" + EOS


@pytest.mark.parametrize("mode, think", [("chat", TE), ("thinking", TS)])
def test_action_task(mode, think):
    messages = [
        {"role": "user", "content": "Q", "task": "action"},
        {"role": "assistant", "content": "Search", "reasoning_content": "never shown"},
    ]
    assert encode_messages(messages, mode) == BOS + U + "Q" + A + think + "<｜action｜>Search" + EOS


def test_title_task_token_follows_the_assistant_eos():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "task": "title"},
        {"role": "assistant", "content": "T"},
    ]
    assert encode_messages(messages, "thinking", drop_thinking=False) == (
        BOS + U + "Q" + A + TS + TE + "A" + EOS + "<｜title｜>" + "T" + EOS
    )


def test_wo_eos_leaves_the_turn_open():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "par", "wo_eos": True}]
    assert encode_messages(messages, "chat") == BOS + U + "Q" + A + TE + "par"


def test_bos_options():
    messages = [{"role": "user", "content": "Q"}]
    assert encode_messages(messages, "chat", add_default_bos_token=False) == U + "Q" + A + TE
    assert encode_messages([], "chat") == BOS


def _incremental(messages, mode, split, **kw):
    head = encode_messages(messages[:split], mode, **kw)
    tail = encode_messages(messages[split:], mode, context=messages[:split], **kw)
    return head + tail


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_incremental_encoding_with_context_in_chat_mode(split):
    messages = two_turns()
    assert _incremental(messages, "chat", split) == encode_messages(messages, "chat")


@pytest.mark.parametrize("split", [1, 2, 3, 6, 7])
def test_incremental_encoding_in_a_tool_loop(split):
    """Agentic loops (tools present, reasoning kept) extend the prompt without re-encoding it."""
    messages = _tool_conversation([0, 1, 2]) + [
        {"role": "assistant", "reasoning_content": "R", "content": "done"},
        {"role": "user", "content": "thanks"},
    ]
    messages[0] = {**SYS, "tools": TOOLS}
    full = encode_messages(messages, "thinking", reasoning_effort="max")
    assert _incremental(messages, "thinking", split, reasoning_effort="max") == full


def test_context_decides_dropping_and_suppresses_bos():
    context = two_turns()[:3]
    new = two_turns()[3:]
    out = encode_messages(new, "thinking", context=context)
    assert out == U + "Q2" + A + TS + "R2" + TE + "A2" + EOS
    assert not out.startswith(BOS)


def test_context_orders_tool_results_of_new_messages():
    messages = _tool_conversation([2, 1, 0])
    out = encode_messages(messages[3:], "chat", context=messages[:3])
    assert out == (
        U + "<tool_result>r0</tool_result>\n\n<tool_result>r1</tool_result>\n\n"
        "<tool_result>r2</tool_result>" + A + TE
    )


def test_input_is_not_mutated():
    messages = _tool_conversation([2, 0, 1]) + [{"role": "assistant", "content": "x", "reasoning_content": "y"}]
    before = copy.deepcopy(messages)
    encode_messages(messages, "thinking", context=None)
    encode_messages(messages[3:], "thinking", context=messages[:3])
    assert messages == before
