"""`countdown` (lite): reach a target from three numbers with + - * and exact /.

    user:      Reach 20 using 7 3 5 (each at most once; + - *)
    assistant: (7 - 3) * 5              (the reference always uses all three numbers)

The answer is an arithmetic expression, read by `data.domains.expr` (its own parser, never
`eval`): not an expression -> format_valid False. A readable expression is correct when it uses
each given number at most once (as a multiset; unused numbers are fine), only the operators of
the difficulty, divides exactly (every `/` leaves no remainder), and equals the target.

Difficulty = number range (and operators):
    1: numbers 1-9,  + -        target <= 30
    2: numbers 1-9,  + - *      target <= 50
    3: numbers 1-20, + - *      target <= 50
    4: numbers 1-30, + - * /    target <= 100
In thinking mode the reference reasoning is the two steps, e.g. `7 - 3 = 4` / `4 * 5 = 20`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Mapping

from data.domains.base import AnswerDomain, Item, Score
from data.domains.expr import ExprError, ExprMathError, evaluate

LEVELS = {1: (9, "+-", 30), 2: (9, "+-*", 50), 3: (20, "+-*", 50), 4: (30, "+-*/", 100)}
N_NUMBERS = 3


def _apply(a: int, op: str, b: int) -> int | None:
    """Integer result, or None when `/` is not exact."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


class CountdownDomain(AnswerDomain):
    name = "countdown"
    description = "reach a target with 3 numbers and + - * /; difficulty = number range"
    levels = tuple(LEVELS)

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        top, ops, target_max = LEVELS[self.difficulty]
        for _ in range(1000):
            nums = [rng.randint(1, top) for _ in range(N_NUMBERS)]
            a, b, c = nums
            op1, op2 = rng.choice(ops), rng.choice(ops)
            inner = _apply(a, op1, b)
            if inner is None:
                continue
            if rng.random() < 0.5:  # (a op1 b) op2 c
                target, expr = _apply(inner, op2, c), f"({a} {op1} {b}) {op2} {c}"
                steps = [f"{a} {op1} {b} = {inner}", f"{inner} {op2} {c} = {{t}}"]
            else:  # c op2 (a op1 b)
                target, expr = _apply(c, op2, inner), f"{c} {op2} ({a} {op1} {b})"
                steps = [f"{a} {op1} {b} = {inner}", f"{c} {op2} {inner} = {{t}}"]
            # A target equal to a given number would be solved by writing that number.
            if target is None or not 1 <= target <= target_max or target in nums:
                continue
            shown = nums[:]
            rng.shuffle(shown)
            problem = {"numbers": shown, "target": target, "solution": expr,
                       "steps": [s.replace("{t}", str(target)) for s in steps]}
            return problem, f"{sorted(nums)}->{target}"
        raise RuntimeError("countdown: no solvable problem in 1000 draws")  # unreachable

    def user_text(self, problem: Mapping[str, Any]) -> str:
        ops = " ".join(LEVELS[self.difficulty][1])
        numbers = " ".join(map(str, problem["numbers"]))
        return f"Reach {problem['target']} using {numbers} (each at most once; {ops})"

    def answer_text(self, problem: Mapping[str, Any]) -> str:
        return problem["solution"]

    def reasoning(self, problem: Mapping[str, Any]) -> str:
        return "\n".join(problem["steps"])

    def grade(self, item: Item, content: str) -> Score:
        if not content:
            return Score.invalid("empty answer")
        try:
            ev = evaluate(content, allow_unary_minus=False)
        except ExprMathError as error:
            return Score.graded(False, f"no value: {error}")
        except ExprError as error:
            return Score.invalid(f"not an expression: {error}")
        extra = Counter(ev.numbers) - Counter(item.problem["numbers"])
        if extra:
            return Score.graded(False, f"uses numbers not available: {sorted(extra.elements())}")
        allowed = LEVELS[item.difficulty][1] if item.difficulty in LEVELS else "+-*/"
        banned = sorted(set(ev.operators) - set(allowed))
        if banned:
            return Score.graded(False, f"operator not allowed: {banned}")
        if ev.inexact_division:
            return Score.graded(False, "inexact division")
        ok = ev.value == item.problem["target"]
        return Score.graded(ok, "correct" if ok else f"value {ev.value} != {item.problem['target']}")
