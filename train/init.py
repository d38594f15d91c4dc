"""Starting weights (`init_from=PATH`) and frozen models (GRPO's reference policy,
distillation's teachers).

`init_from=PATH` starts a run from the weights of another model: our training checkpoints (a
`step_N` directory or its `model/`), `save_pretrained` directories, Hugging Face exports
(`python -m model.convert export`), released and reference-inference weights (FP8/FP4
dequantised): whatever `model.weights.load_pretrained` reads. Weights only: the optimizer is
fresh, the step counter, LR schedule, data position and batch ramp start at 0. It is not
`checkpoint.resume`: when the run directory already holds a resumable checkpoint, the run
resumes from it and `init_from` is ignored (one log line says so), so a restarted job continues
its own run instead of starting over.

The model config. The init checkpoint's config.json is authoritative: a field of this run's
model config (`model.preset`) that differs from it is an error naming the fields, unless the
field is set explicitly in `model.overrides` (e.g. a longer `max_seq_len`); the tensor shapes
are then checked as well. Fields that do not describe the architecture (`seed`, `init_std`,
`csa_mode`, the storage format `quantization` / `expert_dtype`) never count.
`model.preset=PATH/config.json` takes the checkpoint's own config.

Every check runs at `Trainer.__init__` (before any data work), from the safetensors headers
only: the directory, config.json, every weights file's header, the shapes the weights will have
in our naming (per-expert tensors stacked, FP4 packing undone, reference-inference shards
merged) against the model's, and the tokenizer. A mismatch is an `InitFromError` naming the
file, tensor or field.

Tokenizer. A checkpoint carrying tokenizer.json fixes the token ids its embedding was trained
on. `init_tokenizer_file(path)` returns it (post-training stages reuse it; pre-training uses it
when `data.tokenizer` is unset); a different `data.tokenizer` (by `tokenizer_fingerprint`) is an
error naming both files.

Expert parallelism: each rank reads only its own experts: stacked expert tensors of our format
are read as slices (`safe_open(...).get_slice`), per-expert tensors of exports and releases are
read (and FP4-dequantised) only for this rank's expert ids; nothing else of the other ranks'
experts is ever materialised. Dense tensors are read in full on every rank.

The run records where it started: `run_dir/init_from.json` (the path as given, its absolute
weights directory, format, a digest of the weights headers and a sample of their bytes, the
tokenizer) and one row of
`metrics.jsonl`; the resolved config.yaml of every checkpoint carries `init_from` as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from model import naming
from model.config import ModelConfig
from model.transformer import Transformer
from model.weights import (_FP32_NAMES, WeightsFileError, read_tensors, released_to_ours,
                           resolve_weights_dir, tensor_files)

from . import checkpoint as ckpt
from . import expert_parallel as ep

# ModelConfig fields that do not change what the weights mean
NON_ARCHITECTURE = ("seed", "init_std", "csa_mode", "quantization", "expert_dtype")
_FP4_DTYPES = ("I8", "U8", "F4", "F4_E2M1", "F4_E2M1FN_X2")
_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")
_INIT_WAY_OUT = ("Start from a checkpoint of this model, or describe its model with "
                 "model.preset=<its config.json>.")


def _frozen_way_out(what: str) -> str:
    """The fix for a frozen model (GRPO's reference, a distillation teacher) that does not match
    the policy: the policy's config and tokenizer are fixed by init_from, so it is the frozen
    model's path that must change (a preset or data.tokenizer override would not help)."""
    default = " (leave grpo.ref unset to use init_from itself)" if what == "grpo.ref" else ""
    return (f"{what} must be the same model, with the same tokenizer, as the policy this run "
            f"trains: give a checkpoint trained from the same base as init_from{default}.")


class InitFromError(ckpt.CheckpointError):
    """`init_from` (or a frozen model's path) cannot be used for this run; the message names the
    path, file, tensor or field."""


@dataclass
class InitSource:
    """What was checked at start-up: everything loading needs, without any tensor read."""

    given: str                  # the path as the user wrote it
    path: Path                  # the weights directory (absolute)
    files: list[Path]
    layout: str                 # tensor_files' layout: single | index | mp | glob
    ours: bool                  # our stacked-expert naming (else released / HF per-expert)
    config: ModelConfig
    shapes: dict[str, tuple]    # full shapes in our naming
    digest: str
    tokenizer_file: Path | None

    @property
    def format(self) -> str:
        return ("v4lab" if self.ours else "released/hf") + f" ({self.layout})"

    def record(self) -> dict[str, Any]:
        return {"init_from": self.given, "path": str(self.path), "format": self.format,
                "digest": self.digest,
                "tokenizer": str(self.tokenizer_file) if self.tokenizer_file else None}


# ---------------------------------------------------------------------- inspecting
def inspect(path: str | os.PathLike, what: str = "init_from") -> InitSource:
    """Reads config.json and the safetensors headers of `path` (no tensor data)."""
    label = f"{what}={path}"
    try:
        wdir = resolve_weights_dir(path).absolute()
        if not wdir.is_dir():
            raise ValueError(f"must be a directory (config.json + *.safetensors): {wdir}")
        config = ModelConfig.from_json(wdir / "config.json")
        files, layout = tensor_files(wdir)
    except (FileNotFoundError, ValueError) as e:
        raise InitFromError(f"{label}: {e}") from None
    headers = []
    for f in files:
        header, problem = ckpt._read_header(f)
        if problem:
            raise InitFromError(f"{label}: {problem}")
        headers.append((f, header))
    digest = hashlib.sha256()
    for f, header in headers:
        digest.update(f.name.encode() + json.dumps(header, sort_keys=True).encode())
        digest.update(_content_sample(f))
    ours = naming.is_ours([k for _, h in headers for k in h])
    shapes = (_own_shapes(headers) if ours else _released_shapes(headers, layout))
    tok = wdir / "tokenizer.json"
    return InitSource(str(path), wdir, files, layout, ours, config, shapes,
                      digest.hexdigest()[:16], tok if tok.is_file() else None)


SAMPLE_BYTES = 1 << 16


def _content_sample(file: Path) -> bytes:
    """The file's size and its first and last 64 KiB: enough that two checkpoints of one shape
    with different weights get different digests (headers alone are identical), without
    reading a multi-GB file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(SAMPLE_BYTES)
        f.seek(max(size - SAMPLE_BYTES, 0))
        tail = f.read(SAMPLE_BYTES)
    return str(size).encode() + head + tail


def _own_shapes(headers) -> dict[str, tuple]:
    return {k: tuple(v["shape"]) for _, h in headers for k, v in h.items()}


def _released_shapes(headers, layout: str) -> dict[str, tuple]:
    """The shapes `released_to_ours` will produce: per-expert tensors stacked, FP4 weights
    (two values per byte, with a `.scale`) unpacked, reference-inference shards concatenated
    along their split dimension; scales and the MTP embedding/head copies dropped."""
    merged: dict[str, list] = {}
    for _, header in headers:
        for stored, v in header.items():
            name = naming.released_to_ours(stored)
            if name is None:
                continue
            shape = list(v["shape"])
            if name not in merged:
                merged[name] = [v["dtype"], shape]
            elif layout == "mp":
                dim = naming.MP_SPLIT_DIM.get(naming.mp_split_key(stored))
                if dim is not None:
                    merged[name][1][dim] += shape[dim]
    shapes: dict[str, tuple] = {}
    experts: dict[str, dict[int, list]] = {}
    for name, (dtype, shape) in merged.items():
        if name.endswith(".scale"):
            continue
        if (name.endswith(".weight") and name[:-len("weight")] + "scale" in merged
                and dtype in _FP4_DTYPES):
            shape = [*shape[:-1], shape[-1] * 2]
        hit = naming.per_expert(name)
        if hit:
            experts.setdefault(f"{hit[0]}.{hit[2]}", {})[hit[1]] = shape
        else:
            shapes[name] = tuple(shape)
    for stacked, per in experts.items():
        shapes[stacked] = (len(per), *per[min(per)])
    return shapes


def config_differences(source: ModelConfig, model_cfg: ModelConfig,
                       overridden=()) -> list[str]:
    """Architecture fields where this run's config differs from the checkpoint's and that the
    user did not set explicitly."""
    ours, theirs = model_cfg.to_dict(), source.to_dict()
    return [f"{k}: checkpoint {theirs[k]!r} vs this run {v!r}" for k, v in ours.items()
            if k not in NON_ARCHITECTURE and k not in overridden and theirs.get(k) != v]


def check_fits(src: InitSource, model_cfg: ModelConfig, overridden=(), what: str = "init_from"
               ) -> None:
    """The checkpoint describes and holds this model (config fields, then every tensor)."""
    label = f"{what}={src.given}"
    diff = config_differences(src.config, model_cfg, overridden)
    if diff:
        fix = (f"The checkpoint's config is authoritative: pass model.preset="
               f"{src.path / 'config.json'}, or set a field you mean to change in "
               f"model.overrides (its tensors must still fit)." if what == "init_from"
               else _frozen_way_out(what))
        raise InitFromError(
            f"{label}: its config ({src.path / 'config.json'}) differs from this run's model "
            f"config in {len(diff)} field(s):\n  " + "\n  ".join(diff) + f"\n{fix}")
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in Transformer(model_cfg).state_dict().items()}
    lines = []
    got_vocab, want_vocab = src.shapes.get("embed.weight", (None,))[0], model_cfg.vocab_size
    if got_vocab is not None and got_vocab != want_vocab:
        lines.append(f"vocabulary: the checkpoint's embed.weight has {got_vocab} rows, this "
                     f"run's model vocab_size={want_vocab}")
    problem = ckpt._fit_problems(src.path, src.shapes, expected, model_cfg,
                                 _INIT_WAY_OUT if what == "init_from" else _frozen_way_out(what))
    if problem:
        lines.append(problem)
    if lines:
        raise InitFromError(f"{label}: " + "\n".join(lines))


def init_tokenizer_file(path: str | os.PathLike) -> str | None:
    """The tokenizer.json an init checkpoint carries (a step dir, its model/ dir, an export), or
    None. Post-training stages take their tokenizer from here."""
    try:
        tok = resolve_weights_dir(path) / "tokenizer.json"
    except FileNotFoundError:
        return None
    return str(tok.absolute()) if tok.is_file() else None


def _fingerprint(file: str | os.PathLike) -> str:
    from data.tokenizer_train import resolve_tokenizer, tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(resolve_tokenizer(file))
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises an error type it does not export
        raise InitFromError(f"{file}: unreadable tokenizer ({type(e).__name__}: {e})") from None


def check_tokenizer(checkpoint_tokenizer: str | os.PathLike | None,
                    run_tokenizer: str | os.PathLike | None, what: str = "init_from") -> None:
    """The run tokenizes with the tokenizer the checkpoint was trained with (same fingerprint:
    vocab, merges, special tokens), else an error naming both files."""
    if checkpoint_tokenizer is None or run_tokenizer is None:
        return
    if Path(checkpoint_tokenizer).resolve() == Path(run_tokenizer).resolve():
        return
    a, b = _fingerprint(checkpoint_tokenizer), _fingerprint(run_tokenizer)
    if a != b:
        fix = (f"Use the checkpoint's tokenizer (data.tokenizer={checkpoint_tokenizer}, or leave "
               f"data.tokenizer unset)" if what == "init_from" else _frozen_way_out(what))
        raise InitFromError(
            f"{what}: tokenizer mismatch: the checkpoint's {checkpoint_tokenizer} (fingerprint "
            f"{a}) differs from this run's {run_tokenizer} (fingerprint {b}); its embedding "
            f"rows mean other tokens. {fix}")


def stage_tokenizer(cfg, stage: str) -> str:
    """A post-training stage's tokenizer file: the starting checkpoint's (`init_from`), else
    `data.tokenizer` (a file or a directory holding tokenizer.json)."""
    tok = init_tokenizer_file(cfg.init_from) if cfg.init_from else None
    tok = tok or cfg.data.tokenizer
    if not tok:
        raise ValueError(f"{stage} needs a tokenizer: give init_from=CHECKPOINT (its "
                         f"tokenizer.json is used) or data.tokenizer=PATH")
    if os.path.isdir(tok):
        tok = os.path.join(tok, "tokenizer.json")
    if not os.path.isfile(tok):
        raise ValueError(f"data.tokenizer={tok}: no such file")
    return tok


def adopt_tokenizer(cfg) -> None:
    """Pre-training from `init_from` without `data.tokenizer`: use the checkpoint's tokenizer
    (the default one would be trained from this run's data and may differ). Call before the
    resolved config is written, so a resumed run reads the same file."""
    if getattr(cfg, "init_from", None) and cfg.data.tokenizer is None:
        tok = init_tokenizer_file(cfg.init_from)
        if tok is not None:
            cfg.data.tokenizer = tok


def check_init_from(cfg, model_cfg: ModelConfig, resuming: bool, is_main: bool = True
                    ) -> InitSource | None:
    """Trainer.__init__'s check: None without init_from or when the run resumes (logged), else
    the inspected source, checked against the model and tokenizer."""
    given = getattr(cfg, "init_from", None)
    if not given:
        return None
    if resuming:
        if is_main:
            print(f"init_from={given}: ignored, the run resumes from its own checkpoint in "
                  f"{ckpt.checkpoint_root(cfg.run_dir)} (checkpoint.resume="
                  f"{cfg.checkpoint.resume})", flush=True)
        return None
    src = inspect(given)
    check_fits(src, model_cfg, overridden=tuple(cfg.model.overrides or {}))
    check_tokenizer(src.tokenizer_file, cfg.data.tokenizer)
    return src


# ---------------------------------------------------------------------- loading
def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """load_pretrained's rule: floating tensors to `dtype`, the fp32-by-design ones stay fp32."""
    if dtype is None or not t.is_floating_point():
        return t
    return t.to(torch.float32 if _FP32_NAMES.search(name) else dtype)


def read_local_state(src: InitSource, ep_rank: int = 0, ep_size: int = 1,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                     ) -> dict[str, torch.Tensor]:
    """This EP rank's state dict in our naming: full dense tensors, experts
    [ep_rank·E/P, (ep_rank+1)·E/P) only (read as slices or per expert; module docstring)."""
    n_exp = src.config.n_routed_experts
    if n_exp % ep_size:
        raise InitFromError(f"init_from={src.given}: {n_exp} experts cannot be split over "
                            f"parallel.ep_size={ep_size}")
    lo, hi = ep_rank * n_exp // ep_size, (ep_rank + 1) * n_exp // ep_size
    if src.ours:
        return {k: _cast(k, t, dtype).to(device)
                for k, t in _read_own(src, lo, hi, ep_size).items()}

    def keep(stored: str) -> bool:
        name = naming.released_to_ours(stored)
        hit = naming.per_expert(name) if name is not None else None
        return name is not None and (hit is None or lo <= hit[1] < hi)

    tensors, where = read_tensors(src.files, src.layout, keep)
    if ep_size > 1:  # renumber this rank's experts from 0, so they stack as a local [E/P] stack
        def local(name: str) -> str:
            return _EXPERT_ID.sub(lambda m: f".experts.{int(m.group(1)) - lo}.", name)

        tensors = {local(k): t for k, t in tensors.items()}
        where = {local(k): f for k, f in where.items()}
    # released_to_ours reads only these two fields of the config
    local = SimpleNamespace(quantization=src.config.quantization, n_routed_experts=hi - lo)
    try:
        state = released_to_ours(tensors, where, local, dtype)
    except ValueError as e:
        raise InitFromError(f"init_from={src.given}: {e}") from None
    return {k: t.to(device) for k, t in state.items()}


def _read_own(src: InitSource, lo: int, hi: int, ep_size: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in src.files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if ep_size > 1 and ep.is_expert_param(name):
                        out[name] = f.get_slice(name)[lo:hi]
                    else:
                        out[name] = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - SafetensorError names no file
            raise WeightsFileError(f"{file}: unreadable weights file ({type(e).__name__}: "
                                   f"{e}); truncated or corrupt?") from None
    return out


@torch.no_grad()
def load_into(model: Transformer, src: InitSource) -> None:
    """Copies the source's weights into a materialised model (this rank's experts only under
    EP), into the model's own dtypes and device (read on the CPU, tensor by tensor)."""
    ep_rank, ep_size = getattr(model, "expert_parallel", (0, 1))
    dtype = next(model.parameters()).dtype
    state = read_local_state(src, ep_rank, ep_size, "cpu", dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes were checked from the headers; this is a safety net
        raise InitFromError(f"init_from={src.given}: {e}") from None


def apply_init_from(src: InitSource | None, model: Transformer, info, run_dir: str | Path,
                    task: Any = None) -> None:
    """Trainer.build's hook, after the model is materialised and before the optimizer sees it:
    loads the weights and records where the run started (rank 0)."""
    if src is None:
        return
    tokenizer = getattr(task, "tokenizer_file", None)
    check_tokenizer(src.tokenizer_file, tokenizer)  # a stage's own tokenizer, now known
    load_into(model, src)
    if info.is_main:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {**src.record(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = run_dir / "init_from.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, run_dir / "init_from.json")
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": 0, "init_from": record["path"],
                                "init_digest": src.digest}) + "\n")
        print(f"init_from: weights from {src.path} ({src.format}, digest {src.digest}); fresh "
              f"optimizer, step 0", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- frozen models
class FrozenModel(NamedTuple):
    model: Transformer
    config: ModelConfig
    tokenizer_file: str | None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it does not start on a 64-byte boundary: a tensor memory-mapped from a
    safetensors file starts wherever the file's header left it, and GEMM kernels take other
    code paths on such pointers (the CPU `_grouped_mm`'s sums differ from an aligned copy's in
    the last bit, so a frozen teacher would not reproduce the same weights' logits exactly)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def load_frozen_model(path: str | os.PathLike, device: torch.device | str,
                      dtype: torch.dtype | None = None, ep_groups: ep.EPGroups | None = None,
                      what: str = "frozen model") -> FrozenModel:
    """A model that is evaluated, never trained (GRPO's reference policy, a distillation
    teacher): eval mode, no parameter requires grad, no optimizer state; floating weights in
    `dtype` (e.g. torch.bfloat16; the fp32-by-design ones stay fp32; None: as stored, dequantised
    FP8/FP4 as bf16); sharded over `ep_groups` exactly like the policy (`ep.shard_model`), each
    rank reading only its experts. Built on the meta device, so only the final tensors are
    allocated. Errors name the file or tensor (InitFromError)."""
    src = inspect(path, what)
    cfg = src.config
    if cfg.n_mtp_layers and not any(k.startswith("mtp.") for k in src.shapes):
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers])
    check_fits(src, cfg, what=what)
    with torch.device("meta"):
        model = Transformer(cfg)
    ep_rank, ep_size = 0, 1
    if ep_groups is not None and ep_groups.ep_size > 1:
        ep.validate(cfg, ep_groups.ep_size * ep_groups.expert_dp_size, ep_groups.ep_size)
        ep.shard_model(model, ep_groups)
        ep_rank, ep_size = ep_groups.ep_rank, ep_groups.ep_size
    state = {k: _aligned(v) for k, v in read_local_state(src, ep_rank, ep_size, device,
                                                          dtype).items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.set_csa_mode(cfg.csa_mode)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return FrozenModel(model, cfg, str(src.tokenizer_file) if src.tokenizer_file else None)
