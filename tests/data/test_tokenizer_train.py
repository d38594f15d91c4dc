"""The trained tokenizer: reserved special ids, transformers compatibility, exact round trip."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from data.tokenizer_train import (check_model_compat, raw_text_encoder, special_ids,
                                  tokenizer_fingerprint, train_tokenizer)
from encoding.special_tokens import BOS, EOS, SPECIAL_TOKENS, USER
from model.config import get_config
from tests.data._util import make_docs


def test_special_tokens_reserved_first(tok_path, tok):
    raw = json.loads(tok_path.read_text())
    added = {t["content"]: t["id"] for t in raw["added_tokens"]}
    assert [added[s] for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert special_ids(tok) == (0, 1)
    assert 300 < len(tok) <= 512  # BPE stops early when no pair repeats enough


def test_loads_with_plain_transformers(tok_path):
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    assert hf.convert_tokens_to_ids(BOS) == 0 and hf.convert_tokens_to_ids(EOS) == 1
    # the saved tokenizer_config.json lets from_pretrained know BOS/EOS/pad
    hf2 = PreTrainedTokenizerFast.from_pretrained(str(tok_path.parent))
    assert (hf2.bos_token_id, hf2.eos_token_id, hf2.pad_token_id) == (0, 1, 1)


@pytest.mark.parametrize("text", ["plain ascii", "  leading spaces\n\ttabs\r\n", "naïve 数据 🙂",
                                  "\x00\x7f odd bytes \u2028", "x" * 300])
def test_byte_level_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_strings_are_single_tokens_in_chat_but_text_in_raw_corpus(tok):
    s = f"{USER}hello{EOS}"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(USER) and ids[-1] == 1
    raw = raw_text_encoder(tok).encode(s, add_special_tokens=False).ids
    assert 1 not in raw and tok.convert_tokens_to_ids(USER) not in raw  # no injected EOS
    assert tok.decode(raw) == s


def test_too_small_vocab_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], 100, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_existing_directory_is_refused_before_training(tmp_path):
    """The atomic rename cannot replace a non-empty directory; training into one used to keep
    the old contents silently. Now it is refused up front and the user's files stay."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        train_tokenizer(make_docs(20, seed=1), 400, out)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "tokenizer.json").exists()


def test_fingerprint_tracks_content(tmp_path, tok):
    other = train_tokenizer(make_docs(50, seed=9), 400, tmp_path / "t2")
    from encoding.tokenizer import load_tokenizer

    assert tokenizer_fingerprint(load_tokenizer(str(other))) != tokenizer_fingerprint(tok)


def test_model_compat_checks(tok, tmp_path):
    tiny = get_config("tiny")
    check_model_compat(tok, 512, tiny)  # fits
    with pytest.raises(ValueError, match=r"seq_len=8192 exceeds the model's max_seq_len=4096"):
        check_model_compat(tok, 8192, tiny)
    with pytest.raises(ValueError, match=rf"has {len(tok)} tokens but the model's vocab_size=300"):
        check_model_compat(tok, 128, tiny.replace(vocab_size=300))
    with pytest.raises(ValueError, match="bos_token_id=5"):
        check_model_compat(tok, 128, tiny.replace(bos_token_id=5))


def test_a_number_is_the_same_digit_tokens_in_any_context(tok):
    """Digits are one per token, so copying a number (question -> tool call -> answer) copies
    tokens: BPE without the split merges digits by frequency and by the character before them."""
    def digits(text: str) -> list[str]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [tok.convert_ids_to_tokens(i) for i in ids]
        return [p for p in pieces if any(c.isdigit() for c in p)]

    for text in ("What is 2023 + 1?", ">2023</", "x=2023", "2023"):
        assert digits(text) == ["2", "0", "2", "3", *(["1"] if "+" in text else [])], text
