"""Generation speed with the KV cache vs recomputing the full forward every step, and the cache's
memory at long context vs a dense KV cache.

    python bench/generate.py [--config tiny] [--batch 2] [--prompt 256] [--new 32]
                             [--device cpu] [--dtype float32] [--context 32768]
                             [--hf-shapes 1x512x64,8x64x64,32x32x32] [--repeat 3] [--no-hf]
                             [--compile]

Speed: greedy decoding of `--new` tokens after a `--prompt`-token prompt per row, (a) with
`model.generation.generate` (one cached prefill, then one token per row per step) and (b) by
re-running the whole sequence through the forward at every step (what a model without a cache
must do). Both produce the same tokens (checked). Prefill tokens/s is the cached prefill; decode
tokens/s counts generated tokens. Weights are random: speed does not depend on them.

Against transformers (`--hf`, on by default where transformers is installed): the same random
weights exported with `model.convert.export_hf` and loaded by `AutoModelForCausalLM`; greedy
decoding of each `--hf-shapes` entry (batch x prompt -> new) by both, alternating, best of
`--repeat`; prints decode tok/s and `ratio` (ours / theirs). Rows identical to transformers are
counted too, but transformers breaks indexer top-k ties arbitrarily (model/INFERENCE.md,
"transformers vs the reference", item 9), so token equality is checked against our own recompute
path above and the transformers count is informational.

`--compile`: a third column, the rollout engine (`model.engine.Engine`, one request per row)
with its decode step through `torch.compile` (`compile=True`); its first call per shape
compiles (untimed, its seconds printed); decode time is a full run's minus a one-token run's,
as for transformers. Its tokens are checked against `generate`'s.

Memory: bytes per token of a `--context`-token sequence for the released shapes (and the run
config), measured on a cache allocated on the meta device, against a dense bf16 shared-KV (MQA)
cache of the same head_dim in every layer. Prints `name: ours …, baseline …, ratio …` lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.cache import cache_bytes  # noqa: E402
from model.config import get_config  # noqa: E402
from model.generation import generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def recompute_greedy(model: Transformer, prompts: torch.Tensor, new: int, device: str):
    seq = prompts
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        logits = model(seq, logits_index=torch.full((seq.shape[0], 1), seq.shape[1] - 1,
                                                    device=seq.device)).logits[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    _sync(device)
    return seq[:, prompts.shape[1]:].tolist(), time.perf_counter() - t0


def speed(args) -> None:
    cfg = get_config(args.config, max_seq_len=max(args.prompt + args.new + 1, 4096))
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device, getattr(torch, args.dtype)).eval()
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=args.device)
    generate(model, prompts[:, :8].tolist(), max_new_tokens=2, temperature=0)  # warm-up
    out = generate(model, prompts.tolist(), max_new_tokens=args.new, temperature=0)
    s = out.stats
    ref, t_ref = recompute_greedy(model, prompts, args.new, args.device)
    same = sum(a == b for a, b in zip(out.tokens, ref))
    cached_decode = s["decode_tokens"] / s["decode_s"]
    recompute = args.batch * args.new / t_ref
    print(f"# {args.config} on {args.device} ({args.dtype}), batch {args.batch}, prompt "
          f"{args.prompt}, {args.new} new tokens; identical outputs: {same}/{args.batch} rows")
    print(f"prefill tok/s: ours {s['prefill_tokens'] / s['prefill_s']:.0f}")
    print(f"decode tok/s: ours {cached_decode:.1f}, baseline (full recompute) {recompute:.1f}, "
          f"ratio {cached_decode / recompute:.1f}x")


def against_transformers(args) -> None:
    try:
        import transformers
    except ImportError:
        print("transformers: not installed, comparison skipped")
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.hf_shapes.split(",")]
    print(f"# vs transformers {transformers.__version__} `generate` (greedy, KV cache), "
          f"{args.config} on {args.device} ({args.dtype}), best of {args.repeat}")
    for row in compare_with_transformers(args.config, args.device, getattr(torch, args.dtype),
                                         shapes, args.repeat, args.compile):
        batch, plen, new = row["shape"]
        print(f"decode tok/s {batch}x{plen}->{new}: ours {row['ours']:.1f}, baseline "
              f"transformers {row['transformers']:.1f}, ratio "
              f"{row['ours'] / row['transformers']:.2f}x (rows equal to our recompute "
              f"{row['same_recompute']}/{batch}, to transformers {row['same_hf']}/{batch})")
        if "compiled" in row:
            print(f"decode tok/s {batch}x{plen}->{new}: ours compiled engine "
                  f"{row['compiled']:.1f} (compile {row['compile_s']:.0f} s, tokens equal to "
                  f"generate: {row['compiled_equal']}), baseline transformers "
                  f"{row['transformers']:.1f}, ratio {row['compiled'] / row['transformers']:.2f}x")


def compiled_engine(model, prompts: torch.Tensor, new: int, compile: bool | str = True
                    ) -> tuple[float, list[list[int]]]:
    """Decode seconds and tokens of the engine, its step compiled by default (docstring:
    `--compile`; a string names the backend, False runs it eager)."""
    from model.engine import Engine

    def run(n):
        engine = Engine(model, max_batch=prompts.shape[0], temperature=0.0, compile=compile)
        ids = [engine.add(p, max_new_tokens=n) for p in prompts.tolist()]
        t0 = time.perf_counter()
        out = engine.run()
        return time.perf_counter() - t0, [out[i].tokens[0] for i in ids]

    total, tokens = run(new)
    return total - run(1)[0], tokens


def compare_with_transformers(config: str, device: str, dtype: torch.dtype,
                              shapes: list[tuple[int, int, int]], repeat: int,
                              compile: bool = False) -> list[dict]:
    """Greedy decode tok/s of ours and transformers' `generate` on the same exported weights,
    per (batch, prompt, new) shape, alternating, best of `repeat` (docstring)."""
    import transformers

    from model.convert import export_hf

    cfg = get_config(config, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device, dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, os.path.join(tmp, "hf"), dtype=dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(tmp, "hf"), dtype=dtype).to(device).eval()
    rows = []
    for batch, plen, new in shapes:
        prompts = torch.randint(0, cfg.vocab_size, (batch, plen), device=device)

        def ours():
            out = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0)
            return out.stats["decode_s"], out.tokens

        @torch.inference_mode()
        def hf():
            _sync(device)
            t0 = time.perf_counter()
            seq = theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False)
            _sync(device)
            # their time includes the prefill: subtract a prefill-only call's time
            t1 = time.perf_counter()
            theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=1,
                            min_new_tokens=1, do_sample=False)
            _sync(device)
            return (t1 - t0) - (time.perf_counter() - t1), seq[:, plen:].tolist()

        ours(), hf()  # warm-up
        t_ours = t_hf = float("inf")
        for _ in range(repeat):  # alternate, so load changes hit both
            t_ours = min(t_ours, ours()[0])
            t_hf = min(t_hf, hf()[0])
        ours_tokens, hf_tokens = ours()[1], hf()[1]
        ref, _ = recompute_greedy(model, prompts, new, device)
        rows.append({"shape": (batch, plen, new), "ours": batch * new / t_ours,
                     "transformers": batch * new / max(t_hf, 1e-9),
                     "same_recompute": sum(a == b for a, b in zip(ours_tokens, ref)),
                     "same_hf": sum(a == b for a, b in zip(ours_tokens, hf_tokens))})
        if compile:
            t0 = time.perf_counter()
            compiled_engine(model, prompts, new)  # compiles (a batch of 1 is its own graph)
            rows[-1]["compile_s"] = time.perf_counter() - t0
            best = min((compiled_engine(model, prompts, new) for _ in range(repeat)),
                       key=lambda r: r[0])
            rows[-1]["compiled"] = batch * new / best[0]
            rows[-1]["compiled_equal"] = best[1] == ours_tokens
    return rows


def memory(args) -> None:
    for name in ("flash", "pro", args.config):
        cfg = get_config(name)
        b = cache_bytes(cfg, args.context, torch.bfloat16)
        print(f"kv bytes/token @{args.context // 1024}K {name}: ours {b.per_token:,.0f} "
              f"(growing {b.growing_per_token:,.0f}, fixed {b.parts['window'] + b.parts['state']:,}"
              f" B/seq), baseline dense MQA {b.dense_per_token:,.0f}, ratio "
              f"{b.dense_per_token / b.per_token:.1f}x smaller")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--hf-shapes", default="1x512x64,8x64x64,32x32x32",
                   help="batch x prompt x new, comma-separated, for the transformers comparison")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--compile", action="store_true",
                   help="add the compiled engine to the transformers comparison")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory(args)
    speed(args)
    if not args.no_hf:
        against_transformers(args)


if __name__ == "__main__":
    main()
