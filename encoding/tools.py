"""Tool schemas and DSML tool calls (spec §9.4): the text both the encoder and the parser agree on.

The released encoder renders tool definitions as a fixed English block appended to the system (or
developer) message, and tool calls as DSML markup. Both must match byte for byte, because the model
was trained on exactly these strings; the block text below was checked against the official
conformance outputs. Keeping rendering and decoding of arguments together makes the round trip
`decode(encode(args)) == args` easy to reason about.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from encoding.special_tokens import (
    DSML,
    INVOKE_END,
    PARAMETER_END,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
)

INVOKE_START = f"<{DSML}invoke"
PARAMETER_START = f"<{DSML}parameter"
# What separates an assistant's content from its tool-call block. The parser looks for this exact
# prefix (without the closing `>`) so it stops reading content at the first tool block.
TOOL_BLOCK_OPENER = "\n\n" + TOOL_CALLS_START[:-1]

TOOLS_BLOCK_TEMPLATE = (
    "## Tools\n"
    "\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by"
    f' writing a "{TOOL_CALLS_START}" block like the following:\n'
    "\n"
    f"{TOOL_CALLS_START}\n"
    f'{INVOKE_START} name="$TOOL_NAME">\n'
    f'{PARAMETER_START} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}\n'
    "...\n"
    f"{INVOKE_END}\n"
    f'{INVOKE_START} name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_END}\n"
    f"{TOOL_CALLS_END}\n"
    "\n"
    'String parameters should be specified as is and set `string="true"`. For all other types'
    ' (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n'
    "\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete"
    f" reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n"
    "\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n"
    "\n"
    "### Available Tool Schemas\n"
    "\n"
    "{tool_schemas}\n"
    "\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

RESPONSE_FORMAT_PREFIX = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


def to_json(value: Any) -> str:
    """JSON the way the released encoder writes it: default separators, non-ASCII kept verbatim.

    Falls back to ASCII escapes for the rare value that cannot be written unescaped (for example
    a lone surrogate that a UTF-8 consumer would reject later).
    """
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, UnicodeError):
        return json.dumps(value, ensure_ascii=True)


def render_tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The `## Tools` block for OpenAI-style tools (`{"type": "function", "function": {...}}`).

    Only the inner `function` objects are shown to the model, one JSON object per line, in order.
    """
    schemas = "\n".join(to_json(tool["function"]) for tool in tools)
    return TOOLS_BLOCK_TEMPLATE.replace("{tool_schemas}", schemas)


def render_response_format(schema: Any) -> str:
    """The `## Response Format` block appended to a system/developer message."""
    return RESPONSE_FORMAT_PREFIX + to_json(schema)


def arguments_as_mapping(arguments: Any) -> dict[str, Any]:
    """Turn a tool call's `arguments` into the key/value pairs that become DSML parameters.

    OpenAI messages carry arguments as a JSON string; a dict is accepted too. A string that is not
    a JSON object cannot be split into parameters, so, like the released encoder, the whole string
    becomes one string parameter named `arguments` (nothing the model wrote is lost).
    """
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        return {"arguments": arguments}
    return parsed


def render_parameter(name: str, value: Any) -> str:
    """One DSML parameter: strings are written raw (`string="true"`), anything else as JSON."""
    if isinstance(value, str):
        return f'{PARAMETER_START} name="{name}" string="true">{value}{PARAMETER_END}'
    return f'{PARAMETER_START} name="{name}" string="false">{to_json(value)}{PARAMETER_END}'


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block an assistant message ends with (before EOS), including the leading blank line."""
    invokes = []
    for call in tool_calls:
        function = call["function"]
        params = "\n".join(
            render_parameter(k, v) for k, v in arguments_as_mapping(function["arguments"]).items()
        )
        invokes.append(f'{INVOKE_START} name="{function["name"]}">\n{params}\n{INVOKE_END}')
    return f"\n\n{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def arguments_json_from_parameters(params: Sequence[tuple[str, str, bool]]) -> str:
    """Rebuild the OpenAI `arguments` JSON text from parsed `(name, raw_value, is_string)` triples.

    String values are JSON-encoded; non-string values are already JSON and are inserted verbatim
    so their formatting survives (the released parser does the same). For arguments the encoder
    wrote, this reproduces `json.dumps(args)` exactly.
    """
    items = (
        f"{to_json(name)}: {to_json(raw) if is_string else raw}" for name, raw, is_string in params
    )
    return "{" + ", ".join(items) + "}"
