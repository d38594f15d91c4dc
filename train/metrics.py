"""Rank-0 logging: tqdm progress line, a JSONL metrics file, wandb (offline by default), and a
loss-curve PNG at the end. Non-zero ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig

from . import faults
from .guards import finish


def flops_per_token(cfg: ModelConfig, activated_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·activated parameters (forward + backward matmuls) plus the
    attention core: each query scores and mixes its window and its compressed candidates
    (2 matmuls of 2·heads·c FLOPs per key, ×3 for backward), and the indexer's scores."""
    attn = 0.0
    for i in range(cfg.n_layers + cfg.n_mtp_layers):
        ratio = cfg.compress_ratios[i]
        keys = min(cfg.window_size, seq_len)
        if ratio == 4:
            keys += min(cfg.index_topk, seq_len // ratio)
            attn += 3 * 2 * cfg.index_n_heads * cfg.index_head_dim * (seq_len / ratio) / 2
        elif ratio:
            keys += seq_len / ratio / 2  # causal: half the entries on average
        attn += 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * keys
    return 6.0 * activated_params + attn


def detect_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak per device for the GPUs we know; None elsewhere (set it in the config)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                        ("A800", 312.0), ("L40", 181.0), ("4090", 165.0)):
        if key in name:
            return tflops
    return None


def set_aside_rows_past(path: Path, step: int) -> int:
    """A run resumed at `step` after a crash (kill -9, a lost node) replays the steps after its
    last checkpoint; the crashed run's rows for them would appear twice in `metrics.jsonl`,
    unmarked. They move to `metrics.superseded.jsonl` (kept, not deleted), each marked with the
    step it was superseded at. Atomic: the file is rewritten beside itself and renamed.
    -> how many rows moved."""
    if not path.is_file():
        return 0
    keep, past = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the crash
            row = None
        if not isinstance(row, dict):
            row = {"unreadable": line}
        row_step = row.get("step")
        if "unreadable" in row or (isinstance(row_step, int) and row_step > step):
            past.append(row)
        else:
            keep.append(line + "\n")
    if not past:
        return 0
    with open(path.with_name("metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
        for row in past:
            f.write(json.dumps({**row, "superseded_at_resume": step}) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(past)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 wandb_cfg: Any, config: dict, progress: bool = True):
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.file = None
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        set_aside_rows_past(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            desc="train")
        self.wandb = self._start_wandb(wandb_cfg, config)

    def _start_wandb(self, cfg: Any, config: dict):
        if cfg.mode == "disabled":
            return None
        try:
            import wandb

            return wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode,
                              dir=str(self.run_dir), config=config, resume="allow",
                              id=self.run_dir.name.replace("/", "_"))
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            print(f"wandb could not start ({type(e).__name__}: {e}); continuing without it")
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.n = step
            parts = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics.get('lr', 0):.2e}"}
            if "tokens_per_s" in metrics:
                parts["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self.bar.set_postfix(parts, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Ends the run's logging. Every part runs even if another fails (the first failure is
        raised afterwards); the plot is cosmetic and only ever warns."""
        if not self.enabled:
            return
        self.enabled = False  # closing twice (an error path after a close) is a no-op
        parts = [("the progress bar", self.bar.close if self.bar is not None else lambda: None),
                 ("metrics.jsonl", self.file.close),
                 ("wandb", self.wandb.finish if self.wandb is not None else lambda: None),
                 ("the loss-curve plot", self._plot_or_warn)]
        finish(parts, None)

    def _plot_or_warn(self) -> None:
        try:
            self.plot()
        except ImportError as e:
            print(f"loss_curve.png not written: matplotlib is not importable ({e}); "
                  f"`pip install matplotlib` to get the plot", flush=True)
        except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
            print(f"loss_curve.png not written: {type(e).__name__}: {e}", flush=True)

    def plot(self) -> None:
        """loss_curve.png: training loss and held-out loss against steps; for a stage that
        logs rewards (GRPO) also reward_curve.png: the rollouts' mean reward and the held-out
        greedy pass@1 per domain. Each is written to a temporary file and renamed, so a failed
        write (full disk) leaves no truncated PNG."""
        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        if train:
            self._plot_file("loss_curve.png", [("train loss", train, "-"),
                                               ("held-out loss", val, "o-")],
                            "loss (nats/token)")
        reward = [(r["step"], r["reward/mean"]) for r in self.history if "reward/mean" in r]
        if reward:
            evals = sorted({k for r in self.history for k in r
                            if k.startswith("eval/") and k.endswith("/pass@1")})
            series = [("rollout mean reward", reward, "-")] + [
                (f"held-out pass@1 ({k.split('/')[1]})",
                 [(r["step"], r[k]) for r in self.history if k in r], "o-") for k in evals]
            self._plot_file("reward_curve.png", series, "reward / pass@1")

    def _plot_file(self, name: str, series: list, ylabel: str) -> None:
        import matplotlib  # lazy: only the end of a run needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        target = self.run_dir / name
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            for label, points, style in series:
                if points:
                    ax.plot(*zip(*points), style, label=label, linewidth=1)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            with open(tmp, "wb") as f:
                faults.disk_full(tmp)
                fig.savefig(f, format="png", dpi=120)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            plt.close(fig)


def memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        from .memory import process_peak_bytes

        return process_peak_bytes(device)  # SectionPeak resets the counter, this carries it
    import psutil

    return float(psutil.Process(os.getpid()).memory_info().rss)


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
