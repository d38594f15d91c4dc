"""Context parallelism: peak activation memory per rank, step time and bytes exchanged, for
CP = 1, 2, 4 at one sequence length (issue #36).

    python bench/context_parallel.py [--config tiny] [--seq 8192] [--cps 1,2,4] [--steps 3]
                                     [--mode sparse] [--threads 1]

Each CP size runs in its own `cp` processes joined by gloo (real exchanges, as in training):
the same packed row (documents of 300-3000 tokens) through forward and backward of the model
with the MTP block, the indexer KL and the balance loss, as `model.loss.token_sums` sums it.
- activations: the peak bytes of the tensors forward + backward create on one rank, above what
  was live before (`train.memory.SectionPeak`; gradients are allocated beforehand, so this is
  activations and backward transients), the largest rank; goal CP=2 ≤ 0.6, CP=4 ≤ 0.35 of CP=1;
- step: median seconds of forward + backward, the slowest rank (on one CPU box the ranks share
  cores: a layout's wall time, not a cluster's);
- exchange: bytes one rank sends per attention layer in one forward (halos point to point, the
  compressed entries' all-gather), counted by `ContextParallel.bytes_sent`, against what ring
  attention over uncompressed K=V would send, (cp − 1)/cp · seq · head_dim values per layer.
Prints `name: ours …, baseline …, ratio …` lines; weights are random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def packed_row(seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from model.loss import next_token_labels
    from model.packing import positions_from_doc_ids

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(300, 3000, (seq // 300 + 1,), generator=g)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:seq][None]
    ids = torch.randint(2, vocab, (1, seq), generator=g)
    return dict(ids=ids, doc=doc, pos=positions_from_doc_ids(doc),
                labels=next_token_labels(ids, doc))


def rank_main(rank: int, cp: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    try:
        queue.put((rank, measure(rank, cp, args)))
    finally:
        dist.destroy_process_group()


def measure(rank: int, cp: int, args) -> dict:
    from model.config import get_config
    from model.context_parallel import ContextParallel
    from model.loss import LossWeights, token_sums
    from model.transformer import Transformer
    from train.memory import SectionPeak

    cfg = get_config(args.config).replace(max_seq_len=max(args.seq, 4096))
    torch.manual_seed(0)
    model = Transformer(cfg).float()
    model.set_csa_mode(args.mode, indexer_loss=True)
    shard = ContextParallel(cp, rank) if cp > 1 else None
    model.context_parallel = shard
    b = packed_row(args.seq, cfg.vocab_size)

    def step():
        out = model(b["ids"], doc_ids=b["doc"], positions=b["pos"])
        token_sums(out, b["labels"], b["doc"], LossWeights(), shard).total.backward()

    step()  # warm-up; allocates every gradient
    model.zero_grad(set_to_none=False)
    sent = shard.bytes_sent if shard else 0
    with torch.no_grad():
        model(b["ids"], doc_ids=b["doc"], positions=b["pos"])
    forward_bytes = (shard.bytes_sent - sent) if shard else 0
    with SectionPeak(torch.device("cpu")) as peak:
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    layers = cfg.n_layers + cfg.n_mtp_layers
    return dict(peak=peak.bytes, seconds=statistics.median(times),
                per_layer=forward_bytes / layers, head_dim=cfg.head_dim)


def run(cp: int, args) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, cp, port, args, queue)) for r in range(cp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=args.timeout) for _ in procs)
    for p in procs:
        p.join()
    return dict(peak=max(r["peak"] for r in results.values()),
                seconds=max(r["seconds"] for r in results.values()),
                per_layer=results[0]["per_layer"], head_dim=results[0]["head_dim"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--cps", default="1,2,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default="sparse", choices=("dense", "sparse"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    cps = [int(c) for c in args.cps.split(",")]
    print(f"context parallelism: {args.config}, {args.seq} tokens per row, {args.mode} CSA, "
          f"forward + backward with MTP, indexer KL and balance loss", flush=True)
    base = None
    for cp in cps:
        r = run(cp, args)
        base = base or r
        mib = 2 ** 20
        print(f"cp={cp} activations per rank: ours {r['peak'] / mib:.1f} MiB, baseline (cp="
              f"{cps[0]}) {base['peak'] / mib:.1f} MiB, ratio {r['peak'] / base['peak']:.2f}",
              flush=True)
        print(f"cp={cp} step: ours {r['seconds']:.2f} s, baseline {base['seconds']:.2f} s, "
              f"ratio {r['seconds'] / base['seconds']:.2f}", flush=True)
        if cp > 1:
            ring = (cp - 1) / cp * args.seq * r["head_dim"] * 4  # fp32 K=V, per layer
            print(f"cp={cp} exchange per attention layer (forward): ours "
                  f"{r['per_layer'] / 1024:.1f} KiB, baseline (ring attention over raw K=V) "
                  f"{ring / 1024:.1f} KiB, ratio {r['per_layer'] / ring:.3f}", flush=True)


if __name__ == "__main__":
    main()
