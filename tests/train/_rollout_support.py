"""Shared pieces of the rollout and evaluation tests: a small tokenizer trained on domain text, a
scripted "perfect policy" standing in for `model.generation.generate`, and a model stub.

The oracle makes the multi-turn path testable without a trained model: for each prompt it finds
the reference transcript (prompt + `item.reference_completion()`, tokenised as one string) that
extends it and emits its next tokens up to and including the next EOS, exactly as a model that
had learnt the domain would. Tool results are NOT emitted by it: the rollout must insert them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from data.domains import get_domain
from encoding.tokenizer import load_tokenizer
from model.generation import GenerationOutput
from tests.helpers.fixtures import finish_step_dir, train_bpe

TEXT_DOMAINS = [("strings", {}), ("arith", {}), ("countdown", {}),
                ("calculator", {"schema": "brief"}), ("calculator", {})]


def train_tokenizer(path) -> str:
    """Byte-level BPE (DSV4 specials first: BOS 0, EOS 1, < 512 ids) on reference transcripts."""
    text = []
    for name, options in TEXT_DOMAINS:
        domain = get_domain(name, **options)
        text += [item.prompt_text() + item.reference_completion()
                 for item in domain.generate("train", 30, seed=7)]
    return train_bpe(text, 480, path)


@pytest.fixture(scope="session")
def domain_tokenizer_file(tmp_path_factory) -> str:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def domain_tokenizer(domain_tokenizer_file):
    return load_tokenizer(domain_tokenizer_file)


def micro_checkpoint(root, tokenizer_file, seed: int = 0, max_seq_len: int = 256):
    """A random micro model saved as `root/checkpoints/step_00000001` with the domain tokenizer:
    the `init_from` of the SFT, GRPO and distillation end-to-end tests (another `seed`: another
    model of the same shapes, e.g. a distillation teacher)."""
    from model.weights import save_pretrained
    from tests.inference.conftest import build_model, micro_config

    step = root / "checkpoints" / "step_00000001"
    save_pretrained(build_model(micro_config(vocab_size=512, max_seq_len=max_seq_len), seed), step / "model",
                    tokenizer_file)
    finish_step_dir(step)
    return step


def stub_model(max_seq_len: int = 4096):
    """What `rollout` reads from a model when `generate_fn` is scripted: `cfg.max_seq_len`."""
    return SimpleNamespace(cfg=SimpleNamespace(max_seq_len=max_seq_len))


def scripted_logprob(position: int) -> float:
    """The oracle's fake log-prob of its `position`-th token of a call (distinct, negative)."""
    return -0.01 * (position + 1)


class Oracle:
    """A scripted `generate`: continues each prompt along its reference transcript (module
    docstring). Records the keyword arguments of every call."""

    def __init__(self, tokenizer, items):
        self.refs = [tokenizer.encode(item.prompt_text() + item.reference_completion(),
                                      add_special_tokens=False) for item in items]
        self.calls: list[dict] = []

    def __call__(self, model, prompts, max_new_tokens=256, eos_id=None, **kw):
        self.calls.append({"rows": len(prompts), "max_new_tokens": max_new_tokens, **kw})
        tokens, reasons, logprobs = [], [], []
        for p in prompts:
            p = list(p)
            ref = next((r for r in self.refs if r[:len(p)] == p), None)
            if ref is None:
                raise AssertionError(f"the rollout fed a prompt no reference extends: {p}")
            rest = ref[len(p):]
            end = rest.index(eos_id) + 1
            out = rest[:min(end, max_new_tokens)]
            tokens.append(out)
            reasons.append("eos" if len(out) == end else "length")
            logprobs.append(torch.tensor([scripted_logprob(i) for i in range(len(out))]))
        return GenerationOutput(tokens, reasons, logprobs=logprobs,
                                raw_logprobs=[2 * lp for lp in logprobs])
