"""Fixtures: a small byte-level BPE tokenizer trained once per session, with the DeepSeek-V4
special tokens reserved (BOS 0, EOS 1), and a per-test cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.tokenizer_train import train_tokenizer
from encoding.tokenizer import load_tokenizer
from tests.data._util import make_docs


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_tokenizer(make_docs(300, seed=123), 512, out)


@pytest.fixture(scope="session")
def tok(tok_path):
    return load_tokenizer(str(tok_path))


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"
