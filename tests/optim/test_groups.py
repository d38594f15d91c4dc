"""G-M4: every parameter lands in exactly one optimizer group, and AdamW gets exactly the
documented set (embedding, head, RMSNorm weights, mHC base/scale, 1-D tensors, compressor `ape`).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import optim
from model.config import get_config
from optim.groups import ADAMW, MUON, assign
from tests.optim.toy import ADAMW_MATRIX_SUFFIXES, ToyNet, expected_adamw, v4_tree


def check_routing(model: nn.Module, cfg) -> list[dict]:
    groups = optim.param_groups(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    muon = groups[0]["param_names"] if groups[0]["use_muon"] else []
    adamw = [n for g in groups if not g["use_muon"] for n in g["param_names"]]
    assert len(muon) + len(adamw) == len(names)               # nobody twice ...
    assert set(muon) | set(adamw) == names                     # ... nobody missing
    assert not set(muon) & set(adamw)
    assert set(adamw) == expected_adamw(cfg)                   # exactly the documented set
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    for n in adamw:
        assert len(shapes[n]) < 2 or n.endswith(ADAMW_MATRIX_SUFFIXES), n
    for n in muon:
        assert len(shapes[n]) >= 2, n
    return groups


@pytest.mark.parametrize("preset", ["tiny", "flash"])
def test_hand_built_v4_tree(preset):
    cfg = get_config(preset)
    with torch.device("meta"):
        model = v4_tree(cfg)
    groups = check_routing(model, cfg)
    muon = dict(zip(groups[0]["param_names"], groups[0]["row_blocks"]))
    assert muon["layers.0.attn.wo_a.weight"] == cfg.o_groups
    assert muon["layers.0.ffn.experts.w1"] == 1 and "layers.0.ffn.gate.weight" in muon
    assert "layers.0.hc_attn_fn" in muon and "mtp.0.e_proj.weight" in muon


def test_real_flash_model():
    from model.transformer import Transformer

    cfg = get_config("flash")
    with torch.device("meta"):
        model = Transformer(cfg)
    groups = check_routing(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    assert sum(optim.groups.logical_shape(p).numel() for g in groups for p in g["params"]) == total
    opt = optim.build_optimizer(model, lr=2.7e-4)   # meta tensors: construction only
    assert len(opt.ownership()) == len(groups[0]["params"])


def test_unknown_and_conflicting_parameters_fail_loudly():
    with pytest.raises(ValueError, match=r"'layers.0.attn.mystery.weight' \(4, 4\) matches no"):
        assign("layers.0.attn.mystery.weight", torch.Size([4, 4]))
    # a 1-D tensor named like a Muon matrix hits the 1-D AdamW rule: no silent pick
    with pytest.raises(ValueError, match="matches rules of both groups"):
        assign("layers.0.attn.wq_a.weight", torch.Size([16]))
    model = nn.Module()
    model.embed = nn.Embedding(4, 4)
    model.proj = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="'proj.weight'"):
        optim.param_groups(model)
    # a tensor shared under two names must agree on its group
    tied = nn.Module()
    tied.embed = nn.Embedding(4, 4)
    tied.attn = nn.Module()
    tied.attn.wq_a = nn.Linear(4, 4, bias=False)
    tied.attn.wq_a.weight = tied.embed.weight
    with pytest.raises(ValueError, match="same tensor"):
        optim.param_groups(tied)


def test_overrides_frozen_and_row_splits():
    cfg = get_config("tiny")
    with torch.device("meta"):
        model = v4_tree(cfg)
    model.layers[0].attn.wq_a.weight.requires_grad_(False)
    groups = optim.param_groups(model, overrides={r"hc_\w+_fn$": ADAMW})   # PaddleFormers-style
    adamw = {n for g in groups if not g["use_muon"] for n in g["param_names"]}
    muon = set(groups[0]["param_names"])
    assert "layers.0.hc_attn_fn" in adamw and "hc_head_fn" in adamw
    assert "layers.0.attn.wq_a.weight" not in muon | adamw
    with pytest.raises(ValueError, match="sends a 1-D tensor to Muon"):
        optim.param_groups(model, overrides={"attn_sink": MUON})
    del model.cfg
    with pytest.raises(ValueError, match=r"wo_a.weight.*needs model_config.o_groups"):
        optim.param_groups(model)
    groups = optim.param_groups(model, row_splits={})
    assert set(groups[0]["row_blocks"]) == {1}


def test_startup_log_line(caplog):
    model = ToyNet()
    with caplog.at_level(logging.INFO, logger="v4lab.optim"):
        optim.build_optimizer(model, lr=1e-3)
    n_muon = sum(p.numel() for n, p in model.named_parameters()
                 if n.split(".")[-1] in ("w1", "w2") or n.startswith("attn.w"))
    n_adamw = sum(p.numel() for p in model.parameters()) - n_muon
    assert f"Muon: {n_muon:,} parameters in 5 tensors" in caplog.text
    assert f"AdamW: {n_adamw:,} parameters in 4 tensors" in caplog.text
