"""Shared fixtures: a micro DeepSeek-V4 (every layer kind, sparse top-k smaller than the number of
compressed entries within a few dozen tokens) and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, get_config
from model.transformer import Transformer
from tests.helpers.fixtures import one_thread, train_bpe  # noqa: F401 (autouse fixture)


def micro_config(**changes) -> ModelConfig:
    """Layers SWA, CSA (ratio 4), HCA (ratio 8), CSA; MTP is SWA. Window 8, index top-4."""
    base = dict(vocab_size=512, dim=64, n_heads=2, head_dim=32, rope_head_dim=8, q_lora_rank=32,
                o_groups=2, o_lora_rank=32, window_size=8, compress_ratios=(0, 4, 8, 4, 0),
                index_n_heads=8, index_head_dim=16, index_topk=4, n_routed_experts=4,
                n_activated_experts=2, moe_inter_dim=64, original_seq_len=256,
                max_seq_len=1024)
    base.update(changes)
    return get_config("tiny").replace(**base)


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights, with the zero-initialised sinks, `ape` and mHC biases perturbed so that
    every term of the forward matters."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ape", "attn_sink")) or ("hc_" in name and "base" in name):
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="session")
def micro_cfg() -> ModelConfig:
    return micro_config()


@pytest.fixture(scope="session")
def micro_model(micro_cfg) -> Transformer:
    return build_model(micro_cfg)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """tokenizer.json: byte-level BPE, DSV4 special tokens first (BOS 0, EOS 1), < 512 ids."""
    words = ("the a cat dog sat on mat and then ran far away hello world user assistant think "
             "reason answer question one two three").split()
    import random
    rng = random.Random(0)
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(text, 400, path)
    return path
