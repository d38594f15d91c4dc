"""The pretraining loader end to end: determinism, rank sharding, exact resume, mixtures,
validation and bits-per-byte support, and the checks against the model config."""

from __future__ import annotations

import io
import random

import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.packing import IGNORE
from data.pretrain import build_pretrain_data, build_pretrain_loader
from model.config import get_config
from tests.data._util import make_docs, write_jsonl


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", make_docs(120, 21))


def cfg_for(cache, *sources, **kw):
    return DataConfig(sources=[s if isinstance(s, SourceConfig) else SourceConfig(str(s))
                               for s in sources], cache_dir=str(cache), progress=False, **kw)


def test_batch_contract_and_determinism(corpus, tok, cache):
    cfg = cfg_for(cache, corpus, val_fraction=0.1)
    a = build_pretrain_loader(cfg, tok, seq_len=64, micro_batch=3, seed=5)
    b = build_pretrain_loader(cfg, tok, seq_len=64, micro_batch=3, seed=5)
    c = build_pretrain_loader(cfg, tok, seq_len=64, micro_batch=3, seed=6)
    ba, bb, bc = take(a, 6), take(b, 6), take(c, 6)
    assert set(ba[0]) == {"input_ids", "labels", "doc_ids", "positions"}
    assert all(t.dtype == torch.int64 and t.shape == (3, 64) for t in ba[0].values())
    assert same(ba, bb) and not same(ba, bc)
    a.close(), b.close(), c.close()


def test_ranks_split_the_global_batch(corpus, tok, cache):
    cfg = cfg_for(cache, corpus)
    whole = build_pretrain_loader(cfg, tok, seq_len=32, micro_batch=6, seed=1)
    parts = [build_pretrain_loader(cfg, tok, seq_len=32, micro_batch=2, dp_rank=r, dp_world=3,
                                   seed=1) for r in range(3)]
    for _ in range(4):
        w = next(whole)
        p = [next(x) for x in parts]
        for k in w:
            assert torch.equal(w[k], torch.cat([q[k] for q in p]))


@pytest.mark.parametrize("prefetch", [0, 8])
def test_exact_resume_same_world(corpus, tok, cache, prefetch):
    cfg = cfg_for(cache, corpus, prefetch=prefetch)
    mk = lambda: build_pretrain_loader(cfg, tok, seq_len=48, micro_batch=2, seed=3)  # noqa: E731
    ref = take(mk(), 14)
    first = mk()
    take(first, 5)  # the worker has prefetched further; the state must not include those
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    first.close()
    resumed = mk()
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert same(take(resumed, 9), ref[5:])
    # loading a state into a running loader drops what it had prefetched
    resumed.load_state_dict(first.state_dict())
    assert same(take(resumed, 2), ref[5:7])


def test_resume_refuses_different_data(corpus, tmp_path, tok, cache):
    state = build_pretrain_loader(cfg_for(cache, corpus), tok, seq_len=48, micro_batch=2
                                  ).state_dict()
    other = build_pretrain_loader(cfg_for(cache, corpus), tok, seq_len=64, micro_batch=2)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(state)
    more = write_jsonl(tmp_path / "more.jsonl", make_docs(5, 99))
    mixed = build_pretrain_loader(cfg_for(cache, corpus, more), tok, seq_len=48, micro_batch=2)
    with pytest.raises(ValueError, match="sources"):
        mixed.load_state_dict(state)


def test_resume_survives_moving_the_corpus(corpus, tmp_path, tok, cache):
    """The saved state names the data by content, not by path: a copy elsewhere (re-tokenised
    into a new cache entry) resumes exactly."""
    import shutil

    mk = lambda path: build_pretrain_loader(cfg_for(cache, path, prefetch=0), tok,  # noqa: E731
                                            seq_len=48, micro_batch=2)
    first = mk(corpus)
    ref = take(first, 6)
    moved = tmp_path / "elsewhere" / "corpus.jsonl"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)
    resumed = mk(moved)
    state = mk(corpus)
    take(state, 4)
    resumed.load_state_dict(state.state_dict())
    assert len(list((cache / "tokens").iterdir())) == 2
    assert same(take(resumed, 2), ref[4:6])


def test_mixture_weights_hold_over_many_batches(tmp_path, tok, cache):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(80, 31))  # no capital Q anywhere
    rng = random.Random(0)
    b = write_jsonl(tmp_path / "b.jsonl", [" ".join("Q" * rng.randint(1, 4)
                                                    for _ in range(rng.randint(1, 60)))
                                           for _ in range(40)])
    for wa, wb in ((3.0, 1.0), (0.9, 0.1)):
        cfg = cfg_for(cache, SourceConfig(str(a), weight=wa), SourceConfig(str(b), weight=wb))
        loader = build_pretrain_loader(cfg, tok, seq_len=32, micro_batch=8, seed=2)
        rows = [r for batch in take(loader, 250) for r in batch["input_ids"]]
        loader.close()
        from_b = [("Q" in tok.decode(r)) for r in rows]
        frac = sum(from_b) / len(rows)
        assert abs(frac - wb / (wa + wb)) < 0.03, (wa, wb, frac)
        for r, is_b in zip(rows, from_b):  # a window never mixes sources
            text = tok.decode(r, skip_special_tokens=True).replace(" ", "")
            assert (set(text) <= {"Q"}) == is_b


def test_validation_split_and_bytes_per_token(corpus, tok, cache):
    cfg = cfg_for(cache, corpus, val_fraction=0.2)
    data = build_pretrain_data(cfg, tok, seq_len=40, micro_batch=4)
    texts = make_docs(120, 21)
    batches = list(data.val)
    assert len(batches) == len(data.val) and batches[0]["input_ids"].shape == (4, 40)
    # one rank reads the validation stream in order: split it back into documents
    stream = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    held, doc = [], None
    for t in stream:
        if t == 0:
            doc = []
        elif t == 1:
            if doc is not None:
                held.append(tok.decode(doc))
            doc = None
        elif doc is not None:
            doc.append(t)
    assert 10 < len(held) < 45 and set(held) <= set(texts)  # whole source documents
    train_text = tok.decode(torch.cat([b["input_ids"].flatten() for b in take(data.train, 80)]))
    headers = lambda ts: {t.split(":")[0] + ":" for t in ts}  # noqa: E731
    assert not any(h in train_text for h in headers(held))  # held out of training
    assert sum(h in train_text for h in headers(set(texts) - set(held))) > 40
    n_targets = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    assert data.bytes_per_token == pytest.approx(sum(len(t.encode()) for t in held) / n_targets,
                                                 rel=1e-12)
    # every rank runs the same number of full batches; together they cover the same rows
    ranks = [list(build_pretrain_data(cfg, tok, seq_len=40, micro_batch=4, dp_rank=r,
                                      dp_world=3).val) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    rows = lambda bs: sorted(tuple(x.tolist()) for b in bs  # noqa: E731
                             for x, y in zip(b["input_ids"], b["labels"]) if (y != IGNORE).any())
    assert rows([b for r in ranks for b in r]) == rows(batches)


def test_model_limits_checked_before_tokenising(corpus, tok, cache):
    cfg = cfg_for(cache, corpus)
    with pytest.raises(ValueError, match=r"seq_len=8192 exceeds the model's max_seq_len=4096"):
        build_pretrain_data(cfg, tok, seq_len=8192, model_cfg=get_config("tiny"))
    with pytest.raises(ValueError, match=r"vocab_size=256"):
        build_pretrain_data(cfg, tok, seq_len=64, model_cfg=get_config("tiny", vocab_size=256))
    assert not (cache / "tokens").exists()
