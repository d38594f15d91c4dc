"""SFT data: JSONL conversations -> (ids, assistant-only loss mask) through `encoding/` -> cached
shards with a mask -> whole conversations bin-packed into windows, batched like pretraining.

JSONL is read line by line with `json`, not through `datasets`: Arrow would force every
conversation into one inferred schema (filling absent message keys with nulls, which the chat
encoder reads as present), and a line-oriented reader names the exact file:line of a bad record.

Length policy, applied when packing (so the cache is independent of seq_len): a conversation
longer than seq_len is cut to its first seq_len tokens (`overlong="truncate"`) or skipped
(`"drop"`). A conversation with no trainable token (none to begin with, or none left after the
cut) is skipped. Every count is in `SFTStats` and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import atomic_directory, rank0_first, resolve_cache_dir
from data.config import THINKING_MODES, DataError, SFTConfig, SourceConfig
from data.loader import EvalLoader, PackedLoader
from data.packing import BinPackedStream
from data.sampler import DistributedSampler
from data.shards import (SHARD_VERSION, ShardWriter, TokenShard, doc_hash, open_cached,
                         shard_dir, token_dtype)
from data.sources import decode_line, resolve_source
from data.tokenizer_train import (check_model_compat, resolve_tokenizer, special_ids,
                                  tokenizer_fingerprint)

log = logging.getLogger("v4lab.data")


@dataclass
class SFTStats:
    conversations: int = 0  # read from the files
    truncated: int = 0  # longer than seq_len, cut (overlong="truncate")
    dropped_overlong: int = 0  # longer than seq_len, skipped (overlong="drop")
    dropped_untrainable: int = 0  # no assistant token to learn from (before or after the cut)
    tokens: int = 0  # packed tokens (after the cut)
    target_tokens: int = 0  # tokens with loss mask 1 (after the cut)
    domains: dict[str, int] = field(default_factory=dict)  # conversations per `domain`, whole files

    def add(self, other: "SFTStats") -> None:
        for k in ("conversations", "truncated", "dropped_overlong", "dropped_untrainable",
                  "tokens", "target_tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.domains = dict(Counter(self.domains) + Counter(other.domains))


@dataclass
class SFTData:
    train: PackedLoader
    val: EvalLoader | None
    stats: SFTStats  # of the training split
    tokenizer: Any


def _encoder_version() -> str:
    """Digest of the encoding package's code: a changed chat format invalidates SFT caches."""
    import encoding

    h = hashlib.sha256()
    for f in sorted(Path(encoding.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _parse_line(path: str, lineno: int, line: str, cfg: SFTConfig) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    messages = rec.get("messages")
    if messages is None:
        raise DataError(f"{where}: missing 'messages' field (keys: {sorted(rec)})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {m!r:.80}")
    mode = rec.get("thinking_mode", cfg.default_thinking_mode)
    if mode not in THINKING_MODES:
        raise DataError(f"{where}: thinking_mode={mode!r}: choose one of {THINKING_MODES}")
    return rec


def tokenize_sft_source(src: SourceConfig, tokenizer, cfg: SFTConfig,
                        cache_root: Path) -> TokenShard:
    """Tokenises every conversation of a JSONL source into a masked shard (cached)."""
    from tqdm.auto import tqdm

    from encoding.tokenizer import tokenize_conversation

    rs = resolve_source(SourceConfig(src.path, format="json"))
    files = rs.files
    fp = tokenizer_fingerprint(tokenizer)
    key = {"v": SHARD_VERSION, "kind": "sft", "files": rs.descriptor()["files"],
           "tokenizer": fp, "mode": cfg.default_thinking_mode,
           "drop_thinking": cfg.drop_thinking, "encoder": _encoder_version()}
    final = shard_dir(cache_root, src.path, key)
    cached = open_cached(final)
    if cached is not None:
        return cached
    domains: Counter = Counter()
    with atomic_directory(final) as tmp:
        writer = ShardWriter(tmp, token_dtype(len(tokenizer)), with_mask=True)
        try:
            bar = tqdm(desc=f"tokenising {src.path}", unit="conv", disable=not cfg.progress)
            for path in files:
                with open(path, "rb") as f:
                    for lineno, raw_line in enumerate(f, 1):
                        line = decode_line(path, lineno, raw_line)
                        if not line.strip():
                            continue
                        rec = _parse_line(path, lineno, line, cfg)
                        try:
                            ids, mask = tokenize_conversation(
                                tokenizer, rec["messages"],
                                rec.get("thinking_mode", cfg.default_thinking_mode),
                                tools=rec.get("tools"), drop_thinking=cfg.drop_thinking,
                                reasoning_effort=rec.get("reasoning_effort"))
                        except (ValueError, KeyError, TypeError) as e:
                            raise DataError(f"{path}:{lineno}: {e}") from e
                        raw = line.encode("utf-8")
                        writer.add(np.asarray(ids, np.int64), np.array([len(ids)]),
                                   np.array([len(raw)]), np.array([doc_hash(raw)], np.uint64),
                                   np.asarray(mask, np.uint8))
                        domains[str(rec.get("domain"))] += 1
                        bar.update(1)
            bar.close()
            if writer.n_docs == 0:
                raise DataError(f"source {src.path!r}: empty source (no conversation in "
                                 f"{files[:5]})")
            writer.finish({"label": src.path, "tokenizer": fp, "domains": dict(domains)})
        finally:
            writer.close()
    return TokenShard.open(final)


def select_conversations(shard: TokenShard, docs: np.ndarray, seq_len: int,
                         policy: str) -> tuple[np.ndarray, SFTStats]:
    """Applies the length policy: the documents to pack, and what happened to the others."""
    offsets = np.asarray(shard.offsets)
    starts, ends = offsets[docs], offsets[docs + 1]  # [n] each
    lengths = ends - starts
    cum = np.zeros(len(shard.mask) + 1, np.int64)  # [n_tokens + 1] running count of targets
    np.cumsum(shard.mask, out=cum[1:])
    targets = cum[ends] - cum[starts]  # [n]
    long = lengths > seq_len
    if policy == "truncate":  # count the targets that survive the cut
        targets = cum[np.minimum(ends, starts + seq_len)] - cum[starts]
        keep = targets > 0
        stats = SFTStats(truncated=int((long & keep).sum()),
                         dropped_untrainable=int((~keep).sum()))
    else:
        keep = ~long & (targets > 0)
        stats = SFTStats(dropped_overlong=int(long.sum()),
                         dropped_untrainable=int((~long & (targets == 0)).sum()))
    stats.conversations = len(docs)
    stats.tokens = int(np.minimum(lengths, seq_len)[keep].sum())
    stats.target_tokens = int(targets[keep].sum())
    stats.domains = dict(shard.meta.get("domains", {}))
    return docs[keep], stats


def build_sft_data(cfg: SFTConfig, tokenizer=None, seq_len: int = 2048, micro_batch: int = 4,
                   dp_rank: int = 0, dp_world: int = 1, seed: int = 0, *, model_cfg=None,
                   val_max_batches: int | None = None) -> SFTData:
    """Packed SFT loaders. `tokenizer` (loaded or a path) overrides `cfg.tokenizer`."""
    tok_arg = tokenizer if tokenizer is not None else cfg.tokenizer
    if tok_arg is None:
        raise DataError("SFTConfig.tokenizer=None: give the tokenizer the model was trained with")
    tok = resolve_tokenizer(tok_arg)
    check_model_compat(tok, seq_len, model_cfg)
    cache_root = resolve_cache_dir(cfg.cache_dir)
    shards = rank0_first(lambda: [tokenize_sft_source(s, tok, cfg, cache_root)
                                  for s in cfg.sources + cfg.val_sources])
    train_shards, val_shards = shards[:len(cfg.sources)], shards[len(cfg.sources):]
    train_parts, val_parts = [], []
    for shard in train_shards:
        if cfg.val_sources:
            train_parts.append((shard, np.arange(shard.n_docs)))
        else:
            tr, va = shard.split(cfg.val_fraction)
            train_parts.append((shard, tr))
            if len(va):
                val_parts.append((shard, va))
    val_parts += [(s, np.arange(s.n_docs)) for s in val_shards]

    _, eos = special_ids(tok)
    stats, streams, identity = SFTStats(), [], []
    for i, (shard, docs) in enumerate(train_parts):
        keep, st = select_conversations(shard, docs, seq_len, cfg.overlong)
        stats.add(st)
        if not len(keep):
            raise DataError(f"source {shard.meta['label']!r}: no conversation left to train on "
                             f"({st.dropped_overlong} over seq_len={seq_len}, "
                             f"{st.dropped_untrainable} without assistant tokens)")
        streams.append(BinPackedStream(shard, keep, seq_len, eos, seed, i, cfg.pack_buffer))
        identity.append(f"{shard.meta['content_digest']}:{len(keep)}")
    if stats.truncated or stats.dropped_overlong or stats.dropped_untrainable:
        log.warning("SFT data: %d conversations, %d truncated to seq_len=%d, %d dropped as "
                    "longer than seq_len, %d dropped without trainable tokens", stats.conversations,
                    stats.truncated, seq_len, stats.dropped_overlong, stats.dropped_untrainable)
    sampler = DistributedSampler(
        [s.weight for s in cfg.sources], seed, dp_rank, dp_world, micro_batch,
        {"kind": "sft", "seq_len": int(seq_len), "overlong": cfg.overlong, "sources": identity,
         "pack_buffer": cfg.pack_buffer})
    train = PackedLoader(streams, sampler, cfg.prefetch)

    val = None
    val_streams = []
    for i, (shard, docs) in enumerate(val_parts):
        keep, _ = select_conversations(shard, docs, seq_len, cfg.overlong)
        if len(keep):
            val_streams.append(BinPackedStream(shard, keep, seq_len, eos, 0, i, cfg.pack_buffer,
                                               finite=True))
    if val_streams:
        val = EvalLoader(val_streams, dp_rank, dp_world, micro_batch, eos, float("nan"),
                         val_max_batches)
    return SFTData(train, val, stats, tok)

