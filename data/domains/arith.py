"""`arith`: integer addition (optionally subtraction, multiplication), answer digits reversed.

    user:      4 7 + 8 5 = ? (digits reversed)
    assistant: 2 3 1                          (47 + 85 = 132, written least-significant first)

Why reversed: a causal model writes the answer left to right, and the least-significant digit
is the only one it can compute without knowing the carries to its right; writing it first makes
every digit a function of the operands' digits at that position and the previous carry (Lee et
al., "Teaching Arithmetic to Small Transformers", ICLR 2024: reversed outputs cut the samples
needed sharply). Operands stay in normal order; digits are space-separated (one token each).

The verifier reads the digits with whitespace ignored, reverses them and compares the value, so
a trailing `0` (a leading zero of the normal number) is accepted. A non-digit makes the answer
unreadable. Subtraction draws a >= b so the result is never negative.

Difficulty = maximum number of digits per operand (1..6); operands are uniform in
[0, 10**difficulty). `ops` picks the operations (default addition only).
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from data.domains.base import AnswerDomain, Item, Score, spaced

OPS = ("+", "-", "*")
_DIGITS = "0123456789"


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithDomain(AnswerDomain):
    name = "arith"
    description = "a + b (and optionally a - b, a * b), answer digits reversed; difficulty = digits"
    levels = (1, 2, 3, 4, 5, 6)

    def __init__(self, difficulty: int | None = None, thinking_mode: str = "chat", *,
                 ops: Sequence[str] = ("+",)) -> None:
        super().__init__(difficulty, thinking_mode)
        ops = tuple(ops)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"arith: ops={ops!r}: choose a non-empty subset of {OPS}")
        self.ops = ops

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        top = 10 ** self.difficulty
        op = rng.choice(self.ops)
        a, b = rng.randrange(top), rng.randrange(top)
        if op == "-" and a < b:
            a, b = b, a
        return {"a": a, "op": op, "b": b, "result": solve(a, op, b)}, f"{a}{op}{b}"

    def user_text(self, problem: Mapping[str, Any]) -> str:
        return f"{spaced(problem['a'])} {problem['op']} {spaced(problem['b'])} = ? (digits reversed)"

    def answer_text(self, problem: Mapping[str, Any]) -> str:
        return spaced(str(problem["result"])[::-1])

    def grade(self, item: Item, content: str) -> Score:
        digits = "".join(content.split())
        if not digits:
            return Score.invalid("empty answer")
        if any(c not in _DIGITS for c in digits):
            return Score.invalid("answer is not a run of digits")
        # Compared as text, not int(): int() of a very long digit run raises (Python's
        # int-string conversion limit), and a verifier must not raise on any output.
        value = digits[::-1].lstrip("0") or "0"
        ok = value == str(item.problem["result"])
        return Score.graded(ok, "correct" if ok else f"wrong value {value[:40]}")
