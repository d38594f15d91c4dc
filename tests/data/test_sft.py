"""SFT: conversations -> ids + assistant-only loss mask via `encoding/`, packed whole with
document ids; length policy counts; located errors for bad records; exact resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from data.config import SFTConfig, SourceConfig
from data.packing import IGNORE
from data.sft import build_sft_data
from encoding.special_tokens import EOS
from encoding.tokenizer import tokenize_conversation
from tests.data._util import segments

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def conversation(i: int, rng: random.Random) -> dict:
    n_words = rng.choice([2, 5, 30, 120])
    rec = {"messages": [
        {"role": "system", "content": f"system prompt {i}"},
        {"role": "user", "content": f"question {i}: " + "word " * rng.randint(1, 20)},
        {"role": "assistant", "content": f"answer {i}: " + "reply " * n_words},
    ], "domain": rng.choice(["math", "code"])}
    if i % 3 == 1:
        rec["thinking_mode"] = "thinking"
        rec["messages"][2]["reasoning_content"] = f"thinking about {i}"
    if i % 5 == 2:
        rec["tools"] = TOOLS
    return rec


def write_convs(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def records():
    rng = random.Random(0)
    return [conversation(i, rng) for i in range(60)]


def encode(tok, rec):
    return tokenize_conversation(tok, rec["messages"], rec.get("thinking_mode", "chat"),
                                 tools=rec.get("tools"))


def sft(tmp_path, paths, tok, seq_len=96, micro_batch=4, **kw):
    cfg = SFTConfig(sources=[SourceConfig(str(p)) for p in paths],
                    cache_dir=str(tmp_path / "cache"), progress=False, **kw)
    return build_sft_data(cfg, tok, seq_len=seq_len, micro_batch=micro_batch, seed=1)


def test_loss_mask_alignment_and_whole_conversations(tmp_path, tok, records):
    data = sft(tmp_path, [write_convs(tmp_path / "c.jsonl", records)], tok, seq_len=400,
               overlong="drop")
    expected = {tuple(encode(tok, r)[0]): encode(tok, r)[1] for r in records}
    seen = set()
    n_windows = -(-data.stats.tokens // 400)
    for _ in range(n_windows):
        b = next(data.train)
        for ids, labels, dids, pos in zip(*(b[k].tolist() for k in
                                            ("input_ids", "labels", "doc_ids", "positions"))):
            start = 0
            for seg in segments(ids, dids):
                end = start + len(seg)
                assert pos[start:end] == list(range(len(seg)))
                if tuple(seg) not in expected:  # the padding tail: EOS, never a target
                    assert end == len(ids) and set(seg) == {1}
                    assert set(labels[start:end]) == {IGNORE}
                    break
                mask = expected[tuple(seg)]
                seen.add(tuple(seg))
                for t in range(start, end):  # label t predicts token t+1 iff that one is masked
                    inside = t + 1 < end
                    want = seg[t + 1 - start] if inside and mask[t + 1 - start] else IGNORE
                    assert labels[t] == want
                start = end
    assert len(seen) == len(records) - data.stats.dropped_overlong
    # what the model learns is exactly the assistant's output
    i = next(k for k, r in enumerate(records) if r.get("thinking_mode") == "thinking")
    ids, mask = encode(tok, records[i])
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    assert learned.startswith(f"thinking about {i}") and learned.endswith(EOS)
    assert "question" not in learned and "system prompt" not in learned


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_policy_counts(tmp_path, tok, records, policy):
    seq_len = 64
    lengths = [len(encode(tok, r)[0]) for r in records]
    n_long = sum(n > seq_len for n in lengths)
    assert 0 < n_long < len(records)
    data = sft(tmp_path, [write_convs(tmp_path / "c.jsonl", records)], tok, seq_len=seq_len,
               overlong=policy)
    st = data.stats
    assert st.conversations == len(records)
    assert st.domains == {"math": sum(r["domain"] == "math" for r in records),
                          "code": sum(r["domain"] == "code" for r in records)}
    if policy == "drop":
        assert (st.dropped_overlong, st.truncated) == (n_long, 0)
        assert st.tokens == sum(n for n in lengths if n <= seq_len)
    else:
        assert st.dropped_overlong == 0 and st.truncated + st.dropped_untrainable == n_long
        assert st.tokens + sum(min(n, seq_len) for n, r in zip(lengths, records)
                               if n > seq_len and not any(encode(tok, r)[1][:seq_len])) \
            == sum(min(n, seq_len) for n in lengths)
    rows = [next(data.train) for _ in range(5)]
    assert all(r["input_ids"].shape == (4, seq_len) for r in rows)


@pytest.mark.parametrize("line,match", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"c\.jsonl:3: malformed JSON"),
    ('{"conversation": []}', r"c\.jsonl:3: missing 'messages' field"),
    ('{"messages": [{"role": "user", "content": "hi"}], "thinking_mode": "deep"}',
     r"c\.jsonl:3: thinking_mode='deep'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"c\.jsonl:3: .*role"),
])
def test_bad_records_named_with_file_and_line(tmp_path, tok, records, line, match):
    path = write_convs(tmp_path / "c.jsonl", records[:2])
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=match):
        sft(tmp_path, [path], tok)
    assert not (tmp_path / "cache" / "tokens").exists() or \
        not any((tmp_path / "cache" / "tokens").iterdir())


def test_resume_and_rank_split(tmp_path, tok, records):
    paths = [write_convs(tmp_path / "a.jsonl", records[:40]),
             write_convs(tmp_path / "b.jsonl", records[40:])]
    loader = sft(tmp_path, paths, tok).train
    ref = [next(loader) for _ in range(8)]
    first = sft(tmp_path, paths, tok).train
    for _ in range(3):
        next(first)
    resumed = sft(tmp_path, paths, tok).train
    resumed.load_state_dict(first.state_dict())
    for want in ref[3:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = SFTConfig(sources=[SourceConfig(str(p)) for p in paths],
                    cache_dir=str(tmp_path / "cache"), progress=False)
    parts = [build_sft_data(cfg, tok, seq_len=96, micro_batch=2, dp_rank=r, dp_world=2,
                            seed=1).train for r in range(2)]
    got = [next(p) for p in parts]
    assert torch.equal(torch.cat([g["input_ids"] for g in got]), ref[0]["input_ids"])


def test_stats_match_packed_targets_with_holdout(tmp_path, tok, records):
    """With a held-out split the training conversations are a scattered subset of the shard:
    the counted targets must still be exactly what one epoch of packed windows trains on."""
    data = sft(tmp_path, [write_convs(tmp_path / "c.jsonl", records)], tok, seq_len=64,
               micro_batch=1, val_fraction=0.3, prefetch=0)
    st = data.stats
    assert 0 < st.conversations < len(records)
    (stream,) = data.train.streams
    n_targets = sum(int((next(data.train)["labels"] != IGNORE).sum())
                    for _ in range(stream.n_windows))
    assert n_targets == st.target_tokens > 0
    val_rows = [r for b in data.val for r in b["input_ids"]]
    assert val_rows and all(r.shape == (64,) for r in val_rows)
