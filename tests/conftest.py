"""Fixtures every test package may use."""

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for every real-launcher run of the session: the default corpus, its
    tokenizer and token shards are built once (the cache is content-keyed, so runs with the same
    data settings reuse it and runs with other settings get their own entries)."""
    return tmp_path_factory.mktemp("v4cache")
