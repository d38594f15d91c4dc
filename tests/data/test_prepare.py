"""The default offline corpus (stdlib sources), its path-hash split, the default tokenizer, and
the `python -m data.prepare` entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.config import DataConfig
from data.prepare import build_stdlib_corpus, ensure_default_assets, is_val_path
from data.pretrain import build_pretrain_data
from encoding.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def fake_stdlib(root: Path, n: int = 200) -> Path:
    for i in range(n):
        p = root / f"pkg{i % 7}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f'"""Module {i} docstring."""\n\ndef f{i}(x):\n    return x + {i}\n')
    for skipped in ("site-packages/x.py", "test/test_x.py", "__pycache__/y.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("SKIPPED = True\n")
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    return root


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_by_stable_path_hash(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    corpus = build_stdlib_corpus(tmp_path / "c1", root=root, val_fraction=0.1)
    train, val = read(corpus / "train.jsonl"), read(corpus / "val.jsonl")
    paths = [r["path"] for r in train + val]
    assert sorted(paths) == sorted(f"pkg{i % 7}/mod{i}.py" for i in range(200))
    assert all(is_val_path(r["path"], 0.1) for r in val)
    assert not any(is_val_path(r["path"], 0.1) for r in train)
    assert 5 <= len(val) <= 40
    assert train[0]["text"].startswith('"""Module')
    # the split depends on the path only: edited contents, another cache, same sides
    for r in val:
        (root / r["path"]).write_text("# edited\n")
    again = build_stdlib_corpus(tmp_path / "c2", root=root, val_fraction=0.1)
    assert [r["path"] for r in read(again / "val.jsonl")] == [r["path"] for r in val]


def test_real_stdlib_assets_and_reuse(tmp_path):
    assets = ensure_default_assets(tmp_path, vocab_size=600, max_files=40)
    assert assets.train.is_file() and assets.val.is_file() and assets.tokenizer.is_file()
    n_train, n_val = len(read(assets.train)), len(read(assets.val))
    assert n_train + n_val == 40 and n_val >= 1
    tok = load_tokenizer(str(assets.tokenizer))
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 600)
    stamp = assets.tokenizer.stat().st_mtime_ns
    assert ensure_default_assets(tmp_path, vocab_size=600, max_files=40) == assets
    assert assets.tokenizer.stat().st_mtime_ns == stamp  # reused, not retrained


def test_default_config_builds_everything_offline(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), vocab_size=600, default_max_files=40,
                     progress=False)
    data = build_pretrain_data(cfg, seq_len=128, micro_batch=2)
    batch = next(data.train)
    assert batch["input_ids"].shape == (2, 128) and (batch["positions"][:, 0] == 0).all()
    assert data.val is not None and 2.0 < data.bytes_per_token < 8.0  # code: a few bytes/token
    corpus = [r["text"] for r in read(next((tmp_path / "corpus").iterdir()) / "train.jsonl")]
    for row in batch["input_ids"]:  # each window decodes back to stdlib source text
        for piece in data.tokenizer.decode(row).split("<｜begin▁of▁sentence｜>"):
            piece = piece.replace("<｜end▁of▁sentence｜>", "")
            assert any(piece in doc for doc in corpus), piece[:80]


@pytest.mark.slow
def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "data.prepare", "--cache-dir", str(tmp_path),
           "--vocab-size", "500", "--max-files", "30"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert Path(lines["tokenizer"].strip()).is_file()
    assert out.stdout.count("shard:") == 2 and "bytes/token" in out.stdout
    assert len(list((tmp_path / "tokens").iterdir())) == 2
