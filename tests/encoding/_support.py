"""Helpers shared by the encoding tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from encoding.special_tokens import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[2]

# How the conformance README says each official case is called.
CONFORMANCE_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


def conformance_root() -> Path:
    """`$V4_CONFORMANCE_DIR`, defaulting to `<repo>/../shared/conformance`."""
    return Path(os.environ.get("V4_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))


def load_case(folder: Path, n: int) -> tuple[list[dict], str]:
    """(messages, expected prompt) of official case n; `tools` attached to the first message."""
    data = json.loads((folder / f"input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    with open(folder / f"expected_{n}.txt", encoding="utf-8", newline="") as f:
        expected = f.read()
    return messages, expected


_WORDS = (
    "the weather in Beijing is sunny today and the user asks about Paris capital France "
    "tool call search query result answer think reason step first then because so value "
    "温泉 你好 世界 天气 北京 22°C 45% {\"location\": \"Beijing\"} [1, 2, 3] true false null"
).split()


def training_text(n_lines: int = 300, seed: int = 0) -> list[str]:
    """A few KB of varied text (ASCII, CJK, JSON-ish), deterministic."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)]


def train_tokenizer_json(path: Path, *, reserve_special: bool = True, vocab_size: int = 600) -> Path:
    """Train a byte-level BPE on generated text and save it to `path` (a tokenizer.json).

    With `reserve_special`, SPECIAL_TOKENS come first, so BOS gets id 0 and EOS id 1, as in the
    tokenizers the data pipeline trains.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) if reserve_special else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    tok.save(str(path))
    return path


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of mask-1 tokens, in order."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
