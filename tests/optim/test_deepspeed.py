"""MuonAdamW as DeepSpeed's client optimizer (CPU accelerator, 2 gloo ranks).

Checks the support decision in `optim.zero`: ZeRO stage 0 gives the same weights as plain
PyTorch (full batch, same gradient clipping) with the batch split over 2 ranks and 2-step
gradient accumulation, and Newton-Schulz runs once per optimizer step, split across the ranks;
bf16 at stage 0 (DeepSpeed's unfused wrapper) works and does not count its zero-gradient
state-allocation step; stage 1 is refused at the first step.

DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes on a
cold cache); the ranks disable it (`build_shm_op → None`), as gloo does the communication anyway.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import optim
from tests.helpers.distributed import run_distributed
from tests.optim.toy import ToyNet, toy_batch

pytest.importorskip("deepspeed")

STEPS, GAS, WORLD = 3, 2, 2   # 8 sequences per step = 2 ranks × 2 accumulation × 2 per micro-batch
CLIP = 1.0                    # DeepSpeed clips the reduced gradient before our step; so does the
                              # reference (the global norm here is ~5, so clipping is active)


def _engine(model, opt, stage, bf16=False):
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GAS,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True, "gradient_clipping": CLIP}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _train(engine, rank, world):
    for step in range(STEPS):
        for mb in toy_batch(8, seed=step)[rank::world].chunk(GAS):
            logits = engine(mb[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten())
            engine.backward(loss)
            engine.step()


def _rank_fn(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"
    # importlib, not `import deepspeed.comm.torch as m`: the package re-exports the `torch`
    # library under that attribute name, so the `as` form would bind (and patch) torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    out = {}
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    _train(_engine(model, opt, stage=0), rank, world)
    out["fp32"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    out["ns_fp32"] = opt.ns_matrices

    model = ToyNet().to(torch.bfloat16)
    opt = optim.build_optimizer(model, lr=1e-2)
    _train(_engine(model, opt, stage=0, bf16=True), rank, world)
    out["ns_bf16"] = opt.ns_matrices
    out["adamw_steps_bf16"] = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
    out["bf16"] = {n: p.detach().float().numpy() for n, p in model.named_parameters()}

    model = ToyNet()
    try:
        _train(_engine(model, optim.build_optimizer(model, lr=1e-2), stage=1), rank, world)
        out["stage1"] = "trained"
    except RuntimeError as e:
        out["stage1"] = str(e)
    return out


def _reference():
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    for step in range(STEPS):
        model.loss(toy_batch(8, seed=step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}, opt.ns_matrices


@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_deepspeed_client_optimizer_stage0():
    r0, r1 = run_distributed(_rank_fn, WORLD, timeout=200)
    ref, ref_ns = _reference()
    for n, w in ref.items():
        ours = torch.from_numpy(r0["fp32"][n])
        assert float((ours - w).abs().max() / w.abs().max()) < 1e-5, n
        assert (r0["fp32"][n] == r1["fp32"][n]).all(), n
        # bf16 weights: same trajectory within bf16 rounding
        assert float((torch.from_numpy(r0["bf16"][n]) - w).abs().max() / w.abs().max()) < 3e-2, n
    # once per optimizer step (not per micro-batch), split across the ranks
    assert r0["ns_fp32"] + r1["ns_fp32"] == ref_ns == STEPS * 10
    assert 0 < r0["ns_fp32"] < ref_ns
    assert r0["ns_bf16"] + r1["ns_bf16"] == ref_ns
    assert r0["adamw_steps_bf16"] == [STEPS]
    assert "ZeRO stage 0" in r0["stage1"] and "ZeRO stage 0" in r1["stage1"]
