"""MuonAdamW as one optimizer: update size, weight decay, the AdamW half, gradient accumulation
(G-M5), checkpoints, LR schedulers, and the guard against flattened parameters."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import optim
from optim import MuonAdamW, newton_schulz
from tests.optim.toy import ToyNet, toy_batch


def test_update_rms_and_weight_decay():
    """W ← W·(1 − ηλ) − η·γ·sqrt(max(n, m))·NS(G + μM): RMS(ΔW)/η ≈ γ = 0.18 per logical block."""
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(64, 128, generator=g))
    blocked = torch.nn.Parameter(torch.randn(2 * 32, 48, generator=g))   # 2 blocks of 32 × 48
    experts = torch.nn.Parameter(torch.randn(3, 40, 24, generator=g))
    params = [plain, blocked, experts]
    w0 = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=g) * s for p, s in zip(params, (1.0, 1e-3, 50.0))]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    lr, wd = 1e-2, 5.0   # a 5 % decay per step, so an error in the decay term shows
    opt = MuonAdamW([{"params": params, "use_muon": True, "row_blocks": [1, 2, 1]}], lr=lr,
                    weight_decay=wd)
    opt.step()
    for p, w, gr, k in zip(params, w0, grads, (1, 2, 1)):
        blocks = gr.reshape(-1, gr.shape[-2] // k, gr.shape[-1])
        n, m = blocks.shape[-2:]
        # first step: M = G, Nesterov input G + μG
        expected = w * (1 - lr * wd) - lr * 0.18 * max(n, m) ** 0.5 * \
            newton_schulz(blocks * 1.95, dtype=torch.float32).reshape(p.shape)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        upd = (p.detach() - w * (1 - lr * wd)).reshape(blocks.shape)
        rms = upd.pow(2).mean(dim=(-2, -1)).sqrt() / lr
        torch.testing.assert_close(rms, torch.full_like(rms, 0.18), rtol=1e-2, atol=0)


def test_adamw_half_matches_torch_adamw():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(7, 5, generator=g)
    grads = [torch.randn(7, 5, generator=g) for _ in range(4)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [ours], "use_muon": False}], lr=1e-2, weight_decay=0.1,
                    betas=(0.9, 0.95), eps=1e-8)
    topt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for gr in grads:
        ours.grad, ref.grad = gr.clone(), gr.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    # V4's eps = 1e-20 and an all-zero gradient (next to a real one): zero update, no NaN
    z, w = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    z.grad, w.grad = torch.zeros(3), torch.ones(3)
    MuonAdamW([{"params": [z, w], "use_muon": False}], lr=1.0, weight_decay=0.0).step()
    # z: m = 0 so the update is 0 / (0 + eps) = 0 exactly, on any machine.
    assert torch.equal(z.detach(), torch.ones(3))
    # w: the bias-corrected update is 1 in exact arithmetic, but it goes through a handful of fp32
    # roundings (1 - beta^t, the division, the square root), each within half an ulp of 1, so
    # 1 - update lands within a few machine epsilons of 0 (1.19e-7 was seen on one CPU).
    fp32_eps = torch.finfo(torch.float32).eps
    assert w.detach().abs().max().item() <= 8 * fp32_eps


def test_zero_gradient_first_step_only_creates_state():
    """DeepSpeed's bf16/fp16 wrappers call step() once with zero gradients to allocate state;
    that must not decay weights or advance AdamW's counter."""
    a, b = ToyNet(), ToyNet()
    oa, ob = optim.build_optimizer(a, lr=1e-2), optim.build_optimizer(b, lr=1e-2)
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    oa.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(oa.state) == 9 and oa.ns_matrices == 0
    assert all(int(s["step"]) == 0 for s in oa.state.values() if "step" in s)
    for model, opt in ((a, oa), (b, ob)):
        opt.zero_grad()
        model.loss(toy_batch(4)).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # after a real step, an all-zero gradient is a real step again (momentum carries on)
    before = a.attn.wq_a.weight.detach().clone()
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    oa.step()
    assert oa.ns_matrices == 20 and not torch.equal(a.attn.wq_a.weight, before)


def _train(model, opt, micro_batches, steps=3):
    for step in range(steps):
        batch = toy_batch(8, seed=step)
        for mb in batch.chunk(micro_batches):
            (model.loss(mb) / micro_batches).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_gradient_accumulation_invariance():
    """G-M5: 1 micro-batch of 8 vs 4 of 2 → same weights after 3 steps, NS once per step."""
    a, b = ToyNet(), ToyNet()
    oa, ob = optim.build_optimizer(a, lr=1e-2), optim.build_optimizer(b, lr=1e-2)
    _train(a, oa, 1)
    _train(b, ob, 4)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        rel = (pa - pb).norm() / pa.norm()
        assert rel < 1e-5, (n, float(rel))
        assert not torch.equal(pa, ToyNet().state_dict()[n]), f"{n} never moved"
    # matrices: wq_a 1, wo_a 2 blocks, wo_b 1, experts w1/w2 3 each = 10 per step
    assert oa.ns_matrices == ob.ns_matrices == 3 * 10


def test_state_dict_resume_is_exact():
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    sched = optim.make_scheduler(opt, optim.LRSchedule(total_steps=6, warmup_steps=2,
                                                      decay_steps=3))
    _train(model, opt, 2, steps=3)
    for _ in range(3):
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    ckpt_model = copy.deepcopy(model.state_dict())
    _train(model, opt, 2, steps=2)   # the run that never stopped

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = ToyNet(seed=5)
    resumed.load_state_dict(saved["model"])
    ropt = optim.build_optimizer(resumed, lr=1e-2)
    rsched = optim.make_scheduler(ropt, optim.LRSchedule(total_steps=6, warmup_steps=2,
                                                        decay_steps=3))
    ropt.load_state_dict(saved["opt"])
    rsched.load_state_dict(saved["sched"])
    assert [g["lr"] for g in ropt.param_groups] == [g["lr"] for g in opt.param_groups]
    _train(resumed, ropt, 2, steps=2)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(v, ckpt_model[k]) for k, v in model.state_dict().items())


def test_load_keeps_fp32_state_for_bf16_params_and_checks_names():
    model = ToyNet().to(torch.bfloat16)
    opt = optim.build_optimizer(model, lr=1e-2)
    model.loss(toy_batch(2)).float().backward()
    opt.step()
    sd = opt.state_dict()
    opt2 = optim.build_optimizer(model, lr=1e-2)
    opt2.load_state_dict(sd)
    bufs = [s["momentum_buffer"] for s in opt2.state.values() if "momentum_buffer" in s]
    assert len(bufs) == 5 and all(b.dtype == torch.float32 for b in bufs)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values() if "exp_avg" in s)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["param_names"][0] = "something.else"
    with pytest.raises(ValueError, match="'something.else' does not match"):
        opt2.load_state_dict(bad)


def test_sharded_state_dict_and_skip_next_step():
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    _train(model, opt, 1, steps=2)
    sd = opt.sharded_state_dict()           # single process: the shard is everything
    assert sd["muon_shard"] == {"world": 1, "rank": 0, "owners": [0] * 5, "zero_stage": 0}
    assert len(sd["state"]) == 9
    fresh = optim.build_optimizer(model, lr=1e-2)
    fresh.load_state_dict(sd)
    bad = dict(sd, muon_shard=dict(sd["muon_shard"], world=2))
    with pytest.raises(ValueError, match="cannot be loaded on rank 0/1"):
        fresh.load_state_dict(bad)
    # skip: weights, state and counters untouched, and only for one step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [s["exp_avg"].clone() for s in opt.state.values() if "exp_avg" in s]
    model.loss(toy_batch(4)).backward()
    opt.skip_next_step()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in
               zip(moments, (s for s in opt.state.values() if "exp_avg" in s)))
    assert opt.ns_matrices == 20
    opt.step()
    assert opt.ns_matrices == 30 and not torch.equal(model.head.weight, before["head.weight"])


def test_scheduler_sets_both_groups():
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-3)
    sched = optim.make_scheduler(opt, optim.LRSchedule(total_steps=100, warmup_steps=10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4])
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])


def test_flattened_parameters_are_refused():
    """What DeepSpeed ZeRO >= 1 does to a client optimizer: Muon must refuse, not run on shards."""
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-3)
    muon = opt.param_groups[0]
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in muon["params"]]))
    flat.grad = torch.ones_like(flat)
    muon["params"] = [flat]
    with pytest.raises(RuntimeError, match="ZeRO stage 0"):
        opt.step()
    with pytest.raises(ValueError, match="ZeRO stage 4 is not supported"):
        optim.check_zero_stage(4)
    for stage in (0, 1, 2, 3):   # ours, by whole matrices
        optim.check_zero_stage(stage)
    with pytest.raises(ValueError, match="zero_optimization.stage=1"):
        optim.check_deepspeed_config({"zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="Muon needs matrices"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": True}])
    with pytest.raises(ValueError, match="'use_muon' flag"):
        MuonAdamW(list(model.parameters()))
