"""What the server makes of a reply's tokens (`serve/text.py`): streamed pieces add up to the
final text and never include what a stop string or a format marker later takes back; a V4
reply with reasoning and a DSML tool call becomes an OpenAI message with `tool_calls`."""

import json

import pytest

from encoding.tools import render_tool_calls
from serve.text import ChatStream, ChoiceText, chat_message, split_reply


class CharTokenizer:
    """One character per token id (ord), so tests can script replies as text."""

    bos_token = eos_token = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def stream(text: str, maker):
    pieces = []
    for ch in text:
        pieces.append(maker.push(ord(ch)))
    return pieces, maker


def test_stop_string_prefix_is_held_back_and_cut():
    text = ChoiceText(CharTokenizer(), ["END"])
    safe = []
    for ch in "abc ENxEND tail":
        text.ids.append(ord(ch))
        safe.append(text.safe())
    assert safe[4] == "abc " and safe[5] == "abc "   # "E", "EN": maybe a stop string
    assert safe[6] == "abc ENx"                      # it was not
    assert text.text() == "abc ENx"                  # cut before the stop string
    assert all(a == b[:len(a)] for a, b in zip(safe, safe[1:]))  # only ever grows


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_chat_stream_adds_up_and_tool_calls_are_parsed(mode):
    calls = [{"type": "function", "function": {"name": "calculator",
                                                "arguments": json.dumps({"expression": "2+3"})}}]
    reasoning = "add them</think>" if mode == "thinking" else ""
    reply = reasoning + "Let me compute." + render_tool_calls(calls)
    chat = ChatStream(CharTokenizer(), [], mode)
    deltas = [chat.push(ord(ch)) for ch in reply] + [chat.rest()]
    sent = {k: "".join(d.get(k, "") for d in deltas) for k in ("reasoning_content", "content")}
    assert sent["content"] == "Let me compute."          # the DSML block is never streamed
    assert sent["reasoning_content"] == ("add them" if mode == "thinking" else "")
    message, has_calls = chat_message(reply, mode)
    assert has_calls and message["tool_calls"][0]["function"]["name"] == "calculator"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"expression": "2+3"}
    assert message["tool_calls"][0]["id"].startswith("call_")
    assert message["content"] == "Let me compute."


def test_split_reply_before_think_end():
    assert split_reply("still thinking", "thinking") == ("still thinking", "")
    assert split_reply("plain answer", "chat") == ("", "plain answer")
