"""Benchmark: training-step time and all-to-all bytes per step, expert parallelism 1 vs 2, on 2
CPU processes (gloo). Both runs use the same 2 ranks and global batch; EP=1 is pure data
parallelism (every rank holds all experts), EP=2 splits the experts and adds the all-to-all.

    python bench/ep.py                      # tiny-shaped model, dim 128, 16 experts
    python bench/ep.py --dim 256 --experts 32 --steps 6

On CPU the all-to-all goes through gloo over loopback, so EP costs time here; its purpose on a
cluster is memory (experts / ep per rank, see `python -m train.plan`). The bytes column is what
each rank sends per optimizer step (forward dispatch + combine; backward sends the same again).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank: int, world: int, ep_size: int, a: dict) -> dict:
    import importlib

    import torch

    os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    import optim
    from model.config import get_config
    from model.loss import compute_loss
    from model.transformer import Transformer
    from train import expert_parallel as ep

    cfg = get_config("tiny").replace(dim=a["dim"], n_routed_experts=a["experts"],
                                     moe_inter_dim=a["dim"], vocab_size=1024)
    torch.manual_seed(0)
    model = Transformer(cfg)
    groups = None
    if ep_size > 1:
        groups = ep.create_groups(ep_size)
        ep.shard_model(model, groups)
    opt = optim.build_optimizer(model, lr=1e-3, model_config=cfg,
                                expert_process_group=ep.optimizer_shard_group(groups)
                                if groups else None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": a["micro"], "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30,
        "gradient_clipping": 0.0})
    if groups is not None:
        ep.attach_engine(engine)
    g = torch.Generator().manual_seed(rank)
    times, sent = [], []
    for step in range(a["steps"] + 1):                     # step 0 is warm-up
        ids = torch.randint(2, cfg.vocab_size, (a["micro"], a["seq"]), generator=g)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        out = engine(ids)
        engine.backward(compute_loss(out, ids).total)
        engine.step()
        torch.distributed.barrier()
        m = ep.dispatch_metrics(model, groups, out.expert_counts.detach())
        if step:
            times.append(time.perf_counter() - t0)
            sent.append(m.get("ep/all_to_all_bytes", 0.0))
    return {"step_s": sorted(times)[len(times) // 2], "bytes": sum(sent) / len(sent),
            "dispatch_s": m.get("ep/dispatch_seconds", 0.0) + m.get("ep/combine_seconds", 0.0)}


def main() -> None:
    from tests.helpers.distributed import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    a = vars(p.parse_args())
    res = {e: run_distributed(_rank, 2, e, a, timeout=600)[0] for e in (1, 2)}
    tokens = a["micro"] * a["seq"]
    for e, r in res.items():
        print(f"ep={e}: step {r['step_s'] * 1e3:.0f} ms (median of {a['steps']}), all-to-all "
              f"{r['bytes'] / 2**20:.2f} MiB/step/rank ({r['bytes'] / tokens / 1024:.2f} KiB per "
              f"token), dispatch+combine {r['dispatch_s'] * 1e3:.0f} ms in the last step")
    print(f"ep step time: ours (ep=2) {res[2]['step_s'] * 1e3:.0f} ms, baseline (ep=1) "
          f"{res[1]['step_s'] * 1e3:.0f} ms, ratio {res[2]['step_s'] / res[1]['step_s']:.2f}")


if __name__ == "__main__":
    main()
