"""Input checks for `encode_messages`, run before any rendering.

The released encoder uses bare asserts (or crashes deep inside string formatting, or silently
renders `None`). SFT and RL data are produced by many scripts, so a bad record must fail with a
`ValueError` that names the list, the message index and the field, e.g.
`messages[3].tool_call_id: ...`. The rules here are exactly those the renderer relies on.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
# Quick-instruction tasks the released encoder accepts (spec §9.6). `extracted_url` is a
# registered special token but not a task the encoder renders.
VALID_TASKS = ("action", "query", "authority", "domain", "title", "read_url")
# Roles whose message may declare tools / a response format: the only ones that render them.
_TOOL_HOSTS = ("system", "developer")


def check_options(thinking_mode: Any, reasoning_effort: Any) -> None:
    """Reject an unknown thinking mode or reasoning effort up front."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode: expected 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort: expected None, 'high' or 'max', got {reasoning_effort!r}"
        )


def _where(prefix: str, index: int, field: str) -> str:
    return f"{prefix}[{index}].{field}"


def _check_text(msg: Mapping, prefix: str, i: int, field: str, *, required: bool) -> None:
    value = msg.get(field)
    if value is None:
        if required:
            raise ValueError(f"{_where(prefix, i, field)}: required for role {msg['role']!r}")
        return
    if not isinstance(value, str):
        raise ValueError(
            f"{_where(prefix, i, field)}: expected a string, got {type(value).__name__}"
        )


def _check_json(value: Any, where: str) -> None:
    """Values the encoder writes as JSON must serialise (a set or an object would crash later)."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not JSON-serialisable ({error})") from None


def _check_tool_content(msg: Mapping, prefix: str, i: int) -> None:
    """Tool results may be a string or a list of OpenAI content parts (`{"type": "text", ...}`)."""
    content = msg.get("content")
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and isinstance(part.get("type"), str) for part in content
    ):
        for part in content:
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{_where(prefix, i, 'content')}: text part without a string 'text'")
        return
    raise ValueError(
        f"{_where(prefix, i, 'content')}: a tool result must be a string or a list of content "
        f"parts, got {type(content).__name__}"
    )


def _check_tools(msg: Mapping, prefix: str, i: int) -> None:
    role = msg["role"]
    for field in ("tools", "response_format"):
        if msg.get(field) and role not in _TOOL_HOSTS:
            raise ValueError(
                f"{_where(prefix, i, field)}: only rendered on system or developer messages, "
                f"not on role {role!r} (attach it to the system message)"
            )
    if msg.get("response_format"):
        _check_json(msg["response_format"], _where(prefix, i, "response_format"))
    tools = msg.get("tools")
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{_where(prefix, i, 'tools')}: expected a list, got {type(tools).__name__}")
    for k, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise ValueError(
                f"{_where(prefix, i, f'tools[{k}]')}: expected {{'type': 'function', "
                f"'function': {{...}}}}"
            )
        _check_json(tool["function"], _where(prefix, i, f"tools[{k}].function"))


def _call_ids(msg: Mapping) -> list[str]:
    ids = []
    for call in msg.get("tool_calls") or ():
        call_id = call.get("id") or call["function"].get("id")
        if call_id:
            ids.append(call_id)
    return ids


def _check_tool_calls(msg: Mapping, prefix: str, i: int) -> None:
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if msg["role"] != "assistant":
        raise ValueError(f"{_where(prefix, i, 'tool_calls')}: only assistant messages make tool calls")
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{_where(prefix, i, 'tool_calls')}: expected a list, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        field = f"tool_calls[{k}].function"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"{_where(prefix, i, field)}: expected a mapping with name and arguments")
        for where, holder in ((f"tool_calls[{k}].id", call), (field + ".id", function)):
            if holder.get("id") is not None and not isinstance(holder["id"], str):
                raise ValueError(f"{_where(prefix, i, where)}: expected a string")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{_where(prefix, i, field + '.name')}: expected a non-empty string")
        arguments = function.get("arguments")
        if not isinstance(arguments, (str, Mapping)):
            raise ValueError(
                f"{_where(prefix, i, field + '.arguments')}: expected a JSON string or a mapping, "
                f"got {type(arguments).__name__}"
            )
        if isinstance(arguments, Mapping):
            if not all(isinstance(key, str) for key in arguments):
                raise ValueError(
                    f"{_where(prefix, i, field + '.arguments')}: parameter names must be strings"
                )
            _check_json(dict(arguments), _where(prefix, i, field + ".arguments"))


def _check_message(msg: Any, prefix: str, i: int) -> None:
    if not isinstance(msg, Mapping):
        raise ValueError(f"{prefix}[{i}]: expected a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{_where(prefix, i, 'role')}: unknown role {role!r}; expected one of {ROLES}")
    if role == "tool":
        _check_tool_content(msg, prefix, i)
    else:
        required = role in ("developer", "latest_reminder")
        _check_text(msg, prefix, i, "content", required=required)
        if role == "developer" and not msg["content"]:
            raise ValueError(f"{_where(prefix, i, 'content')}: a developer message needs content")
    _check_text(msg, prefix, i, "reasoning_content", required=False)
    if msg.get("tool_call_id") is not None and not isinstance(msg["tool_call_id"], str):
        raise ValueError(f"{_where(prefix, i, 'tool_call_id')}: expected a string")
    _check_tools(msg, prefix, i)
    _check_tool_calls(msg, prefix, i)
    task = msg.get("task")
    if task is not None and task not in VALID_TASKS:
        raise ValueError(f"{_where(prefix, i, 'task')}: unknown task {task!r}; expected one of {VALID_TASKS}")
    if not isinstance(msg.get("wo_eos", False), bool):
        raise ValueError(f"{_where(prefix, i, 'wo_eos')}: expected a bool")


def check_messages(context: Sequence[Any], messages: Sequence[Any]) -> None:
    """Validate every message, and that each `tool` result answers a call made before it.

    A tool message must follow an assistant message with `tool_calls` (other tool results or
    user text may sit in between). When both the result and the calls carry ids, the id must be
    one of the calls: results are ordered by those ids, so a stray id would be silently misplaced.
    """
    for prefix, seq in (("context", context), ("messages", messages)):
        if not isinstance(seq, (list, tuple)):
            raise ValueError(f"{prefix}: expected a list of message dicts, got {type(seq).__name__}")
    open_call_ids: list[str] | None = None  # None: no assistant tool call to answer
    for prefix, seq in (("context", context), ("messages", messages)):
        for i, msg in enumerate(seq):
            _check_message(msg, prefix, i)
            role = msg["role"]
            if role == "assistant":
                open_call_ids = _call_ids(msg) if msg.get("tool_calls") else None
            elif role == "tool":
                if open_call_ids is None:
                    raise ValueError(
                        f"{_where(prefix, i, 'role')}: tool result with no preceding assistant "
                        "tool call"
                    )
                call_id = msg.get("tool_call_id")
                if call_id and open_call_ids and call_id not in open_call_ids:
                    raise ValueError(
                        f"{_where(prefix, i, 'tool_call_id')}: {call_id!r} matches none of the "
                        f"preceding assistant's tool call ids {open_call_ids}"
                    )
