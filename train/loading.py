"""Load a model and its tokenizer from `ckpt=PATH`, checked against each other.

One loader for every tool that reads a checkpoint for inference (`generate.py`, the evaluation
harness `train/evaluate.py`): PATH is a weights directory (config.json + *.safetensors:
`save_pretrained`, an export, a release) or a training checkpoint `runs/x/checkpoints/step_N`,
whose `model/` is used. It lives in `train/` because it needs both `model/` (weights) and
`encoding/` (tokenizer), and `model/` may not import `encoding/`.

Every problem is a FileNotFoundError / ValueError naming the file or value: a missing path, a
directory without config.json, no tokenizer.json, a tokenizer larger than the model's vocabulary.
"""

from __future__ import annotations

import os
from typing import Any


def checkpoint_dir(path: str) -> str:
    """The weights directory of `ckpt=` (`model.weights.resolve_weights_dir`: the path itself,
    or a training checkpoint step_N's `model/`), shared with training's `init_from=`. A training
    checkpoint must be finished: not a `step_N.tmp` folder (a save in progress, or one a crash
    cut short) and with its `manifest.json`, which the trainer writes last."""
    import re
    from pathlib import Path

    from model.weights import resolve_weights_dir

    p = Path(path)
    if re.fullmatch(r"step_\d+\.tmp", p.name):
        raise ValueError(f"{p}: an unfinished save (step_N.tmp becomes step_N only once "
                         f"complete); give a finished checkpoint from {p.parent}")
    weights = resolve_weights_dir(path)
    if weights != p and not (p / "manifest.json").is_file():
        raise ValueError(f"{p}: no manifest.json, so this training checkpoint may be incomplete "
                         f"(the trainer writes it last); give a finished checkpoint, or "
                         f"ckpt={weights} to read these weights as they are")
    return str(weights)


def check_vocab(tokenizer: Any, vocab_size: int, source: str) -> None:
    """The tokenizer's ids (EOS included) must all be rows of the model's embedding."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer/model vocab mismatch: {source} has {len(tokenizer)} tokens, "
                         f"the model's embedding has {vocab_size} rows")
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id >= vocab_size:
        raise ValueError(f"{source}: EOS token id {tokenizer.eos_token_id} is not in the model "
                         f"vocabulary ({vocab_size})")


def resolve_device(device: str | None) -> str:
    """`None`/"auto" -> cuda when available, else cpu; anything else is passed through."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str | None):
    """"bfloat16" / "float32" / ... -> the torch dtype; None keeps the stored dtype."""
    import torch

    if not name:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r}: not a torch dtype")
    return dtype


def tokenizer_path(ckpt: str, tokenizer: str | None = None) -> str:
    """Where the tokenizer is: `tokenizer` if given, else the checkpoint's tokenizer.json."""
    path = tokenizer or os.path.join(checkpoint_dir(ckpt), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path} (pass tokenizer=PATH)")
    return path


def load_model_and_tokenizer(ckpt: str, tokenizer: str | None = None, device: str | None = None,
                             dtype: str | None = None, csa_mode: str | None = None):
    """(model in eval mode, tokenizer) from `ckpt`; see the module docstring for PATH.

    The path, tokenizer file and dtype are checked before the weights are read."""
    from encoding.tokenizer import load_tokenizer
    from model.weights import load_pretrained

    weights = checkpoint_dir(ckpt)
    tok_path = tokenizer_path(ckpt, tokenizer)
    torch_dtype = resolve_dtype(dtype)
    tok = load_tokenizer(tok_path)
    model = load_pretrained(weights, device=resolve_device(device), dtype=torch_dtype).eval()
    if csa_mode:
        model.set_csa_mode(csa_mode)
    check_vocab(tok, model.cfg.vocab_size, tok_path)
    return model, tok
