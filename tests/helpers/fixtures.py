"""Fixtures and small builders shared by several test packages."""

from __future__ import annotations

from typing import Iterable

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: one intra-op thread is faster than fighting over two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_bpe(texts: Iterable[str], vocab_size: int, path) -> str:
    """A byte-level BPE tokenizer.json with the DSV4 special tokens first (BOS 0, EOS 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from encoding.special_tokens import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def finish_step_dir(step) -> None:
    """Writes the `manifest.json` a trainer writes last into a hand-made training checkpoint
    `step_N/` (weights under `model/`), so inference tools take it as finished."""
    import json
    from pathlib import Path

    step = Path(step)
    files = {str(p.relative_to(step)): p.stat().st_size for p in sorted(step.rglob("*"))
             if p.is_file()}
    (step / "manifest.json").write_text(json.dumps({"step": 0, "files": files}))
