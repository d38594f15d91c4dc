"""`strings`: reverse or sort a short string of letters (the fastest-learning plumbing domain).

    user:      reverse: q w e r t          (or  sort: q w e r t)
    assistant: t r e w q                   (     e q r t w)

Letters are separated by spaces so each is one token under a code-trained BPE. The verifier
reads the answer's letters with whitespace ignored (`trewq` and `t r e w q` are both read);
anything that is not a letter of the alphabet makes the answer unreadable (format_valid False).

Difficulty = string length range: 1: 2-4, 2: 4-6, 3: 6-9, 4: 9-12.
"""

from __future__ import annotations

import random
import string
from typing import Any, Mapping, Sequence

from data.domains.base import AnswerDomain, Item, Score, spaced

LENGTHS = {1: (2, 4), 2: (4, 6), 3: (6, 9), 4: (9, 12)}
OPS = ("reverse", "sort")


def solve(op: str, letters: str) -> str:
    return letters[::-1] if op == "reverse" else "".join(sorted(letters))


class StringsDomain(AnswerDomain):
    name = "strings"
    description = "reverse or sort a string of letters; difficulty = length range"
    levels = tuple(LENGTHS)

    def __init__(self, difficulty: int | None = None, thinking_mode: str = "chat", *,
                 ops: Sequence[str] = OPS, alphabet: str = string.ascii_lowercase) -> None:
        super().__init__(difficulty, thinking_mode)
        ops = tuple(ops)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"strings: ops={ops!r}: choose a non-empty subset of {OPS}")
        if not alphabet or any(c.isspace() or not c.isprintable() for c in alphabet) \
                or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"strings: alphabet={alphabet!r}: expected distinct printable, "
                             "non-space characters")
        self.ops, self.alphabet = ops, alphabet

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        lo, hi = LENGTHS[self.difficulty]
        op = rng.choice(self.ops)
        letters = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(lo, hi)))
        return {"op": op, "letters": letters}, f"{op}:{letters}"

    def user_text(self, problem: Mapping[str, Any]) -> str:
        return f"{problem['op']}: {spaced(problem['letters'])}"

    def answer_text(self, problem: Mapping[str, Any]) -> str:
        return spaced(solve(problem["op"], problem["letters"]))

    def grade(self, item: Item, content: str) -> Score:
        got = "".join(content.split())
        if not got:
            return Score.invalid("empty answer")
        bad = [c for c in got if c not in self.alphabet]
        if bad:
            return Score.invalid(f"not a letter of the alphabet: {bad[0]!r}")
        expected = solve(item.problem["op"], item.problem["letters"])
        return Score.graded(got == expected, "correct" if got == expected else "wrong letters")
