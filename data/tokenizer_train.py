"""Training the default byte-level BPE tokenizer, and the checks every tokenizer must pass
before data built with it reaches a model.

Byte-level BPE with no normaliser decodes every byte sequence back exactly, which is what makes
the packing round-trip test meaningful. Digits are split one per token before BPE (as LLaMA and
DeepSeek-LLM do; V3/V4's released tokenizer groups up to three): plain BPE merges digits by
frequency, so `23` is one token after `>` but `Ġ2`,`3` after a space, and copying a number from
a question into a tool call or from a tool result into the answer (the calculator domain) would
be a different token sequence each time. One digit per token makes every copy an exact copy. The DeepSeek-V4 special strings are reserved first, in
`SPECIAL_TOKENS` order, so BOS is id 0 and EOS id 1 as in the released tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from data.cache import atomic_directory
from data.config import DataError
from encoding.special_tokens import BOS, EOS, SPECIAL_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from model.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"
# part of the default tokenizer's cache key: bump it when the training recipe changes
TOKENIZER_RECIPE = "bytelevel-digits1"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                    min_frequency: int = 2, show_progress: bool = False) -> Path:
    """Trains byte-level BPE on `texts` and writes `out_dir/tokenizer.json` (plus a
    `tokenizer_config.json` so `PreTrainedTokenizerFast.from_pretrained(out_dir)` knows BOS/EOS)
    atomically. Returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise DataError(f"vocab_size={vocab_size}: must be at least {n_min} (256 byte tokens "
                         f"plus {len(SPECIAL_TOKENS)} special tokens)")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (existing := sorted(p.name for p in out_dir.iterdir())):
        # the atomic rename cannot replace a non-empty directory: refuse before training rather
        # than train and then keep whatever was there (nothing of the user's is ever deleted)
        raise FileExistsError(f"{out_dir}: tokenizer output directory is not empty "
                              f"({', '.join(existing[:5])}); choose a new directory or remove it")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):  # the contract every consumer relies on
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": EOS, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    with atomic_directory(out_dir) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir / TOKENIZER_FILE


def resolve_tokenizer(tokenizer: "PreTrainedTokenizerFast | str | os.PathLike"
                      ) -> "PreTrainedTokenizerFast":
    """A loaded tokenizer is returned as is; a path (tokenizer.json or its directory) is loaded
    through the encoding bridge, which registers the special tokens."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from encoding.tokenizer import load_tokenizer

        path = Path(tokenizer)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return load_tokenizer(path)
    return tokenizer


def tokenizer_fingerprint(tokenizer: "PreTrainedTokenizerFast") -> str:
    """Digest of the full serialised tokenizer: any change to vocab, merges or special tokens
    gives a new token cache."""
    blob = tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def raw_text_encoder(tokenizer: "PreTrainedTokenizerFast"):
    """A copy of the backend tokenizer that encodes special strings found in raw text as ordinary
    text: a web page that literally contains `<｜end▁of▁sentence｜>` must not inject an EOS into
    pretraining data. Only the packer places BOS/EOS."""
    from tokenizers import Tokenizer

    enc = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    enc.encode_special_tokens = True
    enc.no_padding()
    enc.no_truncation()
    return enc


def special_ids(tokenizer: "PreTrainedTokenizerFast") -> tuple[int, int]:
    """(bos_id, eos_id) read from the tokenizer, never assumed."""
    bos, eos = (tokenizer.convert_tokens_to_ids(s) for s in (BOS, EOS))
    unk = tokenizer.unk_token_id
    for name, s, i in (("BOS", BOS, bos), ("EOS", EOS, eos)):
        if i is None or (unk is not None and i == unk):
            raise DataError(f"tokenizer has no {name} token {s!r}")
    return int(bos), int(eos)


def check_model_compat(tokenizer: "PreTrainedTokenizerFast", seq_len: int,
                       model_cfg: "ModelConfig | None") -> None:
    """Raises before any tokenising or training if the data cannot feed this model."""
    if int(seq_len) <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    if model_cfg is None:
        return
    n_vocab = len(tokenizer)
    if n_vocab > model_cfg.vocab_size:
        raise DataError(f"tokenizer vocabulary has {n_vocab} tokens but the model's "
                         f"vocab_size={model_cfg.vocab_size}: ids would index past the embedding")
    if seq_len > model_cfg.max_seq_len:
        raise DataError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")
    bos, eos = special_ids(tokenizer)
    if (bos, eos) != (model_cfg.bos_token_id, model_cfg.eos_token_id):
        raise DataError(f"tokenizer BOS/EOS ids are ({bos}, {eos}) but the model config has "
                         f"bos_token_id={model_cfg.bos_token_id}, "
                         f"eos_token_id={model_cfg.eos_token_id}")
