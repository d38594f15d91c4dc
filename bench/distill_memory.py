"""Peak memory of distillation's full-vocabulary reverse KL (forward + backward), chunked
(`distill.loss.chunked_reverse_kl`) against dense (all `[tokens, vocab]` logits at once), at
the released vocabulary (129,280).

    python bench/distill_memory.py [--tokens 16384] [--dim 512] [--chunk 1024]

Each configuration runs in a fresh process that reports its peak resident memory above what
its inputs take (`ru_maxrss` after the loss and its backward, minus after building the inputs),
so the figure is what the loss itself costs. The dense loss needs ~5 fp32 `[tokens, vocab]`
tensors (two logits, two log-softmaxes, the product) plus their gradients, 8.5 GB each at 16K
tokens: more than this machine holds, so dense is measured at 512, 1K and 2K tokens and
extrapolated linearly to `--tokens` (it is linear in tokens: every tensor is [tokens, vocab]).
Prints

    distill_memory: chunked <GiB> at <tokens> tokens, dense <GiB> (measured at ... /
    extrapolated), ratio <dense / chunked>
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB = 129_280


def measure(mode: str, tokens: int, dim: int, chunk: int) -> float:
    """Peak GiB above the inputs for one (mode, tokens) in this process."""
    import torch

    from distill.loss import chunked_reverse_kl, reverse_kl_dense

    torch.manual_seed(0)
    hs = (torch.randn(tokens, dim) * 0.05).requires_grad_(True)
    ws = (torch.randn(VOCAB, dim) * 0.05).requires_grad_(True)
    ht, wt = torch.randn(tokens, dim) * 0.05, torch.randn(VOCAB, dim) * 0.05
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        kl = chunked_reverse_kl(hs, ws, ht, wt, chunk=chunk)
    else:
        kl = reverse_kl_dense(hs @ ws.t(), ht @ wt.t())
    kl.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) * 1024 / 2**30  # ru_maxrss is in KiB on Linux


def run(mode: str, tokens: int, dim: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--one", mode, "--tokens", str(tokens),
                          "--dim", str(dim), "--chunk", str(chunk)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["gib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--one", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps({"gib": measure(args.one, args.tokens, args.dim, args.chunk)}))
        return
    chunked = run("chunked", args.tokens, args.dim, args.chunk)
    sizes = [512, 1024, 2048]
    dense = [run("dense", n, args.dim, args.chunk) for n in sizes]
    per_token = (dense[-1] - dense[0]) / (sizes[-1] - sizes[0])
    extrapolated = dense[-1] + per_token * (args.tokens - sizes[-1])
    measured = ", ".join(f"{g:.2f} GiB at {n}" for g, n in zip(dense, sizes))
    print(f"distill_memory: chunked {chunked:.2f} GiB at {args.tokens} tokens (chunk "
          f"{args.chunk}), dense {extrapolated:.1f} GiB (measured {measured}; extrapolated), "
          f"ratio {extrapolated / max(chunked, 1e-9):.1f}")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()
