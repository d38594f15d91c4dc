"""CHAT_TEMPLATE through Hugging Face's apply_chat_template matches encode_messages and the mask."""

from __future__ import annotations

import copy

import pytest
from jinja2.exceptions import TemplateError

from encoding import CHAT_TEMPLATE, encode_messages, tokenize_conversation

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}},
    }
]


def conversation():
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "latest_reminder", "content": "2026-02-21"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
        {"role": "user", "content": "In Beijing."},
        {
            "role": "assistant",
            "reasoning_content": "call it",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": [1, 2]}}}
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye", "wo_eos": True},
    ]


def with_tools(messages, tools):
    """What tokenize_conversation does with its `tools` argument."""
    messages = copy.deepcopy(messages)
    if tools:
        if messages and messages[0]["role"] == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return messages


def render(tokenizer, messages, **kw):
    return tokenizer.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kw)


OPTIONS = [
    {},
    {"drop_thinking": False},
    {"reasoning_effort": "max"},
    {"tools": TOOLS},
]


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "keep", "max", "tools"])
@pytest.mark.parametrize("cut", [3, 5, 7, 9])
def test_template_matches_encoder(tokenizer, mode, options, cut):
    messages = conversation()[:cut]
    options = dict(options)
    tools = options.pop("tools", None)
    got = render(tokenizer, messages, thinking_mode=mode, tools=tools, **options)
    assert got == encode_messages(with_tools(messages, tools), mode, **options)


def test_tools_without_system_message(tokenizer):
    messages = conversation()[2:5]
    assert render(tokenizer, messages, tools=TOOLS) == encode_messages(with_tools(messages, TOOLS), "chat")


def test_thinking_aliases_and_default(tokenizer):
    messages = conversation()[:5]
    thinking = encode_messages(messages, "thinking")
    assert render(tokenizer, messages, thinking=True) == thinking
    assert render(tokenizer, messages, enable_thinking=True) == thinking
    assert render(tokenizer, messages) == encode_messages(messages, "chat")
    assert tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("mask_override", [None, 0, 1])
def test_assistant_mask_matches_tokenize_conversation(tokenizer, mode, mask_override):
    messages = conversation()
    if mask_override is not None:
        messages[3]["mask"] = mask_override
    out = tokenizer.apply_chat_template(
        copy.deepcopy(messages), thinking_mode=mode, return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = tokenize_conversation(tokenizer, messages, mode)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    assert sum(mask) > 0


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "r"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": "q", "task": "action"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
    ],
)
def test_unsupported_input_raises(tokenizer, message):
    with pytest.raises(TemplateError):
        render(tokenizer, [{"role": "user", "content": "Q"}, message])
