"""`parse_message_from_completion_text`: generated text back to an assistant message (spec §9.8).

Input is what the model generated after the prompt (`<｜Assistant｜>` plus `<think>` or
`</think>`), normally ending with EOS. Two modes:

- strict (default): accepts what the released parser accepts, and additionally requires
  `string="false"` parameter values to be valid JSON (otherwise `arguments` would not be JSON).
  Any deviation raises `ParseError`, which says what was expected and at which character offset.
  Use it for data that must be well formed (SFT data checks, tests).
- lenient (`strict=False`), for production decoding: generation cut off before EOS, a missing
  `</think>`, a malformed or truncated tool block. It never raises on malformed text; it returns
  what it could recover and lists every problem under `parse_issues` (empty when the text was
  well formed), each `{"kind", "offset", "message"}`. Kinds: `missing_think_end`, `missing_eos`,
  `malformed_tool_calls`, `invalid_parameter_json`, `duplicate_parameter`, `trailing_text`,
  `special_token_in_text`. Recovery rules: without `</think>` everything up to the tool block /
  EOS / end is reasoning; without EOS the rest is content; from a broken tool block the complete
  invokes before the break are kept; a non-JSON `string="false"` value is kept as a string; a
  duplicate parameter keeps its first value; text after EOS is ignored.
"""

from __future__ import annotations

import json
from typing import Any

from encoding.special_tokens import (
    BOS,
    DSML,
    EOS,
    INVOKE_END,
    PARAMETER_END,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
)
from encoding.tools import INVOKE_START, PARAMETER_START, TOOL_BLOCK_OPENER, arguments_json_from_parameters
from encoding.validate import THINKING_MODES

_FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML)


class ParseError(ValueError):
    """Malformed completion text: `expected` was not found at character `offset`.

    Positional arguments only, so the exception pickles (e.g. across DataLoader workers).
    """

    def __init__(self, message: str, expected: str = "", offset: int = -1) -> None:
        super().__init__(message, expected, offset)
        self.message, self.expected, self.offset = message, expected, offset

    def __str__(self) -> str:
        return self.message

    @classmethod
    def at(cls, expected: str, offset: int, text: str, detail: str = "") -> "ParseError":
        """Build the error with a message quoting what was found at `offset`."""
        found = text[offset : offset + 40]
        message = f"expected {expected} at character offset {offset}, found {found!r}"
        return cls(f"{detail}: {message}" if detail else message, expected, offset)


class _Issues:
    """Collects problems in lenient mode; raises them as ParseError in strict mode."""

    def __init__(self, text: str, strict: bool) -> None:
        self.text, self.strict, self.items = text, strict, []

    def report(self, kind: str, expected: str, offset: int, detail: str) -> None:
        error = ParseError.at(expected, offset, self.text, detail)
        if self.strict:
            raise error
        self.items.append({"kind": kind, "offset": offset, "message": str(error)})


class _ToolBlockParser:
    """Reads the DSML block after `\\n\\n<｜DSML｜tool_calls`, in the encoder's exact layout.

    Each `expect`/`read_until` raises ParseError at the offending offset; lenient callers catch
    it per invoke so complete invokes survive a broken or truncated tail.
    """

    def __init__(self, text: str, pos: int, issues: _Issues) -> None:
        self.text, self.pos, self.issues = text, pos, issues

    def expect(self, literal: str, detail: str) -> None:
        if not self.text.startswith(literal, self.pos):
            raise ParseError.at(repr(literal), self.pos, self.text, detail)
        self.pos += len(literal)

    def read_until(self, literal: str, detail: str) -> str:
        end = self.text.find(literal, self.pos)
        if end == -1:
            raise ParseError.at(repr(literal), len(self.text), self.text, detail)
        value, self.pos = self.text[self.pos : end], end + len(literal)
        return value

    def parse_invoke(self) -> dict[str, Any]:
        """One `<｜DSML｜invoke name="N">` ... `</｜DSML｜invoke>`; `pos` is just after `invoke`."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        self.expect('name="', "tool call")
        name = self.read_until('">\n', "tool name")
        params: list[tuple[str, str, bool]] = []
        seen: set[str] = set()
        if self.text.startswith("\n", self.pos):  # no parameters: an empty line
            self.pos += 1
        while self.text.startswith(PARAMETER_START, self.pos):
            start = self.pos
            self.pos += len(PARAMETER_START)
            self.expect(' name="', "tool parameter")
            key = self.read_until('" string="', "tool parameter name")
            if self.text.startswith('true">', self.pos):
                is_string, self.pos = True, self.pos + len('true">')
            elif self.text.startswith('false">', self.pos):
                is_string, self.pos = False, self.pos + len('false">')
            else:
                raise ParseError.at("'true\">' or 'false\">'", self.pos, self.text, "string attribute")
            value_at = self.pos
            value = self.read_until(PARAMETER_END, "tool parameter value")
            self.expect("\n", "after a tool parameter")
            if not is_string:
                try:
                    json.loads(value)
                except ValueError:
                    self.issues.report("invalid_parameter_json", "a JSON value", value_at,
                                       f'parameter "{key}" has string="false" but is not JSON')
                    is_string = True
            if key in seen:
                self.issues.report("duplicate_parameter", "a new parameter name", start,
                                   f'duplicate parameter "{key}"')
                continue
            seen.add(key)
            params.append((key, value, is_string))
        self.expect(INVOKE_END, "end of tool call")
        self.expect("\n", "after a tool call")
        return {
            "type": "function",
            "function": {"name": name, "arguments": arguments_json_from_parameters(params)},
        }

    def parse_block(self, calls: list[dict[str, Any]]) -> None:
        """Appends each complete invoke to `calls` (so a caller keeps them if a later one breaks)."""
        self.expect(">\n", "tool call block")
        while not self.text.startswith(TOOL_CALLS_END, self.pos):
            self.expect(INVOKE_START, f"a tool call or {TOOL_CALLS_END}")
            calls.append(self.parse_invoke())
        self.pos += len(TOOL_CALLS_END)


def _find_first(text: str, pos: int, *needles: str) -> tuple[int, str | None]:
    """Earliest occurrence of any needle at or after pos: (offset, needle) or (len, None)."""
    best, which = len(text), None
    for needle in needles:
        at = text.find(needle, pos)
        if at != -1 and at < best:
            best, which = at, needle
    return best, which


def parse_message_from_completion_text(
    text: str, thinking_mode: str, *, strict: bool = True
) -> dict[str, Any]:
    """Parse generated text into `{role, content, reasoning_content, tool_calls}`.

    `tool_calls` are OpenAI-style (`{"type": "function", "function": {"name", "arguments"}}`,
    arguments as JSON text). With `strict=False` the dict also has `parse_issues` (see module
    docstring). Raises ParseError (a ValueError) on malformed text in strict mode, and
    ValueError for an unknown thinking mode or non-string text in either mode.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode: expected 'chat' or 'thinking', got {thinking_mode!r}")
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    issues = _Issues(text, strict)
    reasoning, pos = "", 0

    if thinking_mode == "thinking":
        at, which = _find_first(text, 0, THINK_END, TOOL_BLOCK_OPENER)
        if which == THINK_END:
            reasoning, pos = text[:at], at + len(THINK_END)
        else:
            issues.report("missing_think_end", repr(THINK_END), at, "reasoning not closed")
            stop = at if which else _find_first(text, 0, EOS)[0]
            reasoning, pos = text[:stop], stop

    at, which = _find_first(text, pos, EOS, TOOL_BLOCK_OPENER)
    content = text[pos:at]
    tool_calls: list[dict[str, Any]] = []
    if which == TOOL_BLOCK_OPENER:
        parser = _ToolBlockParser(text, at + len(TOOL_BLOCK_OPENER), issues)
        try:
            parser.parse_block(tool_calls)
        except ParseError as error:
            if strict:
                raise
            issues.items.append(
                {"kind": "malformed_tool_calls", "offset": error.offset, "message": str(error)}
            )
            end = len(text)
        else:
            end = parser.pos
            # Like the released parser: only EOS (or nothing) may follow the block.
            if text.startswith(EOS, end):
                end += len(EOS)
            elif end < len(text):
                issues.report("trailing_text", repr(EOS), end, "text after the tool call block")
                end = len(text)
    elif which == EOS:
        end = at + len(EOS)
    else:
        issues.report("missing_eos", repr(EOS), len(text), "generation ended without EOS")
        end = len(text)
    if end < len(text):
        issues.report("trailing_text", "end of text", end, "text after EOS")

    for field_text, base in ((reasoning, 0), (content, pos)):
        for token in _FORBIDDEN_IN_TEXT:
            found = field_text.find(token)
            if found != -1:
                issues.report("special_token_in_text", "plain text", base + found,
                              f"special string {token!r} inside the message text")

    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": tool_calls,
    }
    if not strict:
        message["parse_issues"] = issues.items
    return message
