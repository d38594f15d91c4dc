"""Section 1, the environment: what ran the check, and the peaks MFU and bandwidth figures are
measured against (dense bf16 FLOP/s from `train.metrics.detect_peak_tflops`, the data-sheet
memory bandwidth below), beside a measured device-to-device copy."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from train.metrics import detect_peak_tflops

from .common import Ctx, Result

# data-sheet HBM bandwidth, GB/s (first match wins: the more specific names first)
BANDWIDTH = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
             ("H800", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40", 864.0))


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def copy_gbps(ctx: Ctx) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second)."""
    n = (1 << 20) if ctx.tiny else (1 << 28)                     # floats: 4 MiB or 1 GiB
    src = torch.empty(n, dtype=torch.float32, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src), reps=5 if ctx.tiny else 20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def run(ctx: Ctx) -> Result:
    r = Result("Environment", ["item", "value"])
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        name = props.name
        r.add("GPU", name)
        r.add("memory", f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
        r.add("driver", driver_version())
        r.add("CUDA (torch build)", torch.version.cuda)
        ctx.peak_tflops = detect_peak_tflops(ctx.device)
        ctx.peak_gbps = next((bw for key, bw in BANDWIDTH if key in name), None)
    else:
        r.add("CPU", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    r.add("torch", torch.__version__)
    try:
        import triton
        r.add("triton", triton.__version__)
    except ImportError:
        r.add("triton", "not installed (every dispatcher uses its PyTorch reference)")
    r.add("peak dense bf16 (for MFU)", f"{ctx.peak_tflops:.0f} TFLOP/s" if ctx.peak_tflops
          else "unknown: MFU is not computed")
    r.add("peak memory bandwidth", f"{ctx.peak_gbps:.0f} GB/s" if ctx.peak_gbps else "unknown")
    measured = copy_gbps(ctx)
    r.add("measured copy bandwidth", f"{measured:.0f} GB/s"
          + (f" ({measured / ctx.peak_gbps:.0%} of peak)" if ctx.peak_gbps else ""))
    return r
