"""Tokenised shards: content, cache reuse and invalidation, and no partial cache on failure."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data.config import SourceConfig
from data.shards import build_token_shard
from data.sources import resolve_source
from data.tokenizer_train import raw_text_encoder
from tests.data._util import make_docs, write_jsonl


def build(path, tok, cache, **kw):
    return build_token_shard(resolve_source(SourceConfig(str(path))), tok, cache,
                             progress=False, **kw)


def test_shard_holds_each_document_tokens_bytes_and_hash(tmp_path, tok, cache):
    docs = make_docs(40, 5)
    docs[7] = ""  # empty documents are skipped and counted
    shard = build(write_jsonl(tmp_path / "c.jsonl", docs), tok, cache, batch_size=8)
    kept = [d for d in docs if d]
    enc = raw_text_encoder(tok)
    assert shard.n_docs == len(kept) and shard.meta["n_empty_skipped"] == 1
    assert shard.tokens.dtype == np.uint16  # vocab fits 16 bits
    for i, d in enumerate(kept):
        assert shard.doc(i).tolist() == enc.encode(d, add_special_tokens=False).ids
        assert shard.nbytes[i] == len(d.encode("utf-8"))
    assert shard.meta["n_bytes"] == sum(len(d.encode()) for d in kept)
    assert len(set(shard.hashes.tolist())) == len(kept)


def test_cache_reused_then_invalidated_by_edit(tmp_path, tok, cache, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(10, 6))
    first = build(path, tok, cache)
    import data.shards as shards_mod

    def boom(*a, **k):
        raise AssertionError("a cached shard was tokenised again")

    monkeypatch.setattr(shards_mod, "iter_documents", boom)
    assert build(path, tok, cache).path == first.path  # cache hit: no reading at all
    monkeypatch.undo()
    write_jsonl(path, make_docs(11, 6))
    os.utime(path, ns=(1, 1))  # a different mtime, as any edit has
    second = build(path, tok, cache)
    assert second.path != first.path and second.n_docs == 11


def test_interrupted_tokenisation_leaves_no_cache(tmp_path, tok, cache):
    path = tmp_path / "c.jsonl"
    docs = make_docs(50, 7)
    write_jsonl(path, docs)
    with open(path, "a") as f:
        f.write('{"text": "fine"}\n{"text": broken\n')  # found only after 6 batches of 8 docs
    with pytest.raises(ValueError, match=r"c\.jsonl:52: malformed JSON"):
        build(path, tok, cache, batch_size=8)
    assert list((cache / "tokens").iterdir()) == []  # temp dir removed, nothing final
    write_jsonl(path, docs)  # fixed
    assert build(path, tok, cache).n_docs == 50


def test_interrupt_by_exception_inside_tokeniser(tmp_path, tok, cache, monkeypatch):
    """A crash mid-way (here a KeyboardInterrupt on the third batch) leaves nothing behind."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(40, 8))
    import data.shards as shards_mod

    real, calls = shards_mod.iter_documents, []

    def flaky(rs, bs):
        for i, batch in enumerate(real(rs, bs)):
            calls.append(i)
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(shards_mod, "iter_documents", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(path, tok, cache, batch_size=5)
    assert calls == [0, 1, 2] and list((cache / "tokens").iterdir()) == []
