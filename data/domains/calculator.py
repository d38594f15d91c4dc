"""`calculator`: a tool domain in the DeepSeek-V4 tool-call format (spec §9.4, encoding/tools.py).

The system message declares one tool, `calculator(expression: string)`; the reference
conversation is

    user:       What is 37 * 48 + 5?
    assistant:  (content "") + a DSML tool call: calculator(expression="37 * 48 + 5")
    tool:       1781                    <- `CalculatorDomain.execute`, rendered as <tool_result>
    assistant:  1781

Pieces for each stage:
- SFT: `item.conversation` (all turns; `tokenize_conversation` trains both assistant turns);
- RL / eval: `item.prompt_messages` (system with tools + user), then a multi-turn rollout that
  generates a turn, parses it (`parse_message_from_completion_text(..., strict=False)`), runs
  each call through `execute` (never raises; problems come back as `error: ...` text), appends
  the tool messages with `encode_messages(tool_msgs, mode, context=history)`, and generates
  again, up to `max_tool_turns` tool turns;
- `verify(item, transcript)`: the transcript is everything after the prompt. Every turn but the
  last must be a strictly parsed tool-call turn (the DSML block must parse with the strict parser)
  calling `calculator` with a string `expression`; the environment text after it must be exactly
  what `execute` and `encode_messages` produce for those calls (so a transcript cannot smuggle in
  a tool result the executor would not give); the last turn is the answer, read leniently as a
  number (integer, `p/q` or decimal) and compared exactly with the problem's value.
  Answering without any tool call is unreadable for this domain (`require_tool_call=True`).

The executor evaluates with `data.domains.expr` (no eval): `+ - * /`, parentheses, unary
minus, exact results (`7/2` for a fraction). Its error texts never echo model text.

Schema: `schema="full"` (default) declares the tool the V4 way, `tools` on the system message,
rendered as the byte-exact `## Tools` block (about 1,300 characters, several hundred tokens,
the same for every item). `schema="brief"` replaces it by a one-line system message and
declares no `tools`; the calls and results keep the exact DSML / `<tool_result>` format. Use it
for the tiny preset, whose whole conversation should fit in about 64-200 tokens. Brief is chat
mode only: without declared tools the encoder drops the reasoning of the tool-call turn in
thinking mode, so the reference would no longer be what the model generated.

Difficulty: 1: two operands of 1-2 digits, + -; 2: two of 2-3 digits, + - *;
3: three of 1-2 digits, + - *; 4: three of 2-3 digits, + - *, with parentheses.
"""

from __future__ import annotations

import json
import random
from typing import Any, Mapping

from data.domains.base import Domain, Item, Score, parse_answer_turn, parse_tool_turn
from data.domains.expr import ExprError, evaluate, format_value, parse_number
from encoding import encode_messages
from encoding.special_tokens import EOS, USER

TOOL_NAME = "calculator"
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Evaluate an arithmetic expression exactly (+ - * / and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}
SYSTEM = "Use the calculator tool for arithmetic, then give the result."
# `schema="brief"`: the tool described in one sentence instead of the V4 tools block.
BRIEF_SYSTEM = "Tool: calculator(expression) evaluates + - * / exactly. Call it, then answer."
SCHEMAS = ("full", "brief")
# (operands, min digits, max digits, operators, parenthesise the first pair)
LEVELS = {1: (2, 1, 2, "+-", False), 2: (2, 2, 3, "+-*", False), 3: (3, 1, 2, "+-*", False),
          4: (3, 2, 3, "+-*", True)}


def _run(call: Any) -> str:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or function.get("name") != TOOL_NAME:
        return f"error: unknown tool (available: {TOOL_NAME})"
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return "error: arguments are not JSON"
    if not isinstance(arguments, Mapping) or not isinstance(arguments.get("expression"), str):
        return "error: expected a string parameter 'expression'"
    try:
        return format_value(evaluate(arguments["expression"]).value)
    except ExprError as error:
        return f"error: {error}"


class CalculatorDomain(Domain):
    name = "calculator"
    description = "call a calculator tool (V4 DSML tool call), then answer; difficulty = operands"
    levels = tuple(LEVELS)
    tools = [CALCULATOR_TOOL]

    def __init__(self, difficulty: int | None = None, thinking_mode: str = "chat", *,
                 max_tool_turns: int = 2, require_tool_call: bool = True,
                 schema: str = "full") -> None:
        super().__init__(difficulty, thinking_mode)
        if schema not in SCHEMAS:
            raise ValueError(f"calculator: schema={schema!r}: choose one of {SCHEMAS}")
        if schema == "brief" and thinking_mode != "chat":
            raise ValueError("calculator: schema='brief' needs thinking_mode='chat' (without "
                             "declared tools, thinking mode drops the tool-call turn's reasoning)")
        self.schema = schema
        if isinstance(max_tool_turns, bool) or not isinstance(max_tool_turns, int) \
                or max_tool_turns < 1:
            raise ValueError(f"calculator: max_tool_turns={max_tool_turns!r}: expected an int >= 1")
        self.max_tool_turns, self.require_tool_call = max_tool_turns, bool(require_tool_call)

    # ---- the tool --------------------------------------------------------------------------
    @staticmethod
    def execute(call: Any) -> dict[str, Any]:
        """Run one OpenAI-style tool call; returns the `tool` message. Never raises."""
        try:
            content = _run(call)
        except Exception as error:  # noqa: BLE001 - an executor bug must not end a rollout
            content = f"error: {type(error).__name__}"
        message: dict[str, Any] = {"role": "tool", "content": content}
        call_id = call.get("id") if isinstance(call, Mapping) else None
        if isinstance(call_id, str):
            message["tool_call_id"] = call_id
        return message

    def run_tool_calls(self, assistant_message: Mapping[str, Any],
                       item: Item | None = None) -> list[dict[str, Any]]:
        """The tool messages answering every call of a (parsed) assistant message, in order
        (`item`, the problem being solved, is not needed: the calculator is stateless)."""
        return [self.execute(call) for call in assistant_message.get("tool_calls") or ()]

    # ---- problems --------------------------------------------------------------------------
    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        n, lo, hi, ops, parens = LEVELS[self.difficulty]
        numbers = [rng.randint(10 ** (lo - 1) if lo > 1 else 0, 10**hi - 1) for _ in range(n)]
        chosen = [rng.choice(ops) for _ in range(n - 1)]
        expression = str(numbers[0])
        for op, x in zip(chosen, numbers[1:]):
            expression += f" {op} {x}"
        if parens:
            first = f"{numbers[0]} {chosen[0]} {numbers[1]}"
            expression = f"({first})" + expression[len(first):]
        value = format_value(evaluate(expression).value)
        return {"expression": expression, "value": value}, expression

    def render(self, problem: Mapping[str, Any]) -> tuple[list[dict], list[dict], str]:
        call = {"id": "call_0", "type": "function",
                "function": {"name": TOOL_NAME,
                             "arguments": json.dumps({"expression": problem["expression"]})}}
        result = self.execute(call)
        continuation = [self.assistant("", tool_calls=[call]), result,
                        self.assistant(result["content"])]
        question = f"What is {problem['expression']}?"
        if self.schema == "brief":
            prompt = [{"role": "system", "content": BRIEF_SYSTEM},
                      {"role": "user", "content": question}]
        else:
            prompt = self.user_messages(question, SYSTEM)
        return prompt, continuation, result["content"]

    # ---- verification ----------------------------------------------------------------------
    def _check_calls(self, message: Mapping[str, Any]) -> str:
        for call in message["tool_calls"]:
            if call["function"]["name"] != TOOL_NAME:
                return "call to an unknown tool"
            try:
                arguments = json.loads(call["function"]["arguments"])
            except ValueError:
                return "tool arguments are not JSON"
            if not isinstance(arguments, dict) or set(arguments) != {"expression"} or not isinstance(arguments["expression"], str):
                return "calculator takes exactly one string parameter 'expression'"
        return ""

    def verify(self, item: Item, completion_text: str) -> Score:
        if not isinstance(completion_text, str):
            return Score.invalid(f"completion is a {type(completion_text).__name__}, not text")
        text, mode = completion_text, item.thinking_mode
        history = list(item.prompt_messages)
        pos, tool_turns = 0, 0
        while True:
            end = text.find(EOS, pos)
            if end == -1:
                return Score.invalid(f"missing_eos: turn {tool_turns + 1} did not finish")
            turn = text[pos : end + len(EOS)]
            pos = end + len(EOS)
            if not text.startswith(USER, pos):  # the last turn: the answer
                message, why = parse_answer_turn(turn, mode)
                if message is None:
                    return Score.invalid(why)
                if message["tool_calls"]:
                    return Score.invalid("ended on a tool call (no answer)")
                if tool_turns == 0 and self.require_tool_call:
                    return Score.invalid("answered without calling the calculator")
                value = parse_number(message["content"])
                if value is None:
                    return Score.invalid("answer is not a number")
                expected = evaluate(item.problem["expression"]).value
                ok = value == expected
                return Score.graded(ok, "correct" if ok else f"wrong value {format_value(value)}")
            message, why = parse_tool_turn(turn, mode)
            if message is None:
                return Score.invalid(why)
            tool_turns += 1
            if tool_turns > self.max_tool_turns:
                return Score.invalid(f"more than {self.max_tool_turns} tool-call turns")
            why = self._check_calls(message)
            if why:
                return Score.invalid(why)
            history.append(message)
            results = self.run_tool_calls(message)
            environment = encode_messages(results, mode, context=history)
            if not text.startswith(environment, pos):
                return Score.invalid("tool results differ from what the executor returns")
            pos += len(environment)
            history.extend(results)
