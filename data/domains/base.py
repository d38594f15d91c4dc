"""The domain contract: seeded problems with exact verifiers, rendered as DeepSeek-V4 chats.

SFT, GRPO, on-policy distillation and evaluation all consume a `Domain` the same way:

    domain = get_domain("arith", difficulty=3)
    item = domain.sample("train", index=17, seed=0)      # or domain.generate("test", n, seed)
    prompt = encode_messages(item.prompt_messages, item.thinking_mode)   # RL / eval prompt
    record = item.to_sft_record()                        # {"messages", "thinking_mode", "domain"}
    score = safe_verify(domain, item, completion_text)   # Score(reward, correct, format_valid, ...)

What a completion is: the text generated after the prompt, as `encode_messages` renders it,
ending with EOS (`<｜end▁of▁sentence｜>`), i.e. `encode(conversation)[len(encode(prompt)):]` for
the reference. For a tool domain it is the whole transcript after the prompt: each assistant
turn, and between them the tool-result turns the environment inserted (see `ToolDomain`).

Splits: a problem's split is a function of the problem itself (a hash of its canonical `key`
and the domain name), so train and test are disjoint by construction at every difficulty and
seed; `sample` redraws until the problem falls in the requested split. Items within a split are
drawn with replacement (a small problem space repeats); `distinct` gives each problem once, for
evaluation.

Scores are format-gated: `reward` is 1.0 when the answer is well formed AND correct, 0 for an
unreadable answer, never a format bonus (an additive format reward favours long wrong answers;
open-instruct #659). Between 0 and 1 is partial credit (`Score.partial`, e.g. reasoning-gym's
graded scores): GRPO trains on `reward`, pass@1 counts `correct`.
`verify` must not raise on any string; `safe_verify` is the caller-side guard that turns a bug
into a scored 0 with the error recorded, and `summarize` counts what happened.

Thinking mode: with `thinking_mode="thinking"` the prompt ends `<｜Assistant｜><think>`, the
reference assistant turn carries the domain's `reasoning` (a short worked trace where the
domain has one, otherwise empty) as `reasoning_content`, and the verifier requires `</think>`
and reads the answer after it. Chat mode (the default) answers right after `</think>`.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from encoding import ParseError, encode_messages, parse_message_from_completion_text
from encoding.special_tokens import EOS
from encoding.validate import THINKING_MODES

SPLITS = ("train", "test")
MAX_DRAWS = 10_000  # redraws before concluding a split is (nearly) empty at this difficulty


@dataclass(frozen=True)
class Score:
    reward: float  # in [0, 1]: 1.0 when format_valid and correct, 0 when not format_valid
    correct: bool
    format_valid: bool
    reason: str  # short, human-readable: why it scored as it did
    error: str | None = None  # set by safe_verify when the verifier itself failed

    @classmethod
    def graded(cls, correct: bool, reason: str) -> "Score":
        """A readable answer, right or wrong."""
        return cls(1.0 if correct else 0.0, bool(correct), True, reason)

    @classmethod
    def partial(cls, credit: float, reason: str) -> "Score":
        """A readable answer worth `credit` in [0, 1] (clamped); correct only at 1."""
        credit = min(max(float(credit), 0.0), 1.0)
        return cls(credit, credit >= 1.0, True, reason)

    @classmethod
    def invalid(cls, reason: str) -> "Score":
        """An answer that could not be read in the domain's format."""
        return cls(0.0, False, False, reason)


@dataclass(frozen=True)
class Item:
    """One problem, ready for SFT (`conversation`) and RL/eval (`prompt_messages`)."""

    domain: str
    difficulty: int | None
    split: str
    index: int
    seed: int
    key: str  # canonical problem text; its hash decides the split
    problem: dict[str, Any]  # JSON-able description, domain-specific
    answer: str  # the reference final answer (assistant content of the last turn)
    prompt_messages: list[dict[str, Any]]  # ends where the assistant answers
    conversation: list[dict[str, Any]]  # prompt + reference assistant turns (+ tool turns)
    thinking_mode: str = "chat"

    @property
    def id(self) -> str:
        level = "default" if self.difficulty is None else f"d{self.difficulty}"
        return f"{self.domain}/{level}/{self.split}/s{self.seed}/{self.index}"

    def prompt_text(self) -> str:
        """The generation prompt (BOS ... `<｜Assistant｜>` + `</think>` or `<think>`)."""
        return encode_messages(self.prompt_messages, self.thinking_mode)

    def reference_completion(self) -> str:
        """What a perfect model generates after `prompt_text()` (tool turns included)."""
        full = encode_messages(self.conversation, self.thinking_mode)
        prompt = self.prompt_text()
        if not full.startswith(prompt):  # a broken domain, not bad user input
            raise RuntimeError(f"{self.id}: the conversation does not extend the prompt")
        return full[len(prompt):]

    def to_sft_record(self) -> dict[str, Any]:
        """One line of the JSONL `data.sft` reads (tools ride on the system message)."""
        return {"messages": self.conversation, "thinking_mode": self.thinking_mode,
                "domain": self.domain}


def split_of(domain_name: str, key: str, test_fraction: float) -> str:
    """The split a problem belongs to: a stable hash of (domain, key), independent of seeds."""
    digest = hashlib.sha256(f"{domain_name}\x00{key}".encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def draw_rng(*parts: Any) -> random.Random:
    """A generator seeded from a stable hash of `parts` (no dependence on PYTHONHASHSEED)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def spaced(text: Any) -> str:
    """`"123"` -> `"1 2 3"`: one character per token for a code-trained BPE that merges runs."""
    return " ".join(str(text))


class Domain(ABC):
    """A verifiable task family. Subclasses set `name`, `levels` and implement the hooks.

    Constructor options: `difficulty` (an int in `levels`; what it means is in each domain's
    docstring), `thinking_mode` ("chat" or "thinking"), then domain-specific keywords.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    levels: ClassVar[Sequence[int]] = (1,)  # valid difficulties
    test_fraction: ClassVar[float] = 0.2
    tools: ClassVar[list[dict[str, Any]] | None] = None  # OpenAI-style schemas, tool domains

    def __init__(self, difficulty: int | None = None, thinking_mode: str = "chat") -> None:
        difficulty = self.levels[0] if difficulty is None else difficulty
        if isinstance(difficulty, bool) or difficulty not in self.levels:
            raise ValueError(f"{self.name}: difficulty={difficulty!r}: choose one of "
                             f"{list(self.levels)}")
        if thinking_mode not in THINKING_MODES:
            raise ValueError(f"{self.name}: thinking_mode={thinking_mode!r}: choose one of "
                             f"{THINKING_MODES}")
        self.difficulty = difficulty
        self.thinking_mode = thinking_mode

    # ---- hooks ---------------------------------------------------------------------------
    @abstractmethod
    def draw(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        """A random problem at this difficulty: (JSON-able problem, canonical key)."""

    @abstractmethod
    def render(self, problem: Mapping[str, Any]) -> tuple[list[dict], list[dict], str]:
        """(prompt messages, reference continuation messages, reference final answer)."""

    @abstractmethod
    def verify(self, item: Item, completion_text: str) -> Score:
        """Score a completion (see the module docstring). Must not raise on any string."""

    # ---- shared --------------------------------------------------------------------------
    def sample(self, split: str, index: int, seed: int = 0) -> Item:
        """The `index`-th item of `split` for `seed`: the same arguments give the same item."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split={split!r}: choose one of {SPLITS}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{self.name}: index={index!r}: expected an int >= 0")
        for attempt in range(MAX_DRAWS):
            rng = draw_rng(self.name, self.difficulty, seed, split, index, attempt)
            problem, key = self.draw(rng)
            if split_of(self.name, key, self.test_fraction) == split:
                return self.make_item(problem, key, split, index, seed)
        raise ValueError(f"{self.name}: no {split!r} problem in {MAX_DRAWS} draws at "
                         f"difficulty={self.difficulty}: the problem space is too small")

    def generate(self, split: str, n: int, seed: int = 0) -> list[Item]:
        """Items 0..n-1 of `split` for `seed`."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}: n={n!r}: expected an int >= 0")
        return [self.sample(split, i, seed) for i in range(n)]

    def distinct(self, split: str, n: int, seed: int = 0) -> list[Item]:
        """Up to `n` items of `split` with distinct problems (keys), in index order: what an
        evaluation should score, since `generate` repeats problems when the space is small
        (arith level 1 has 23 test problems; n=500 would count each ~22 times). Stops early
        when `patience` draws in a row bring nothing new (the space is exhausted, up to the
        chance of a problem rarer than 1/patience): fewer than `n` items then means that is
        all this split has."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}: n={n!r}: expected an int >= 0")
        patience = max(1000, 4 * n)
        found: dict[str, Item] = {}
        index = last_new = 0
        while len(found) < n and index - last_new < patience:
            item = self.sample(split, index, seed)
            if item.key not in found:
                found[item.key] = item
                last_new = index
            index += 1
        return list(found.values())

    def make_item(self, problem: dict[str, Any], key: str, split: str, index: int,
                  seed: int) -> Item:
        prompt, continuation, answer = self.render(problem)
        return Item(self.name, self.difficulty, split, index, seed, key, problem, answer,
                    prompt, prompt + continuation, self.thinking_mode)

    def user_messages(self, text: str, system: str | None = None) -> list[dict[str, Any]]:
        """The prompt: an optional system message (with this domain's tools) and the user."""
        messages: list[dict[str, Any]] = []
        if system is not None or self.tools:
            messages.append({"role": "system", "content": system or ""})
            if self.tools:
                messages[0]["tools"] = list(self.tools)
        messages.append({"role": "user", "content": text})
        return messages

    def assistant(self, content: str, reasoning: str = "", **extra: Any) -> dict[str, Any]:
        """A reference assistant message (reasoning only rendered in thinking mode)."""
        message: dict[str, Any] = {"role": "assistant", "content": content, **extra}
        if self.thinking_mode == "thinking":
            message["reasoning_content"] = reasoning
        return message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(difficulty={self.difficulty!r}, " \
               f"thinking_mode={self.thinking_mode!r})"


class IndexedRows:
    """For a domain whose problems are held rows, `self.rows[split]` (a table, a taskset)
    rather than drawn: `sample` indexes a seeded permutation of the split, `distinct` gives
    each row once. Mixed in before `Domain`; `item_key` is a row's canonical key."""

    rows: dict[str, list[dict[str, Any]]]

    def item_key(self, problem: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def sample(self, split: str, index: int, seed: int = 0) -> Item:
        """Row `order[index mod n]` of `split`, `order` a permutation fixed by the seed."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split={split!r}: choose one of {SPLITS}")
        rows = self.rows[split]
        order = list(range(len(rows)))
        draw_rng(self.name, seed, split).shuffle(order)
        problem = rows[order[index % len(rows)]]
        return self.make_item(problem, self.item_key(problem), split, index, seed)

    def distinct(self, split: str, n: int, seed: int = 0) -> list[Item]:
        return [self.sample(split, i, seed) for i in range(min(n, len(self.rows[split])))]

    def draw(self, rng):  # rows are indexed, not drawn (`sample` is overridden)
        raise NotImplementedError


def parse_answer_turn(text: str, thinking_mode: str) -> tuple[dict[str, Any] | None, str]:
    """Read one assistant turn with encoding's lenient parser and apply the format gate.

    Returns (message, "") or (None, reason). Fails the gate: no EOS (cut-off generation), a
    missing `</think>` in thinking mode, special strings inside the text, a malformed tool block.
    Text after EOS is ignored (a sampler may pad with EOS).
    """
    end = text.find(EOS)
    if end != -1:  # the turn ends at its first EOS; what follows was never part of it
        text = text[: end + len(EOS)]
    message = parse_message_from_completion_text(text, thinking_mode, strict=False)
    if message["parse_issues"]:
        first = message["parse_issues"][0]
        return None, f"{first['kind']}: {first['message']}"[:200]
    return message, ""


def parse_tool_turn(turn: str, thinking_mode: str) -> tuple[dict[str, Any] | None, str]:
    """A turn that tool results follow: (message, "") when it parses strictly and calls at
    least one tool, else (None, reason)."""
    try:
        message = parse_message_from_completion_text(turn, thinking_mode, strict=True)
    except ParseError as error:
        return None, f"malformed tool-call turn: {error}"[:200]
    if not message["tool_calls"]:
        return None, "a turn without a tool call is followed by a tool result"
    return message, ""


class AnswerDomain(Domain):
    """A single-turn domain: the assistant's content is the answer, read by `grade`."""

    def render(self, problem: Mapping[str, Any]) -> tuple[list[dict], list[dict], str]:
        answer = self.answer_text(problem)
        continuation = [self.assistant(answer, self.reasoning(problem))]
        return self.user_messages(self.user_text(problem)), continuation, answer

    @abstractmethod
    def user_text(self, problem: Mapping[str, Any]) -> str:
        """The user turn."""

    @abstractmethod
    def answer_text(self, problem: Mapping[str, Any]) -> str:
        """The reference answer, exactly as the assistant should write it."""

    def reasoning(self, problem: Mapping[str, Any]) -> str:
        """Worked trace for thinking mode (empty by default)."""
        return ""

    @abstractmethod
    def grade(self, item: Item, content: str) -> Score:
        """Score the parsed answer text (stripped); Score.invalid when it is unreadable."""

    def verify(self, item: Item, completion_text: str) -> Score:
        if not isinstance(completion_text, str):
            return Score.invalid(f"completion is a {type(completion_text).__name__}, not text")
        message, why = parse_answer_turn(completion_text, item.thinking_mode)
        if message is None:
            return Score.invalid(why)
        if message["tool_calls"]:
            return Score.invalid(f"tool call in {self.name!r}, a domain without tools")
        return self.grade(item, message["content"].strip())


def safe_verify(domain: Domain, item: Item, completion_text: Any) -> Score:
    """`domain.verify`, except that a verifier bug scores 0 with the error recorded: an
    exception, a `sys.exit` inside the verifier (which would otherwise end a training run
    without a checkpoint), a result that is not a `Score`, or a `Score.reward` that is not a
    finite number in [0, 1]. `reward` is the sample's reward (partial credit allowed, e.g. 0.5
    for half the test cases); `correct` is what pass@1 counts."""
    try:
        score = domain.verify(item, completion_text)
        if not isinstance(score, Score):
            raise TypeError(f"verify returned {type(score).__name__}, not Score")
        reward = score.reward
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or \
                not (math.isfinite(reward) and 0.0 <= reward <= 1.0):
            raise ValueError(f"Score.reward={reward!r} is not a finite number in [0, 1]")
        if reward and not score.format_valid:
            raise ValueError(f"Score.reward={reward!r} for an unreadable answer "
                             f"(format_valid=False): rewards are format-gated, use 0")
        return score
    except Exception as error:  # noqa: BLE001 - the point is to never crash a rollout
        return Score(0.0, False, False, "verifier error", error=f"{type(error).__name__}: {error}")
    except SystemExit as exit_:
        return Score(0.0, False, False, "verifier error",
                     error=f"SystemExit: the verifier called sys.exit({exit_.code!r})")


@dataclass
class ScoreSummary:
    n: int = 0
    mean_reward: float = 0.0
    correct: int = 0
    format_invalid: int = 0  # unreadable answers (counted, scored 0)
    errors: int = 0  # verifier failures caught by safe_verify
    reasons: dict[str, int] = field(default_factory=dict)  # invalid/error reasons by kind


def summarize(scores: Sequence[Score]) -> ScoreSummary:
    """Counts for logging: accuracy, unreadable answers, verifier errors, why answers failed."""
    reasons: Counter = Counter()
    for s in scores:
        if not s.format_valid or s.error:
            reasons[s.reason.split(":")[0]] += 1
    n = len(scores)
    return ScoreSummary(n, sum(s.reward for s in scores) / n if n else 0.0,
                        sum(s.correct for s in scores), sum(not s.format_valid for s in scores),
                        sum(s.error is not None for s in scores), dict(reasons))
