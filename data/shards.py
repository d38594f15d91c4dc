"""Tokenised shards: each source tokenised once into flat memory-mapped arrays, cached by
(source content, tokenizer).

Layout of one shard directory `<cache>/tokens/<name>-<key>/`:

    tokens.bin   [n_tokens]   uint16/uint32  every document's ids back to back, no BOS/EOS
    offsets.bin  [n_docs + 1] int64          document i is tokens[offsets[i]:offsets[i+1]]
    nbytes.bin   [n_docs]     int64          UTF-8 bytes of each document (bits per byte)
    hash.bin     [n_docs]     uint64         stable content hash (held-out split)
    mask.bin     [n_tokens]   uint8          SFT only: 1 on assistant-produced tokens
    meta.json                                counts, dtype, source and tokenizer identity

The directory is built under a temporary name and renamed when complete (`atomic_directory`), so
a shard that exists is complete. Arrays are appended as raw bytes while reading, so memory stays
bounded by one batch of documents whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import atomic_directory, stable_hash
from data.config import DataError
from data.sources import ResolvedSource, iter_documents
from data.tokenizer_train import raw_text_encoder, tokenizer_fingerprint

SHARD_VERSION = 1
META = "meta.json"


def doc_hash(raw: bytes) -> int:
    """64-bit content hash; documents with equal text land on the same side of the split."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def hash_threshold(fraction: float) -> np.uint64:
    """Documents whose hash is below this are held out: `fraction` of them, independent of order,
    of the number of documents and of the shard."""
    return np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenShard:
    """Read side: memory-mapped arrays of one finished shard directory."""

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray  # [n_tokens]
    offsets: np.ndarray  # [n_docs + 1] int64
    nbytes: np.ndarray  # [n_docs] int64
    hashes: np.ndarray  # [n_docs] uint64
    mask: np.ndarray | None  # [n_tokens] uint8, SFT only

    @classmethod
    def open(cls, path: str | Path) -> "TokenShard":
        path = Path(path)
        meta = json.loads((path / META).read_text())
        n_docs, n_tokens = meta["n_docs"], meta["n_tokens"]

        def mm(name: str, dtype, n: int) -> np.ndarray:
            return np.memmap(path / name, dtype=dtype, mode="r", shape=(n,))

        mask = mm("mask.bin", np.uint8, n_tokens) if meta.get("has_mask") else None
        return cls(path, meta, mm("tokens.bin", meta["dtype"], n_tokens),
                   mm("offsets.bin", np.int64, n_docs + 1), mm("nbytes.bin", np.int64, n_docs),
                   mm("hash.bin", np.uint64, n_docs), mask)

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def lengths(self) -> np.ndarray:  # [n_docs] int64
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train doc indices, held-out doc indices), each sorted."""
        is_val = np.asarray(self.hashes) < hash_threshold(val_fraction)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class ShardWriter:
    """Write side: appends documents to the raw files of a (temporary) shard directory."""

    def __init__(self, path: Path, dtype: np.dtype, with_mask: bool = False):
        self.path, self.dtype = path, np.dtype(dtype)
        self.files = {n: open(path / f"{n}.bin", "wb")
                      for n in ("tokens", "offsets", "nbytes", "hash")
                      + (("mask",) if with_mask else ())}
        self.n_docs = self.n_tokens = self.n_bytes = 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())
        self.digest = hashlib.blake2b(digest_size=16)  # of everything written: see finish()

    def add(self, flat: np.ndarray, lengths: np.ndarray, nbytes: np.ndarray,
            hashes: np.ndarray, mask: np.ndarray | None = None) -> None:
        """`flat`: [sum(lengths)] ids of len(lengths) documents back to back."""
        if not len(lengths):
            return
        blobs = {"tokens": np.asarray(flat, dtype=self.dtype).tobytes(),
                 "offsets": (self.n_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes(),
                 "nbytes": np.asarray(nbytes, np.int64).tobytes(),
                 "hash": np.asarray(hashes, np.uint64).tobytes()}
        if mask is not None:
            blobs["mask"] = np.asarray(mask, np.uint8).tobytes()
        for name, blob in blobs.items():
            self.files[name].write(blob)
            self.digest.update(blob)
        self.n_docs += len(lengths)
        self.n_tokens += int(np.sum(lengths))
        self.n_bytes += int(np.sum(nbytes))

    def finish(self, meta: dict[str, Any]) -> None:
        """Closes the arrays and writes meta.json last. `content_digest` identifies the data
        itself (not where it lives), so a resumed run can check it reads the same data even
        after the corpus was copied elsewhere and re-tokenised."""
        for f in self.files.values():
            f.close()
        meta = dict(meta, version=SHARD_VERSION, n_docs=self.n_docs, n_tokens=self.n_tokens,
                    n_bytes=self.n_bytes, dtype=self.dtype.name, has_mask="mask" in self.files,
                    content_digest=self.digest.hexdigest())
        (self.path / META).write_text(json.dumps(meta, indent=1))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def shard_dir(cache_root: Path, label: str, key_obj: Any) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(label.rstrip("/*")).name or "source")[:40]
    return cache_root / "tokens" / f"{slug}-{stable_hash(key_obj)}"


def open_cached(final: Path) -> TokenShard | None:
    """The finished shard at `final`, or None. A directory without meta.json cannot come from
    `atomic_directory`; it is treated as foreign debris and removed."""
    if (final / META).is_file():
        return TokenShard.open(final)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    return None


def build_token_shard(rs: ResolvedSource, tokenizer, cache_root: Path, *,
                      batch_size: int = 1024, progress: bool = True) -> TokenShard:
    """Tokenises a text source into a shard, or returns the cached one.

    `encode_batch_fast` runs on all cores (Rust threads); this loop only moves ids into numpy and
    appends them to disk. Empty documents are skipped (counted in meta.json). Raises on a bad
    record, naming file:line, and on a source with no non-empty document; either way nothing is
    left in the cache.
    """
    from tqdm.auto import tqdm

    fp = tokenizer_fingerprint(tokenizer)
    final = shard_dir(cache_root, rs.label, {"v": SHARD_VERSION, "source": rs.descriptor(),
                                             "tokenizer": fp})
    cached = open_cached(final)
    if cached is not None:
        return cached
    enc = raw_text_encoder(tokenizer)
    dtype = token_dtype(len(tokenizer))
    n_empty = 0
    with atomic_directory(final) as tmp:
        writer = ShardWriter(tmp, dtype)
        try:
            bar = tqdm(desc=f"tokenising {rs.label}", unit="doc", disable=not progress)
            for texts in iter_documents(rs, batch_size):
                ids = [e.ids for e in enc.encode_batch_fast(texts, add_special_tokens=False)]
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                keep = lengths > 0
                n_empty += int((~keep).sum())
                raw = [t.encode("utf-8") for t, k in zip(texts, keep) if k]
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                                   count=int(lengths.sum()))
                writer.add(flat, lengths[keep], np.fromiter(map(len, raw), np.int64, len(raw)),
                           np.fromiter(map(doc_hash, raw), np.uint64, len(raw)))
                bar.update(len(texts))
                bar.set_postfix(tokens=writer.n_tokens, refresh=False)
            bar.close()
            if writer.n_docs == 0:
                raise DataError(f"source {rs.label!r}: empty source (no non-empty document"
                                 f"{f'; {n_empty} empty ones' if n_empty else ''})")
            writer.finish({"source": rs.descriptor(), "tokenizer": fp, "label": rs.label,
                           "n_empty_skipped": n_empty})
        finally:
            writer.close()
    return TokenShard.open(final)
