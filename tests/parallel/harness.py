"""Shared pieces of the expert-parallel tests: a small model config, batches, and one rank's
training run through the trainer's own EP path (DeepSpeed engine, gradient accumulation,
MuonAdamW, router-bias update from global counts, EP-aware clipping).

`train(rank, world, ep_size, ...)` runs on every rank of `run_distributed` and returns plain
numpy data (losses, full-model gradients of the first step, full weights after the last step),
so an EP run and an EP = 1 run of the same global batch can be compared tensor by tensor.
"""

from __future__ import annotations

import importlib
import os

import torch

GLOBAL_BATCH, SEQ, MICRO = 8, 32, 2
CLIP = 0.5     # small enough to be active: checks the EP-aware clipping against DeepSpeed's
LR = 2e-3
# AdamW with the recipe's eps=1e-20 turns round-off-sized gradients (e.g. structurally ~0 entries
# of mHC biases, whose sign depends on summation order) into full lr-sized steps, so two
# mathematically equal runs can drift by lr per step there. 1e-8 keeps the comparison about EP.
ADAMW_EPS = 1e-8


def small_config(**kw):
    from model.config import get_config

    base = dict(vocab_size=256, dim=64, n_layers=2, compress_ratios=(0, 4, 0), n_heads=2,
                head_dim=32, rope_head_dim=16, q_lora_rank=32, o_lora_rank=32, o_groups=2,
                index_n_heads=2, index_head_dim=16, index_topk=8, window_size=8,
                moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2)
    base.update(kw)
    return get_config("tiny").replace(**base)


def global_batches(steps: int, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(2, vocab, (steps, GLOBAL_BATCH, SEQ), generator=g)


def starve(model, n_experts: int, keep: int) -> None:
    """Routes every token to experts [0, keep) only: router bias +10 there, and a hash table
    that only names those experts. With keep = E/2 and EP=2, rank 1's experts get nothing."""
    with torch.no_grad():
        for block in [*model.layers, *model.mtp]:
            gate = block.ffn.gate
            if gate.is_hash:
                k = gate.tid2eid.shape[1]
                ids = torch.arange(gate.tid2eid.shape[0] * k).view(-1, k)
                gate.tid2eid.copy_(ids % keep)
            else:
                gate.bias.zero_()
                gate.bias[:keep] = 10.0


def perturbed_model(ep_size: int):
    """A perturbed (not freshly initialised) small model, identical on every rank, in eval mode,
    then sharded over EP groups of `ep_size` (a collective) when ep_size > 1.
    -> (model, EPGroups | None)."""
    from model.transformer import Transformer
    from train import expert_parallel as ep

    torch.manual_seed(0)
    model = Transformer(small_config())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    groups = None
    if ep_size > 1:
        groups = ep.create_groups(ep_size)
        ep.shard_model(model, groups)
    return model.eval(), groups


def _no_shm():
    os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _full_grads(model, groups) -> dict:
    from train import expert_parallel as ep

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if groups is not None and ep.is_expert_param(name):
            parts = [torch.empty_like(g) for _ in range(groups.ep_size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=groups.ep_group)
            g = torch.cat(parts)
        out[name] = g.numpy()
    return out


def _sharded_full_grads(model, opt, groups) -> dict:
    """The reduced gradient of every parameter, from the owners' fp32 shards (zero_stage=2):
    each domain sums owner-or-zeros, experts are then gathered over the EP group."""
    from train import expert_parallel as ep

    acc = opt._acc
    out = {}
    for name, p in model.named_parameters():
        g = acc[id(p)].clone() if id(p) in acc else torch.zeros_like(p)
        expert = groups is not None and ep.is_expert_param(name)
        if not expert:
            torch.distributed.all_reduce(g)
        elif groups.expert_dp_size > 1:
            torch.distributed.all_reduce(g, group=groups.expert_dp_group)
        if expert:
            parts = [torch.empty_like(g) for _ in range(groups.ep_size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=groups.ep_group)
            g = torch.cat(parts)
        out[name] = g.numpy()
    return out


def build(ep_size: int, cfg=None, starve_keep: int | None = None, gas: int = 1,
          zero_stage: int = 0, bf16: bool = False):
    """Model + optimizer + engine exactly as the trainer wires them (fp32; ZeRO 0, or our
    whole-matrix stage 2: the optimizer reduces gradients to owners, the engine does not)."""
    import deepspeed

    import optim
    from model.transformer import Transformer
    from train import expert_parallel as ep

    _no_shm()
    cfg = cfg or small_config()
    torch.manual_seed(0)
    model = Transformer(cfg)
    if starve_keep is not None:
        starve(model, cfg.n_routed_experts, starve_keep)
    groups = None
    if ep_size > 1:
        ep.validate(cfg, torch.distributed.get_world_size(), ep_size)
        groups = ep.create_groups(ep_size)
        ep.shard_model(model, groups)
    sharded = zero_stage > 0
    if bf16 and sharded:   # the trainer's cast: our optimizer keeps the fp32 masters
        model.bfloat16()
    opt = optim.build_optimizer(model, lr=LR, model_config=cfg, adamw_eps=ADAMW_EPS,
                                expert_process_group=ep.optimizer_shard_group(groups)
                                if groups else None, zero_stage=zero_stage)
    ds_cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
              "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30,
              "gradient_clipping": 0.0 if groups or sharded else CLIP,
              "bf16": {"enabled": bf16 and not sharded}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    if sharded:
        engine.enable_backward_allreduce = False
    if zero_stage == 3:
        from optim.weight_sharding import BlockWeightSharding
        BlockWeightSharding(model, opt)
    if groups is not None:
        ep.attach_engine(engine)
    return model, opt, engine, groups


def step_on(rows, model, opt, engine, groups, keep_grads: bool = False):
    """One optimizer step on this rank's rows, wired as the trainer does (micro-batches,
    accumulation into owners under ZeRO 1/2, global norm, EP-aware clipping, DeepSpeed step).
    -> (summed loss, grad norm, expert counts, full reduced gradients or None)."""
    from model.loss import LossWeights, compute_loss
    from train import expert_parallel as ep

    sharded = getattr(opt, "sharded", False)
    total, counts = torch.zeros((), dtype=torch.float64), None
    for mb in rows.split(MICRO):
        out = engine(mb)
        terms = compute_loss(out, mb, weights=LossWeights(mtp=0.3, balance=1e-2, indexer=0))
        engine.backward(terms.total)
        if sharded:
            opt.accumulate_gradients()
        total += float(terms.total.detach())
        c = out.expert_counts.detach().float()
        counts = c if counts is None else counts + c
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
    if sharded:
        opt.finish_gradients()
    norm = opt.grad_norm() if sharded else ep.global_grad_norm(model, groups)
    grads = None
    if keep_grads:
        grads = (_sharded_full_grads(model, opt, groups) if sharded
                 else _full_grads(model, groups))
    if sharded:
        opt.scale_gradients(ep.clip_coefficient(CLIP, norm))
    elif groups is not None:
        ep.clip_grads_(model, CLIP, norm)
    engine.step()
    return total, norm, counts, grads


def train(rank: int, world: int, ep_size: int, steps: int = 3, starve_keep: int | None = None,
          zero_stage: int = 0, checkpoint_dir: str | None = None, save_after: int | None = None,
          resume: bool = False, grads_step: int | None = None):
    """`save_after=N`: write a trainer checkpoint after step N into `checkpoint_dir` (and go
    on); `resume`: start from the newest checkpoint there, in this run's layout (resharded by
    `train.checkpoint.load_checkpoint` when the layout differs). Gradients are returned for
    the first step run, or step index `grads_step`."""
    from train import checkpoint as ckpt
    from train import expert_parallel as ep
    from train.dist import DistInfo, all_reduce_sum

    gas = GLOBAL_BATCH // (MICRO * world)
    model, opt, engine, groups = build(ep_size, starve_keep=starve_keep, gas=gas,
                                       zero_stage=zero_stage)
    data = global_batches(steps, model.cfg.vocab_size)
    result = {"loss": [], "norm": [], "bytes": []}
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    start = 0
    if resume:
        path = ckpt.list_checkpoints(checkpoint_dir)[-1]
        start = ckpt.load_checkpoint(path, info, model, opt)["step"]
    for step in range(start, steps):
        rows = data[step][rank::world]                       # this rank's share of the batch
        want = step == (start if grads_step is None else grads_step)
        total, norm, counts, grads = step_on(rows, model, opt, engine, groups, want)
        if want:
            result["grads"] = grads
        all_reduce_sum(counts)                               # global counts per expert
        model.update_router_biases(counts, 1e-3)
        result["loss"].append(float(all_reduce_sum(total.reshape(1))) / (gas * world))
        result["norm"].append(norm)
        result["bytes"].append(ep.dispatch_metrics(model, groups, counts).get(
            "ep/all_to_all_bytes", 0.0))
        if save_after == step + 1:
            ckpt.save_checkpoint(checkpoint_dir, step + 1, info, model, opt, {"step": step + 1},
                                 "", None, 0, ep_groups=groups)
    from optim.weight_sharding import weights_gathered
    sharding = getattr(model, "_weight_sharding", None)
    if sharding is not None:  # between steps: (held, owned, all) bytes of sharded block weights
        shared = [s for u in sharding.units for s in u.params]
        result["block_bytes"] = (sharding.resident_bytes(),
                                 sum(s.nbytes for s in shared if s.mine),
                                 sum(s.nbytes for s in shared))
    with weights_gathered(model):
        result["weights"] = {k: v.numpy().copy()
                             for k, v in ep.full_state_dict(model, groups).items()}
    result["ns_matrices"] = opt.ns_matrices
    return result


def sized_config(dim: int):
    """`small_config` widened to `dim` (attention and experts scale with it), for memory."""
    return small_config(dim=dim, q_lora_rank=dim // 2, o_lora_rank=dim // 2, moe_inter_dim=dim,
                        n_heads=4, head_dim=64)


def measure_step_memory(rank: int, world: int, ep_size: int, zero_stage: int, dim: int = 128,
                        seq: int = 32, steps: int = 1, bf16: bool = True) -> dict:
    """Peak tensor memory of this rank over `steps` optimizer steps (2 micro-batches each),
    after one warm-up step: the bytes live when they begin plus the peak of what they allocate
    (`train.memory.SectionPeak`); and the median step time."""
    import gc
    import time

    from train.dist import all_reduce_sum
    from train.memory import SectionPeak, live_tensor_bytes

    cfg = sized_config(dim)
    gas = 2
    model, opt, engine, groups = build(ep_size, cfg=cfg, gas=gas, zero_stage=zero_stage,
                                       bf16=bf16)
    g = torch.Generator().manual_seed(rank)

    def batch():
        return torch.randint(2, cfg.vocab_size, (gas * MICRO, seq), generator=g)

    step_on(batch(), model, opt, engine, groups)                 # warm-up: state allocated
    gc.collect()
    base = live_tensor_bytes()
    times = []
    with SectionPeak(torch.device("cpu")) as peak:
        for _ in range(steps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            _, _, counts, _ = step_on(batch(), model, opt, engine, groups)
            all_reduce_sum(counts)
            torch.distributed.barrier()
            times.append(time.perf_counter() - t0)
    return {"step_s": sorted(times)[len(times) // 2], "base": base, "peak": base + peak.bytes}
