"""Pretraining data end to end: config -> tokenizer -> cached shards -> packed, resumable loaders.

This is what the launcher calls. Everything that can fail on user input (a missing file, a
malformed record, a tokenizer too large for the model, a seq_len the model cannot take) fails
here, before the first training step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import rank0_first, resolve_cache_dir
from data.config import DataConfig, DataError, SourceConfig
from data.loader import EvalLoader, PackedLoader
from data.packing import ConcatStream
from data.sampler import DistributedSampler
from data.shards import TokenShard, build_token_shard
from data.sources import resolve_source
from data.tokenizer_train import check_model_compat, resolve_tokenizer, special_ids

log = logging.getLogger("v4lab.data")


@dataclass
class SourcePart:
    """A source's shard and the documents of it that one split uses."""

    source: SourceConfig
    shard: TokenShard
    docs: np.ndarray  # [n] sorted document indices


@dataclass
class PreparedPretrain:
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    train: list[SourcePart]
    val: list[SourcePart]


@dataclass
class PretrainData:
    train: PackedLoader
    val: EvalLoader | None
    bytes_per_token: float  # of the validation text (of the training text if there is none)
    tokenizer: Any


def _shard(src: SourceConfig, tokenizer, cfg: DataConfig, cache_root: Path) -> TokenShard:
    return build_token_shard(resolve_source(src), tokenizer, cache_root,
                             batch_size=cfg.tokenize_batch, progress=cfg.progress)


def prepare_pretrain(cfg: DataConfig, tokenizer=None, *, seq_len: int | None = None,
                     model_cfg=None) -> PreparedPretrain:
    """Resolves the tokenizer and tokenises every source (cached). Under torch.distributed,
    rank 0 builds while the others wait, then every rank opens the cache."""

    def build() -> PreparedPretrain:
        cache_root = resolve_cache_dir(cfg.cache_dir)
        sources, val_sources = cfg.sources, cfg.val_sources
        tok = tokenizer if tokenizer is not None else cfg.tokenizer
        if not sources or tok is None:  # the default corpus and/or the tokenizer trained on it
            from data.prepare import build_default_tokenizer, build_stdlib_corpus

            corpus = build_stdlib_corpus(cache_root, max_files=cfg.default_max_files)
            if not sources:
                sources = [SourceConfig(str(corpus / "train.jsonl"))]
                val_sources = [SourceConfig(str(corpus / "val.jsonl"))]
            if tok is None:
                tok = build_default_tokenizer(corpus, cfg.vocab_size, cache_root)
        tok = resolve_tokenizer(tok)
        if seq_len is not None:
            check_model_compat(tok, seq_len, model_cfg)
        train, val = [], []
        for src in sources:
            shard = _shard(src, tok, cfg, cache_root)
            if val_sources:
                train.append(SourcePart(src, shard, np.arange(shard.n_docs)))
            else:
                tr, va = shard.split(cfg.val_fraction)
                train.append(SourcePart(src, shard, tr))
                if len(va):
                    val.append(SourcePart(src, shard, va))
        for src in val_sources:
            shard = _shard(src, tok, cfg, cache_root)
            val.append(SourcePart(src, shard, np.arange(shard.n_docs)))
        for part in train:
            if len(part.docs) == 0:
                raise DataError(f"source {part.source.path!r}: every document was held out "
                                 f"for validation (val_fraction={cfg.val_fraction})")
        return PreparedPretrain(tok, train, val)

    return rank0_first(build)


def _identity(parts: list[SourcePart], seq_len: int) -> dict[str, Any]:
    return {"kind": "pretrain", "seq_len": int(seq_len),
            "sources": [f"{p.shard.meta['content_digest']}:{len(p.docs)}" for p in parts]}


def make_train_loader(prep: PreparedPretrain, cfg: DataConfig, seq_len: int, micro_batch: int,
                      dp_rank: int, dp_world: int, seed: int) -> PackedLoader:
    bos, eos = special_ids(prep.tokenizer)
    streams = [ConcatStream(p.shard, p.docs, seq_len, bos, eos, seed, i)
               for i, p in enumerate(prep.train)]
    sampler = DistributedSampler([p.source.weight for p in prep.train], seed, dp_rank, dp_world,
                                 micro_batch, _identity(prep.train, seq_len))
    return PackedLoader(streams, sampler, cfg.prefetch)


def make_val_loader(prep: PreparedPretrain, seq_len: int, micro_batch: int, dp_rank: int,
                    dp_world: int, max_batches: int | None = None) -> EvalLoader | None:
    if not prep.val:
        return None
    bos, eos = special_ids(prep.tokenizer)
    streams = [ConcatStream(p.shard, p.docs, seq_len, bos, eos, 0, i, finite=True)
               for i, p in enumerate(prep.val)]
    n_bytes = sum(int(np.asarray(p.shard.nbytes)[p.docs].sum()) for p in prep.val)
    n_targets = sum(s.target_count() for s in streams)
    return EvalLoader(streams, dp_rank, dp_world, micro_batch, eos, n_bytes / n_targets,
                      max_batches)


def build_pretrain_data(cfg: DataConfig, tokenizer=None, seq_len: int = 512,
                        micro_batch: int = 8, dp_rank: int = 0, dp_world: int = 1,
                        seed: int = 0, *, model_cfg=None, val_max_batches: int | None = None
                        ) -> PretrainData:
    """Training loader, validation loader and bytes per token, from one preparation.

    `tokenizer` (a loaded tokenizer or a path) overrides `cfg.tokenizer`; with neither, the
    default stdlib tokenizer is used (trained on first use). `model_cfg` (a `ModelConfig`)
    enables the vocab_size / max_seq_len / BOS-EOS checks.
    """
    prep = prepare_pretrain(cfg, tokenizer, seq_len=seq_len, model_cfg=model_cfg)
    train = make_train_loader(prep, cfg, seq_len, micro_batch, dp_rank, dp_world, seed)
    val = make_val_loader(prep, seq_len, micro_batch, dp_rank, dp_world, val_max_batches)
    if val is not None:
        bpt = val.bytes_per_token
    else:
        n_bytes = sum(int(np.asarray(p.shard.nbytes)[p.docs].sum()) for p in prep.train)
        n_tok = sum(int(np.diff(p.shard.offsets)[p.docs].sum()) + len(p.docs) for p in prep.train)
        bpt = n_bytes / n_tok
    return PretrainData(train, val, bpt, prep.tokenizer)


def build_pretrain_loader(cfg: DataConfig, tokenizer=None, seq_len: int = 512,
                          micro_batch: int = 8, dp_rank: int = 0, dp_world: int = 1,
                          seed: int = 0, *, model_cfg=None) -> PackedLoader:
    """The endless, resumable training loader alone."""
    prep = prepare_pretrain(cfg, tokenizer, seq_len=seq_len, model_cfg=model_cfg)
    return make_train_loader(prep, cfg, seq_len, micro_batch, dp_rank, dp_world, seed)


def build_val_loader(cfg: DataConfig, tokenizer=None, seq_len: int = 512, micro_batch: int = 8,
                     dp_rank: int = 0, dp_world: int = 1, *, model_cfg=None,
                     max_batches: int | None = None) -> EvalLoader | None:
    """The finite validation loader (None when nothing is held out); `.bytes_per_token`."""
    prep = prepare_pretrain(cfg, tokenizer, seq_len=seq_len, model_cfg=model_cfg)
    return make_val_loader(prep, seq_len, micro_batch, dp_rank, dp_world, max_batches)
