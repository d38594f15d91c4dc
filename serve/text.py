"""From a sample's token ids to what the client sees: the text (cut before a stop string), the
chat message (reasoning, content, tool calls, in the V4 format), and the pieces a stream sends.

A stream never sends text it may have to take back: the whole reply is decoded again at each
token (bytes that form one character together are sent once complete), and a tail that could
still grow into a stop string or a format marker (`</think>`, the DSML tool-call opener) waits
until it cannot. So the streamed pieces always add up to the final text.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from encoding import encode_messages, parse_message_from_completion_text
from encoding.special_tokens import THINK_END
from encoding.tokenizer import visible_text
from encoding.tools import TOOL_BLOCK_OPENER

from .protocol import APIError


class ChoiceText:
    """One sample's text as its tokens arrive."""

    def __init__(self, tokenizer, stops: list[str], markers: tuple[str, ...] = ()):
        self.tokenizer, self.stops, self.markers = tokenizer, stops, markers
        self.ids: list[int] = []

    def text(self) -> str:
        """The reply so far, cut before the first stop string."""
        text = visible_text(self.tokenizer, self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:cut]

    def safe(self) -> str:
        """The part of `text()` no later token can change."""
        text = self.text()
        if text.endswith("\ufffd"):  # a character still missing bytes
            text = text[:-1]
        held = 0
        for s in (*self.stops, *self.markers):
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return text[:len(text) - held]


def split_reply(text: str, mode: str) -> tuple[str, str]:
    """(reasoning, visible content) of a partial reply: thinking mode reasons until `</think>`;
    content stops where a tool-call block starts (the calls are sent parsed, at the end)."""
    reasoning, content = "", text
    if mode == "thinking":
        head, sep, tail = text.partition(THINK_END)
        reasoning, content = (head, tail) if sep else (head, "")
    return reasoning, content.split(TOOL_BLOCK_OPENER)[0]


class ChatStream:
    """The deltas of one chat choice: reasoning_content, then content; tool calls at the end."""

    def __init__(self, tokenizer, stops: list[str], mode: str):
        self.text = ChoiceText(tokenizer, stops, (THINK_END, TOOL_BLOCK_OPENER))
        self.mode, self.sent = mode, ("", "")

    def push(self, token: int) -> dict[str, str]:
        self.text.ids.append(token)
        return self._delta(self.text.safe())

    def _delta(self, text: str) -> dict[str, str]:
        now = split_reply(text, self.mode)
        delta = {}
        for key, before, after in zip(("reasoning_content", "content"), self.sent, now):
            if len(after) > len(before):
                delta[key] = after[len(before):]
        self.sent = (max(self.sent[0], now[0], key=len), max(self.sent[1], now[1], key=len))
        return delta

    def rest(self) -> dict[str, str]:
        """What remains to send once the sample has ended."""
        return self._delta(self.text.text())


def chat_prompt(request, tokenizer) -> list[int]:
    """The request's messages (tools attached to the system message, as the V4 format
    renders them) encoded in its reasoning mode, as token ids."""
    messages = [_openai_message(m, i) for i, m in enumerate(request.messages)]
    if request.tools and request.tool_choice != "none":
        if messages[0].get("role") in ("system", "developer"):
            messages[0] = {**messages[0], "tools": request.tools}
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": request.tools})
    mode, effort = request.modes
    try:
        text = encode_messages(messages, thinking_mode=mode, reasoning_effort=effort)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _openai_message(message: dict[str, Any], i: int) -> dict[str, Any]:
    """OpenAI message shapes the V4 encoder does not take: content parts joined, a null
    content as empty text, tool-call ids and `name` dropped."""
    out = {k: v for k, v in message.items() if k not in ("name", "tool_call_id", "refusal")}
    content = out.get("content")
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)
                 and p.get("type") == "text"]
        if len(parts) != len(content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported",
                           f"messages[{i}].content")
        out["content"] = "".join(parts)
    elif content is None:
        out["content"] = ""
    if out.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": call.get("function")}
                             for call in out["tool_calls"]]
    return out


def chat_message(text: str, mode: str) -> tuple[dict[str, Any], bool]:
    """The assistant message of a finished reply -> (message, has tool calls)."""
    parsed = parse_message_from_completion_text(text, mode, strict=False)
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c["function"]["name"],
                           "arguments": _json_text(c["function"]["arguments"])}}
             for c in parsed.get("tool_calls") or []]
    message = {"role": "assistant", "content": parsed.get("content") or
               (None if calls else "")}
    if parsed.get("reasoning_content"):
        message["reasoning_content"] = parsed["reasoning_content"]
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def finish_reason(engine_reason: str, tool_calls: bool = False) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if engine_reason == "length" else "stop"
