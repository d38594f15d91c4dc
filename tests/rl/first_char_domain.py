"""A test-only domain with reward variance from a random model, for GRPO's learning test.

`first_char`: the reward is 1 when the response's first character (BOS/EOS removed) has an even
code point. A random micro model's first generated token starts with an even character about
half of the time, so every group has reward variance from the first step, and raising the
reward only needs the first-token distribution to move: a few GRPO steps do it, and with the
advantage sign flipped the reward falls instead. Register it in a subprocess with `register()`,
or name this module in `V4LAB_DOMAINS` (importing it registers the domain).
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
    parity, word = 0, "even"

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        n = rng.randrange(10**6)
        return {"n": n}, str(n)

    def render(self, problem: Mapping[str, Any]):
        # a letter drawn with the item: right about half the time, so an SFT expert leaves
        # GRPO reward variance to work on
        letter = chr(ord("a") + problem["n"] % 26)
        # the word that tells the domains apart comes last, next to where the reply starts
        prompt = self.user_messages(f"say anything {problem['n']} {self.word}")
        return prompt, [self.assistant(letter)], letter

    def verify(self, item: Item, completion_text: str) -> Score:
        text = completion_text.replace(EOS, "").replace(BOS, "")
        if not text:
            return Score.invalid("empty")
        return Score.graded(ord(text[0]) % 2 == self.parity, "first character")


class FirstCharOddDomain(FirstCharDomain):
    """The mirror image, with its own prompt: a second learnable domain (the pipeline's test
    distils two experts, and each prompt must say which one it belongs to)."""
    name = "first_char_odd"
    description = "test only: reward 1 when the reply's first character has an odd code point"
    parity, word = 1, "odd"


def register() -> None:
    from data.domains.registry import register_domain

    register_domain(FirstCharDomain)
    register_domain(FirstCharOddDomain)


register()
