"""The default corpus and tokenizer, built offline from what every Python installation carries.

`python -m data.prepare` (the pretraining launcher calls `ensure_default_assets` when inputs are
missing) writes, under the cache dir:

    corpus/stdlib-<key>/{train,val}.jsonl   one document per standard-library .py file (code plus
                                            its docstrings and comments), {"text", "path"}
    tokenizers/stdlib-bpe<vocab>-<key>/     tokenizer.json (+ tokenizer_config.json)

The split is by a stable hash of the file's path relative to the stdlib root, so the same file is
always on the same side, on every machine and whatever else changed (a small `max_files` subset
that no path hash puts in validation holds out its lowest-hash file instead). Each artefact is
written atomically and reused when present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.cache import atomic_directory, resolve_cache_dir, stable_hash

CORPUS_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class DefaultAssets:
    train: Path  # train.jsonl
    val: Path  # val.jsonl
    tokenizer: Path  # tokenizer.json


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def path_hash(relpath: str) -> int:
    return int.from_bytes(hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).digest(),
                          "little")


def is_val_path(relpath: str, val_fraction: float) -> bool:
    return path_hash(relpath) < val_fraction * 2.0**64


def iter_python_files(root: Path, max_files: int | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every UTF-8 .py file under `root`, skipping test suites and
    installed packages, in sorted order."""
    n = 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            yield path.relative_to(root).as_posix(), text
            n += 1
            if max_files is not None and n >= max_files:
                return


def build_stdlib_corpus(cache_dir: str | os.PathLike | None = None, *, root: Path | None = None,
                        val_fraction: float = 0.02, max_files: int | None = None) -> Path:
    """Writes (or reuses) the corpus directory holding train.jsonl and val.jsonl."""
    root = Path(root) if root is not None else stdlib_root()
    key = stable_hash({"v": CORPUS_VERSION, "root": str(root.resolve()), "val": val_fraction,
                       "python": sys.version, "max_files": max_files})
    final = resolve_cache_dir(cache_dir) / "corpus" / f"stdlib-{key}"
    if (final / "meta.json").is_file():
        return final
    files = list(iter_python_files(root, max_files))
    if len(files) < 2:
        raise ValueError(f"stdlib corpus from {root}: found {len(files)} .py files; need at "
                         f"least 2 (one for training, one for validation)")
    val = {rel for rel, _ in files if is_val_path(rel, val_fraction)}
    if not val:  # a small subset (max_files) may miss the threshold: hold out the lowest hash
        val = {min((rel for rel, _ in files), key=path_hash)}
    if len(val) == len(files):
        raise ValueError(f"stdlib corpus from {root}: val_fraction={val_fraction} holds out all "
                         f"{len(files)} files")
    counts = {"train": [0, 0], "val": [0, 0]}  # documents, characters
    with atomic_directory(final) as tmp:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as ftrain, \
                open(tmp / "val.jsonl", "w", encoding="utf-8") as fval:
            for rel, text in files:
                split = "val" if rel in val else "train"
                (fval if split == "val" else ftrain).write(
                    json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
                counts[split][0] += 1
                counts[split][1] += len(text)
        meta = {"root": str(root), "python": sys.version, "val_fraction": val_fraction,
                **{f"{k}_docs": v[0] for k, v in counts.items()},
                **{f"{k}_chars": v[1] for k, v in counts.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return final


def _iter_jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def build_default_tokenizer(corpus_dir: Path, vocab_size: int,
                            cache_dir: str | os.PathLike | None = None) -> Path:
    """Trains (or reuses) byte-level BPE of `vocab_size` on the corpus's training split."""
    from data.tokenizer_train import TOKENIZER_FILE, TOKENIZER_RECIPE, train_tokenizer

    key = stable_hash([corpus_dir.name, vocab_size, TOKENIZER_RECIPE])
    final = resolve_cache_dir(cache_dir) / "tokenizers" / f"stdlib-bpe{vocab_size}-{key}"
    if (final / TOKENIZER_FILE).is_file():
        return final / TOKENIZER_FILE
    return train_tokenizer(_iter_jsonl_texts(corpus_dir / "train.jsonl"), vocab_size, final)


def ensure_default_assets(cache_dir: str | os.PathLike | None = None, vocab_size: int = 8192, *,
                          root: Path | None = None, max_files: int | None = None
                          ) -> DefaultAssets:
    """The default corpus and tokenizer, built on first use (seconds) and cached."""
    corpus = build_stdlib_corpus(cache_dir, root=root, max_files=max_files)
    tok = build_default_tokenizer(corpus, vocab_size, cache_dir)
    return DefaultAssets(corpus / "train.jsonl", corpus / "val.jsonl", tok)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=None, help="default: $V4LAB_CACHE or ~/.cache/v4lab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files")
    p.add_argument("--no-tokenize", action="store_true",
                   help="skip pre-tokenising the corpus into shards")
    args = p.parse_args(argv)
    assets = ensure_default_assets(args.cache_dir, args.vocab_size, max_files=args.max_files)
    print(f"corpus:    {assets.train.parent}")
    print(f"tokenizer: {assets.tokenizer}")
    if not args.no_tokenize:
        from data.config import DataConfig
        from data.pretrain import prepare_pretrain

        prep = prepare_pretrain(DataConfig(cache_dir=args.cache_dir, vocab_size=args.vocab_size,
                                           default_max_files=args.max_files))
        for part in prep.train + prep.val:
            m = part.shard.meta
            print(f"shard:     {part.shard.path} ({m['n_docs']} docs, {m['n_tokens']} tokens, "
                  f"{m['n_bytes'] / max(m['n_tokens'], 1):.2f} bytes/token)")


if __name__ == "__main__":
    main()
