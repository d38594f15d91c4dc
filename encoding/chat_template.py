"""A Jinja chat template that reproduces `encode_messages` for the common cases.

Hugging Face tooling (TRL, lm-eval, serving stacks) only knows `tokenizer.apply_chat_template`.
DeepSeek-V4 ships no template, so this bridge renders, byte-identically to `encode_messages`:
system / user / assistant / latest_reminder messages, chat and thinking modes, dropping of
earlier reasoning (`drop_thinking`, default true), `reasoning_effort="max"`, `wo_eos`, tools
passed as `apply_chat_template(..., tools=...)` (rendered in the first system message, or in an
empty system message in front, as `tokenize_conversation` does), and assistant `tool_calls`
whose `arguments` are a mapping (Jinja cannot parse a JSON string). Template variables:
`thinking_mode` ("chat" default, or "thinking"; `thinking=True`/`enable_thinking=True` also
select thinking), `drop_thinking`, `reasoning_effort`.

Not covered (the template raises; use `encode_messages`): tool results, developer messages,
quick-instruction tasks, per-message `tools`/`response_format`, string tool-call arguments.
Like the released encoder, the `<｜Assistant｜>` generation prompt after a final user message is
always written, whatever `add_generation_prompt` says.

Trained assistant turns (the `tokenize_conversation` policy, including a per-message `mask`)
are wrapped in `{% generation %}` blocks, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` yields the same SFT mask. That tag, `raise_exception` and
the `tojson` filter are Hugging Face's Jinja environment; plain Jinja cannot render this template.
All literal text is emitted through `{{ ... }}` expressions and the template has no whitespace
between tags, so Hugging Face's `trim_blocks`/`lstrip_blocks` settings cannot alter it.
"""

from __future__ import annotations

import json

from encoding.encode import REASONING_EFFORT_MAX
from encoding.special_tokens import (
    ASSISTANT,
    BOS,
    EOS,
    INVOKE_END,
    LATEST_REMINDER,
    PARAMETER_END,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    USER,
)
from encoding.tools import INVOKE_START, PARAMETER_START, TOOLS_BLOCK_TEMPLATE


def _lit(text: str) -> str:
    """A Jinja string literal for `text` (Jinja unescapes string literals like Python does)."""
    return json.dumps(text, ensure_ascii=False)


_TOOLS_HEAD, _TOOLS_TAIL = TOOLS_BLOCK_TEMPLATE.split("{tool_schemas}")

_PIECES = [
    # Constants.
    "{%- set BOS = " + _lit(BOS) + " -%}",
    "{%- set EOS = " + _lit(EOS) + " -%}",
    "{%- set USER = " + _lit(USER) + " -%}",
    "{%- set ASSISTANT = " + _lit(ASSISTANT) + " -%}",
    "{%- set REMINDER = " + _lit(LATEST_REMINDER) + " -%}",
    "{%- set THINK_START = " + _lit(THINK_START) + " -%}",
    "{%- set THINK_END = " + _lit(THINK_END) + " -%}",
    "{%- set CALLS_START = " + _lit(TOOL_CALLS_START) + " -%}",
    "{%- set CALLS_END = " + _lit(TOOL_CALLS_END) + " -%}",
    "{%- set INVOKE_START = " + _lit(INVOKE_START) + " -%}",
    "{%- set INVOKE_END = " + _lit(INVOKE_END) + " -%}",
    "{%- set PARAM_START = " + _lit(PARAMETER_START) + " -%}",
    "{%- set PARAM_END = " + _lit(PARAMETER_END) + " -%}",
    # The tools block: fixed head, one JSON function object per line, fixed tail.
    "{%- macro tools_block() -%}",
    "{{ " + _lit("\n\n" + _TOOLS_HEAD) + " }}",
    "{%- for tool in tools -%}",
    "{%- if not loop.first -%}{{ " + _lit("\n") + " }}{%- endif -%}",
    "{{ tool.function | tojson }}",
    "{%- endfor -%}",
    "{{ " + _lit(_TOOLS_TAIL) + " }}",
    "{%- endmacro -%}",
    # What the assistant wrote: reasoning (when shown), content, tool calls, EOS.
    "{%- macro assistant_body(m, show_reasoning) -%}",
    "{%- if show_reasoning -%}",
    "{{ m.reasoning_content or '' }}{{ THINK_END }}",
    "{%- endif -%}",
    "{{ m.content or '' }}",
    "{%- if m.tool_calls is defined and m.tool_calls -%}",
    "{{ " + _lit("\n\n") + " }}{{ CALLS_START }}{{ " + _lit("\n") + " }}",
    "{%- for call in m.tool_calls -%}",
    "{%- set fn = call.function if call.function is defined else call -%}",
    "{%- if fn.arguments is string -%}",
    "{{ raise_exception('chat template: tool call arguments must be a mapping, not a JSON "
    "string (or use encode_messages)') }}",
    "{%- endif -%}",
    "{%- if not loop.first -%}{{ " + _lit("\n") + " }}{%- endif -%}",
    "{{ INVOKE_START }}{{ ' name=\"' }}{{ fn.name }}{{ " + _lit('">\n') + " }}",
    "{%- for key, value in fn.arguments.items() -%}",
    "{%- if not loop.first -%}{{ " + _lit("\n") + " }}{%- endif -%}",
    "{{ PARAM_START }}{{ ' name=\"' }}{{ key }}",
    "{%- if value is string -%}{{ '\" string=\"true\">' }}{{ value }}",
    "{%- else -%}{{ '\" string=\"false\">' }}{{ value | tojson }}{%- endif -%}",
    "{{ PARAM_END }}",
    "{%- endfor -%}",
    "{{ " + _lit("\n") + " }}{{ INVOKE_END }}",
    "{%- endfor -%}",
    "{{ " + _lit("\n") + " }}{{ CALLS_END }}",
    "{%- endif -%}",
    "{%- if not (m.wo_eos is defined and m.wo_eos) -%}{{ EOS }}{%- endif -%}",
    "{%- endmacro -%}",
    # Options.
    "{%- if thinking_mode is defined and thinking_mode is not none -%}",
    "{%- set mode = thinking_mode -%}",
    "{%- elif (thinking is defined and thinking) or (enable_thinking is defined and enable_thinking) -%}",
    "{%- set mode = 'thinking' -%}",
    "{%- else -%}{%- set mode = 'chat' -%}{%- endif -%}",
    "{%- if mode not in ['chat', 'thinking'] -%}",
    "{{ raise_exception(\"thinking_mode must be 'chat' or 'thinking'\") }}",
    "{%- endif -%}",
    "{%- set thinking = mode == 'thinking' -%}",
    "{%- set has_tools = tools is defined and tools is not none and tools | length > 0 -%}",
    "{%- set drop = (drop_thinking if drop_thinking is defined else true) and not has_tools -%}",
    "{%- set ns = namespace(last_user=-1) -%}",
    "{%- for m in messages -%}",
    "{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
    "{%- endfor -%}",
    # Prefix: BOS, the max-effort instruction, tools without a system message.
    "{{ BOS }}",
    "{%- if thinking and reasoning_effort is defined and reasoning_effort == 'max' -%}",
    "{{ " + _lit(REASONING_EFFORT_MAX) + " }}",
    "{%- endif -%}",
    "{%- if has_tools and (messages | length == 0 or messages[0].role != 'system') -%}",
    "{{ tools_block() }}",
    "{%- endif -%}",
    # Messages.
    "{%- for m in messages -%}",
    "{%- set i = loop.index0 -%}",
    "{%- if m.task is defined and m.task is not none -%}",
    "{{ raise_exception('chat template: quick-instruction tasks need encode_messages') }}",
    "{%- endif -%}",
    "{%- if (m.tools is defined and m.tools) or (m.response_format is defined and m.response_format) -%}",
    "{{ raise_exception('chat template: pass tools as apply_chat_template(tools=...); "
    "per-message tools/response_format need encode_messages') }}",
    "{%- endif -%}",
    "{%- if m.content is defined and m.content is not none and m.content is not string -%}",
    "{{ raise_exception('chat template: message content must be a string') }}",
    "{%- endif -%}",
    "{%- if m.role == 'system' -%}",
    "{{ m.content or '' }}",
    "{%- if has_tools and i == 0 -%}{{ tools_block() }}{%- endif -%}",
    "{%- elif m.role == 'user' -%}",
    # Consecutive user messages form one turn, blocks joined by a blank line (released encoder).
    "{%- if i > 0 and messages[i - 1].role == 'user' -%}{{ " + _lit("\n\n") + " }}",
    "{%- else -%}{{ USER }}{%- endif -%}",
    "{{ m.content or '' }}",
    "{%- elif m.role == 'latest_reminder' -%}",
    "{{ REMINDER }}{{ m.content }}",
    "{%- elif m.role == 'assistant' -%}",
    "{%- set show = thinking and (not drop or i > ns.last_user) -%}",
    # Same turn policy as tokenize_conversation; `{% generation %}` feeds HF assistant masks.
    "{%- if m.mask is defined and m.mask is not none -%}{%- set trained = m.mask -%}",
    "{%- else -%}{%- set trained = not thinking or show -%}{%- endif -%}",
    "{%- if trained -%}",
    "{%- generation -%}{{ assistant_body(m, show) }}{%- endgeneration -%}",
    "{%- else -%}{{ assistant_body(m, show) }}{%- endif -%}",
    "{%- else -%}",
    "{{ raise_exception('chat template: role ' ~ m.role ~ ' needs encode_messages') }}",
    "{%- endif -%}",
    # Generation prompt after a user turn followed by an assistant/reminder turn or at the end.
    "{%- if m.role == 'user' and (loop.last or messages[i + 1].role in ['assistant', 'latest_reminder']) -%}",
    "{{ ASSISTANT }}",
    "{%- if thinking and (not drop or i >= ns.last_user) -%}{{ THINK_START }}",
    "{%- else -%}{{ THINK_END }}{%- endif -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
]

CHAT_TEMPLATE = "".join(_PIECES)
