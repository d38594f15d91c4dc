"""`encode_messages`: OpenAI-style messages to the DeepSeek-V4 prompt string (spec §9.2-§9.7).

DeepSeek-V4 has no Jinja template; its format is defined by Python string assembly, and the model
only behaves as trained when the prompt matches that assembly byte for byte. This module
reproduces the released encoder's behaviour (checked against the official conformance cases)
with its own structure: messages are first normalised into `Turn`s (tool results merged into
user turns, ordered by call id; earlier developer turns dropped when reasoning is dropped), then
each turn is rendered into `Segment`s. A segment records which message produced it and whether
the assistant generated it, which is what `tokenizer.tokenize_conversation` needs for loss masks.

Quirks kept on purpose, because the released encoder has them and byte-exactness wins:
- consecutive user messages (and tool results followed by user text) become one user turn whose
  blocks are joined by a blank line; only the first message's `task`/`mask`/`wo_eos` survive;
- after a user/developer turn, `<｜Assistant｜>` plus the thinking token is appended only when
  the next turn is an assistant or latest_reminder turn, or when it is the last turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from encoding.special_tokens import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_RESULT_END,
    TOOL_RESULT_START,
    USER,
)
from encoding.tools import render_response_format, render_tool_calls, render_tools_block
from encoding.validate import check_messages, check_options

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_USER_LIKE = ("user", "developer")


@dataclass
class Block:
    """One piece of a user turn: plain text, or a tool result answering call `call_id`."""

    kind: str  # "text" | "tool_result"
    text: str
    call_id: str = ""


@dataclass
class Turn:
    """A message after normalisation. `origin` is its index in `messages`, None for context."""

    role: str
    message: Mapping[str, Any]
    origin: int | None
    blocks: list[Block] | None = None  # user turns only

    def get(self, key: str, default: Any = None) -> Any:
        return self.message.get(key, default)


@dataclass
class Segment:
    """A run of prompt text. `generated` is True for what the assistant itself produced."""

    text: str
    origin: int | None = None
    generated: bool = False
    # For generated segments: True when the text is exactly what the model wrote at that point
    # (chat mode; thinking mode with this turn's reasoning rendered; a task output), False for
    # a thinking-mode turn whose reasoning was dropped. Drives the default SFT turn policy.
    faithful: bool = True


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append(part["text"])
        else:
            parts.append(f"[Unsupported {part['type']}]")
    return "\n\n".join(parts)


def merge_tool_messages(messages: Sequence[Mapping[str, Any]], origin_offset: int | None) -> list[Turn]:
    """Fold `tool` messages (and user text that follows them) into user turns.

    DeepSeek-V4 has no tool role: results are `<tool_result>` blocks inside a user turn.
    `origin_offset` is None for context messages (never rendered) and 0 for new messages.
    """
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        origin = None if origin_offset is None else origin_offset + i
        role = msg["role"]
        previous = turns[-1] if turns else None
        joinable = previous is not None and previous.role == "user"
        if role == "tool":
            block = Block("tool_result", _tool_result_text(msg["content"]), msg.get("tool_call_id") or "")
            if joinable:
                previous.blocks.append(block)
            else:
                turns.append(Turn("user", {"role": "user"}, origin, [block]))
        elif role == "user":
            block = Block("text", msg.get("content") or "")
            if joinable and previous.get("task") is None:
                previous.blocks.append(block)
            else:
                turns.append(Turn("user", msg, origin, [block]))
        else:
            turns.append(Turn(role, msg, origin))
    return turns


def sort_tool_results(turns: list[Turn]) -> None:
    """Order each user turn's tool results like the calls of the latest assistant tool call.

    Results without a known id sort as if they answered the first call (stable sort), and text
    blocks keep their positions, exactly as the released encoder does.
    """
    order: dict[str, int] = {}
    for turn in turns:
        if turn.role == "assistant" and turn.get("tool_calls"):
            order = {}
            for k, call in enumerate(turn.get("tool_calls")):
                call_id = call.get("id") or call["function"].get("id")
                if call_id:
                    order[call_id] = k
        elif turn.role == "user" and turn.blocks:
            results = [b for b in turn.blocks if b.kind == "tool_result"]
            if len(results) < 2 or not order:
                continue
            ranked = iter(sorted(results, key=lambda b: order.get(b.call_id, 0)))
            turn.blocks = [next(ranked) if b.kind == "tool_result" else b for b in turn.blocks]


def last_user_index(turns: Sequence[Turn]) -> int:
    """Index of the last user or developer turn, -1 if there is none."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].role in _USER_LIKE:
            return i
    return -1


def drop_earlier_developer_turns(turns: list[Turn]) -> list[Turn]:
    """When earlier reasoning is dropped, developer turns before the last user turn go too.

    (Earlier assistant turns stay; their reasoning is simply not rendered, see `_render_turn`.)
    """
    last = last_user_index(turns)
    return [t for i, t in enumerate(turns) if not (i < last and t.role == "developer")]


@dataclass
class _Mode:
    thinking: bool
    drop: bool  # earlier reasoning is dropped (thinking mode, drop_thinking, no tools anywhere)
    effort_max: bool


def _render_turn(i: int, turns: Sequence[Turn], last_user: int, mode: _Mode) -> list[Segment]:
    turn = turns[i]
    out: list[Segment] = []

    def prompt(text: str) -> None:
        out.append(Segment(text, turn.origin))

    if i == 0 and mode.thinking and mode.effort_max:
        prompt(REASONING_EFFORT_MAX)

    if turn.role in ("system", "developer"):
        text = (USER if turn.role == "developer" else "") + (turn.get("content") or "")
        if turn.get("tools"):
            text += "\n\n" + render_tools_block(turn.get("tools"))
        if turn.get("response_format"):
            text += "\n\n" + render_response_format(turn.get("response_format"))
        prompt(text)
    elif turn.role == "user":
        prompt(USER + "\n\n".join(
            f"{TOOL_RESULT_START}{b.text}{TOOL_RESULT_END}" if b.kind == "tool_result" else b.text
            for b in turn.blocks
        ))
    elif turn.role == "latest_reminder":
        prompt(LATEST_REMINDER + turn.get("content"))
    else:
        out.extend(_render_assistant(i, turns, last_user, mode))

    # Transition to the next assistant turn (or the generation prompt at the very end).
    if i + 1 < len(turns) and turns[i + 1].role not in ("assistant", "latest_reminder"):
        return out
    task = turn.get("task")
    if task is not None:
        if task == "action":
            prompt(ASSISTANT + (THINK_START if mode.thinking else THINK_END) + TASK_TOKENS[task])
        else:
            prompt(TASK_TOKENS[task])
    elif turn.role in _USER_LIKE:
        opens_thinking = mode.thinking and (not mode.drop or i >= last_user)
        prompt(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
    return out


def _render_assistant(i: int, turns: Sequence[Turn], last_user: int, mode: _Mode) -> list[Segment]:
    turn = turns[i]
    task_output = i > 0 and turns[i - 1].get("task") is not None
    show_reasoning = mode.thinking and not task_output and (not mode.drop or i > last_user)
    faithful = task_output or not mode.thinking or show_reasoning
    text = ""
    if show_reasoning:
        text += (turn.get("reasoning_content") or "") + THINK_END
    text += turn.get("content") or ""
    if turn.get("tool_calls"):
        text += render_tool_calls(turn.get("tool_calls"))
    if not turn.get("wo_eos", False):
        text += EOS
    return [Segment(text, turn.origin, generated=True, faithful=faithful)]


def encode_segments(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str,
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> list[Segment]:
    """`encode_messages`, but returning the prompt as attributed segments (same arguments)."""
    context = [] if context is None else context
    check_options(thinking_mode, reasoning_effort)
    check_messages(context, messages)
    context = list(context)

    context_turns = merge_tool_messages(context, None)
    turns = context_turns + merge_tool_messages(messages, 0)
    sort_tool_results(turns)

    thinking = thinking_mode == "thinking"
    # Reasoning of every turn is kept as soon as any message declares tools: tool-calling
    # trajectories interleave thinking across user turns (spec §9.3).
    drop = bool(drop_thinking) and not any(t.get("tools") for t in turns)
    first = len(context_turns)
    if thinking and drop:
        turns = drop_earlier_developer_turns(turns)
        first = len(drop_earlier_developer_turns(context_turns))
    mode = _Mode(thinking=thinking, drop=drop, effort_max=reasoning_effort == "max")

    segments: list[Segment] = []
    if add_default_bos_token and not context:
        segments.append(Segment(BOS))
    last_user = last_user_index(turns)
    for i in range(first, len(turns)):
        segments.extend(_render_turn(i, turns, last_user, mode))
    return segments


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str,
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Encode `messages` into the DeepSeek-V4 prompt string, byte-identical to the release.

    thinking_mode: "chat" (answer right after `</think>`) or "thinking" (reason inside
        `<think>...</think>` first).
    context: messages already encoded earlier. Only `messages` is rendered, without BOS, so
        `encode(context) + encode(messages, context=context)` extends a conversation
        incrementally; context still decides tool-result order and which reasoning is dropped.
    drop_thinking: in thinking mode, drop the reasoning of turns before the last user/developer
        message. Ignored (reasoning kept) when any message carries `tools`.
    reasoning_effort: None, "high" (same as None) or "max" (thinking mode: a fixed instruction
        right after BOS).
    Raises ValueError naming the message index and field for invalid input.
    """
    return "".join(
        s.text
        for s in encode_segments(
            messages, thinking_mode, context, drop_thinking, add_default_bos_token, reasoning_effort
        )
    )
