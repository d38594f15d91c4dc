"""The prepared GPU check: one command, one process, every GPU figure the README needs.

    python bench/gpu_check.py                        # on the GPU machine: ~7 minutes
    python bench/gpu_check.py --budget-s 300 --sections env correctness kernel_speed
    python bench/gpu_check.py --device cpu --tiny    # toy sizes on the CPU (a test in the suite)

Sections, in this order (bench/gpu_sections/<name>.py): `env` (GPU, driver, CUDA, torch, triton, the peak
FLOP/s and bandwidth used for MFU), `correctness` (every Triton kernel against its PyTorch
reference at the tiny/small/flash per-layer shapes, forward and backward; the model with kernels
on against off), `kernel_speed` (bench/triton_kernels.py's measurements), `train_step` (tokens/s, MFU,
eager and compiled, activation checkpointing, peak memory against the planner), `generation`
(decode tokens/s at batch 1/8/32, eager and compiled, against transformers), `newton_schulz`.

GPU time is rare and short, so nothing waits for the end: each section writes
`<out>/<n>_<name>.json` and `.md` as soon as it finishes, and `<out>/summary.md` (every table so
far, then what failed) is rewritten after each one. A section that raises is recorded and the next
one runs; one that would start with less than `MIN_START_S` of `--budget-s` left is skipped, and a
running section is interrupted (SIGALRM) when the budget is spent, keeping what it had measured.
Exit status: 0 when every section ran and passed, 1 when something failed or was skipped, 2 when
`--device cuda` finds no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository

import torch  # noqa: E402

NAMES = ("env", "correctness", "kernel_speed", "train_step", "generation", "newton_schulz")


def load_sections() -> dict:
    """bench/gpu_sections loaded by its path (a folder beside this script, not an installed
    package: no bench name may stand between an installed package and its users)."""
    where = Path(__file__).resolve().parent / "gpu_sections"
    if "gpu_sections" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "gpu_sections", where / "__init__.py", submodule_search_locations=[str(where)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["gpu_sections"] = package
        spec.loader.exec_module(package)
    return {name: importlib.import_module(f"gpu_sections.{name}") for name in NAMES}


SECTIONS = load_sections()
_common = importlib.import_module("gpu_sections.common")
Ctx, Result = _common.Ctx, _common.Result
MIN_START_S = 15.0


class BudgetSpent(Exception):
    pass


def _alarm(signum, frame):
    raise BudgetSpent("the time budget ran out during this section")


def run_section(name: str, ctx: Ctx) -> Result:
    """One section, interrupted when the budget is spent; an exception becomes its record."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 1.0))
    saved = dict(os.environ)  # a section's kernel mode (V4_KERNELS, TRITON_INTERPRET) is its own
    try:
        return SECTIONS[name].run(ctx)
    except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
        r = Result(name, ["error"])
        r.failed.append(f"{type(exc).__name__}: {exc}")
        r.notes.append("```\n" + traceback.format_exc(limit=6).rstrip() + "\n```")
        return r
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.environ.clear()
        os.environ.update(saved)


def write(out: Path, done: list[tuple[str, Result, float]], skipped: list[str],
          header: str) -> None:
    lines = [header, ""]
    for name, result, seconds in done:
        lines += [result.markdown(), f"({name}: {seconds:.0f} s)", ""]
    problems = [f"{name}: {f}" for name, result, _ in done for f in result.failed]
    problems += [f"{name}: skipped (budget)" for name in skipped]
    lines += ["## Failed or skipped", ""] + ([f"- {p}" for p in problems] or ["- nothing"])
    tmp = out / "summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "summary.md")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU self-test)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu --tiny to check "
              "the script itself", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(device, args.tiny, time.monotonic() + args.budget_s, out)
    header = (f"# GPU check ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, device {args.device}"
              f"{', tiny sizes' if args.tiny else ''}, budget {args.budget_s:.0f} s)")
    done, skipped = [], []
    order = [name for name in SECTIONS if name in args.sections]
    for i, name in enumerate(order, 1):
        if ctx.left() < MIN_START_S:
            skipped.append(name)
            print(f"[{name}] skipped: {ctx.left():.0f} s of the budget left", flush=True)
            continue
        t0 = time.monotonic()
        print(f"[{name}] ...", flush=True)
        result = run_section(name, ctx)
        seconds = time.monotonic() - t0
        done.append((name, result, seconds))
        stem = out / f"{i}_{name}"
        stem.with_suffix(".json").write_text(json.dumps(
            {**result.as_dict(), "seconds": seconds}, indent=1, default=str))
        stem.with_suffix(".md").write_text(result.markdown())
        write(out, done, skipped, header)
        print(result.markdown(), flush=True)
    write(out, done, skipped, header)  # again: the skipped sections are listed last
    failed = any(r.failed for _, r, _ in done) or skipped
    print(f"summary: {out / 'summary.md'}" + (" (something failed or was skipped)" if failed
                                              else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
