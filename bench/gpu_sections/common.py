"""What the GPU check's sections share: the run context (device, size, time budget) and the
result a section returns (a table plus notes and raw figures)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


BENCH = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """bench/<name>.py loaded by its path, as `v4lab_bench_<name>`: by its bare name `generate`
    would find the repository's generate.py first (the root is on sys.path in tests), and a
    bench file must never shadow an installed package's name."""
    key = f"v4lab_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@dataclass
class Ctx:
    device: torch.device
    tiny: bool                 # toy sizes (the CPU self-test): every path runs, timings mean little
    deadline: float            # time.monotonic() at which the whole check must end
    out: Path
    peak_tflops: float | None = None   # dense bf16, for MFU (set by the env section)
    peak_gbps: float | None = None     # memory bandwidth, for the memory-bound kernels

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any], reps: int = 10, warmup: int = 2) -> float:
        """Median wall milliseconds of fn() (synchronised around each call)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, reps)):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None


@dataclass
class Result:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # what did not pass or did not run

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |",
                      "|" + "---|" * len(self.columns)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
            lines.append("")
        lines += [f"- {n}" for n in self.notes]
        lines += [f"- **failed:** {f}" for f in self.failed]
        return "\n".join(lines).rstrip() + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "notes": self.notes, "failed": self.failed}


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def guarded(result: Result, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one measurement; an exception (OOM, a missing backend) is recorded, not raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a check records every failure and goes on
        result.failed.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                             if str(exc) else f"{what}: {type(exc).__name__}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
