"""A test-only domain with reward variance from a random model, for GRPO's learning test.

`first_char`: the reward is 1 when the response's first character (BOS/EOS removed) has an even
code point. A random micro model's first generated token starts with an even character about
half of the time, so every group has reward variance from the first step, and raising the
reward only needs the first-token distribution to move: a few GRPO steps do it, and with the
advantage sign flipped the reward falls instead. Register it in a subprocess with `register()`.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from data.domains.base import Domain, Item, Score
from encoding.special_tokens import BOS, EOS


class FirstCharDomain(Domain):
    name = "first_char"
    description = "test only: reward 1 when the reply's first character has an even code point"
    levels = (1,)

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        n = rng.randrange(10**6)
        return {"n": n}, str(n)

    def render(self, problem: Mapping[str, Any]):
        prompt = self.user_messages(f"say anything {problem['n']}")
        return prompt, [self.assistant("b")], "b"

    def verify(self, item: Item, completion_text: str) -> Score:
        text = completion_text.replace(EOS, "").replace(BOS, "")
        if not text:
            return Score.invalid("empty")
        return Score.graded(ord(text[0]) % 2 == 0, "first character")


def register() -> None:
    from data.domains import registry

    registry.REGISTRY[FirstCharDomain.name] = FirstCharDomain
