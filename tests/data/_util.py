"""Corpus builders shared by the data tests: seeded, varied documents (ASCII, accents, CJK,
emoji, code) so byte-level round trips and packing are exercised on real-looking text."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from or at an data "
         "model token packing window résumé naïve café 数据 模型 🙂 def return class import "
         "x = y + 1 if else for while {} [] () : ; # 'quoted' \"dq\"").split()


def make_docs(n: int, seed: int, min_words: int = 1, max_words: int = 400,
              prefix: str = "") -> list[str]:
    """`n` distinct documents of very different lengths (some far longer than a window)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(min_words, max_words)
        body = " ".join(rng.choice(WORDS) for _ in range(k))
        docs.append(f"{prefix}doc {seed}-{i}:\n{body}\n")
    return docs


def write_jsonl(path: Path, docs: list[str], column: str = "text", **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({column: d, **extra}, ensure_ascii=False) + "\n")
    return path


def segments(row_ids, row_doc_ids) -> list[list[int]]:
    """Splits one batch row into its segments (by doc id)."""
    out, prev = [], None
    for t, d in zip(row_ids, row_doc_ids):
        if d != prev:
            out.append([])
            prev = d
        out[-1].append(int(t))
    return out
