"""Packing: the batch helper's exact semantics, lossless concat-split windows, bin packing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data.config import SourceConfig
from data.packing import IGNORE, BinPackedStream, ConcatStream, Window, to_batch
from data.shards import build_token_shard
from data.sources import resolve_source
from tests.data._util import make_docs, segments, write_jsonl

BOS, EOS = 0, 1


def test_to_batch_labels_doc_ids_positions_by_hand():
    w = Window(np.array([0, 5, 6, 1, 0, 7, 1, 1]), np.array([0, 4, 7]),
               np.array([1, 1, 1, 1, 1, 0, 1, 0], bool))
    b = to_batch([w, Window(np.array([9, 8, 7, 6, 5, 4, 3, 2]), np.array([0]))])
    assert all(t.dtype.is_floating_point is False and t.shape == (2, 8) for t in b.values())
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    # next token of the same segment, and only where that token is a target
    assert b["labels"][0].tolist() == [5, 6, 1, IGNORE, IGNORE, 1, IGNORE, IGNORE]
    assert b["labels"][1].tolist() == [8, 7, 6, 5, 4, 3, 2, IGNORE]
    assert b["positions"][1].tolist() == list(range(8))


def corpus_shard(tmp_path, tok, cache, n=60, seed=11):
    docs = make_docs(n, seed)
    path = write_jsonl(tmp_path / f"c{seed}.jsonl", docs)
    return docs, build_token_shard(resolve_source(SourceConfig(str(path))), tok, cache,
                                   progress=False)


def reassemble(windows: list[Window]) -> list[list[int]]:
    """Rebuilds whole [BOS ... EOS] documents from consecutive windows: a segment that does not
    start with BOS continues the previous window's last segment."""
    docs: list[list[int]] = []
    for w in windows:
        b = to_batch([w])
        for seg in segments(b["input_ids"][0].tolist(), b["doc_ids"][0].tolist()):
            if seg[0] == BOS:
                docs.append(seg)
            else:
                docs[-1].extend(seg)
    return docs


@pytest.mark.parametrize("seq_len", [7, 64, 1000])
def test_concat_windows_round_trip_every_token_once(tmp_path, tok, cache, seq_len):
    docs, shard = corpus_shard(tmp_path, tok, cache)
    idx = np.arange(shard.n_docs)
    stream = ConcatStream(shard, idx, seq_len, BOS, EOS, seed=3, stream_id=0)
    total = stream.tokens_per_epoch
    n = -(-2 * total // seq_len)  # windows covering two epochs and a bit
    rebuilt = reassemble([stream.window_at(i) for i in range(n)])
    assert sum(len(d) for d in rebuilt) == n * seq_len
    assert all(d[0] == BOS and d.count(BOS) == 1 for d in rebuilt)
    # the first `total` tokens are epoch 0: every document exactly once, decoded exactly
    lengths = np.cumsum([len(d) for d in rebuilt])
    epoch0 = rebuilt[:int(np.searchsorted(lengths, total)) + 1]
    assert lengths[len(epoch0) - 1] == total
    assert all(d[-1] == EOS and d.count(EOS) == 1 for d in epoch0)
    assert Counter(tok.decode(d[1:-1]) for d in epoch0) == Counter(docs)
    # epoch 1 follows seamlessly with every document again, in another order
    epoch1 = rebuilt[len(epoch0):2 * len(epoch0)]
    assert Counter(tok.decode(d[1:-1]) for d in epoch1) == Counter(docs)
    assert [len(d) for d in epoch1] != [len(d) for d in epoch0]


def test_no_cross_document_leakage(tmp_path, tok, cache):
    docs, shard = corpus_shard(tmp_path, tok, cache)
    stream = ConcatStream(shard, np.arange(shard.n_docs), 96, BOS, EOS, seed=0, stream_id=0)
    b = to_batch([stream.window_at(i) for i in range(80)])
    ids, labels, dids, pos = (b[k].numpy() for k in ("input_ids", "labels", "doc_ids",
                                                     "positions"))
    has_label = labels[:, :-1] != IGNORE
    assert (dids[:, 1:][has_label] == dids[:, :-1][has_label]).all()  # targets stay in the doc
    assert (labels[:, :-1][has_label] == ids[:, 1:][has_label]).all()
    assert not (labels == BOS).any()  # a document's BOS is never predicted from the previous one
    new_doc = np.diff(dids, axis=1) != 0
    assert (np.diff(dids, axis=1) >= 0).all() and (dids[:, 0] == 0).all()
    assert (pos[:, 1:][new_doc] == 0).all() and (pos[:, 1:][~new_doc] ==
                                                  pos[:, :-1][~new_doc] + 1).all()
    assert (pos[ids == BOS] == 0).all()  # every BOS starts a segment
    # every segment decodes into (a piece of) a single source document
    for row in range(len(ids)):
        for seg in segments(ids[row].tolist(), dids[row].tolist()):
            text = tok.decode([t for t in seg if t not in (BOS, EOS)])
            assert any(text in d for d in docs), text


def test_windows_are_drawn_in_a_seeded_permutation_of_the_stream(tmp_path, tok, cache,
                                                                monkeypatch):
    """Each block of stream windows is drawn exactly once (no token dropped or repeated), in an
    order that is not the stream's (consecutive draws rarely come from the same document) and
    that is a pure function of (seed, index), so a resumed run draws the same windows."""
    import data.packing as packing

    monkeypatch.setattr(packing, "WINDOW_SHUFFLE_BLOCK", 16)  # several blocks on a tiny corpus
    _, shard = corpus_shard(tmp_path, tok, cache)
    stream = ConcatStream(shard, np.arange(shard.n_docs), 32, BOS, EOS, seed=3, stream_id=0)
    assert stream.shuffle_block == 16 < stream.n_windows
    raw = {stream.window_at(i).tokens.tobytes(): i for i in range(48)}
    drawn = [raw[stream.window(i).tokens.tobytes()] for i in range(48)]
    for b in range(3):  # block b draws stream windows [16b, 16b + 16), each once
        assert sorted(drawn[16 * b:16 * b + 16]) == list(range(16 * b, 16 * b + 16))
    assert drawn != list(range(48))
    neighbours = sum(abs(a - b) == 1 for a, b in zip(drawn, drawn[1:]))
    assert neighbours <= 8, drawn  # in stream order all 47 pairs would be neighbours
    again = ConcatStream(shard, np.arange(shard.n_docs), 32, BOS, EOS, seed=3, stream_id=0)
    assert all((again.window(i).tokens == stream.window(i).tokens).all() for i in (0, 17, 40))


def test_shuffle_depends_on_seed_only(tmp_path, tok, cache):
    _, shard = corpus_shard(tmp_path, tok, cache)
    idx = np.arange(shard.n_docs)

    def first(seed):
        s = ConcatStream(shard, idx, 50, BOS, EOS, seed=seed, stream_id=0)
        return np.stack([s.window(i).tokens for i in (0, 5, 31)])

    assert (first(1) == first(1)).all() and not (first(1) == first(2)).all()


def test_finite_stream_pads_last_window_and_counts_targets(tmp_path, tok, cache):
    _, shard = corpus_shard(tmp_path, tok, cache, n=9)
    stream = ConcatStream(shard, np.arange(shard.n_docs), 37, BOS, EOS, 0, 0, finite=True)
    b = to_batch([stream.window(i) for i in range(stream.n_windows)])
    assert int((b["labels"] != IGNORE).sum()) == stream.target_count()
    ids = b["input_ids"].numpy()
    n_pad = stream.n_windows * 37 - stream.tokens_per_epoch
    assert 0 <= n_pad < 37
    assert (ids == BOS).sum() == shard.n_docs and (ids == EOS).sum() == shard.n_docs + n_pad
    assert (b["labels"][-1, -n_pad - 1:] == IGNORE).all() if n_pad else True
    with pytest.raises(IndexError):
        stream.window(stream.n_windows)
    # storage order in finite mode: the first document comes first
    assert ids[0, 1:1 + 5].tolist() == shard.doc(0)[:5].tolist()


def test_bin_packing_keeps_documents_whole(tmp_path, tok, cache):
    from data.shards import ShardWriter, TokenShard

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    lengths[:3] = [40, 55, 1]  # one exactly fits, one is cut to seq_len
    (tmp_path / "s").mkdir()
    w = ShardWriter(tmp_path / "s", np.uint16, with_mask=True)
    flat = rng.integers(2, 500, size=int(lengths.sum()))
    mask = rng.integers(0, 2, size=int(lengths.sum()))
    w.add(flat, lengths, lengths, np.arange(200, dtype=np.uint64), mask)
    w.finish({"label": "s"})
    shard = TokenShard.open(tmp_path / "s")
    stream = BinPackedStream(shard, np.arange(200), 40, EOS, seed=0, stream_id=0, buffer=64)
    seen = Counter()
    for i in range(stream.n_windows):
        win = stream.window(i)
        b = to_batch([win])
        segs = segments(b["input_ids"][0].tolist(), b["doc_ids"][0].tolist())
        for s_start, seg in zip(win.seg_starts, segs):
            if not win.target_mask[s_start:].any() and (np.array(seg) == EOS).all() \
                    and s_start > 0 and s_start == win.seg_starts[-1]:
                continue  # padding
            match = [d for d in range(200) if shard.doc(d)[:40].tolist() == seg]
            assert match, seg
            seen[match[0]] += 1
            assert (win.target_mask[s_start:s_start + len(seg)] ==
                    shard.mask[shard.offsets[match[0]]:][:len(seg)].astype(bool)).all()
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}
    util = lengths.clip(max=40).sum() / (stream.n_windows * 40)
    assert util > 0.9  # first-fit decreasing leaves little padding
