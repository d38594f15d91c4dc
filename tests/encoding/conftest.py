"""Fixtures: the optional official conformance folder and a tiny trained tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoding.tokenizer import load_tokenizer
from tests.encoding._support import conformance_root, train_tokenizer_json


@pytest.fixture(scope="session")
def conformance_encoding_dir() -> Path:
    folder = conformance_root() / "encoding"
    if not folder.is_dir():
        pytest.skip(
            f"official conformance data not found at {folder} "
            "(set V4_CONFORMANCE_DIR to the folder that holds encoding/)"
        )
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer_json(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir / "tokenizer.json"))
