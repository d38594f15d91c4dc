"""Checkpoint directories: save ours, load ours / released Hugging Face / reference-inference.

Our format (what the trainer writes and `load_pretrained` reads back bit-exactly):

    config.json                    Hugging Face naming (`cfg.to_hf_dict()`) plus "v4lab": every
                                   ModelConfig field, so csa_mode, seed, ... survive
    model.safetensors              `model.state_dict()` names and dtypes, or above
    model-0000i-of-0000n.safetensors + model.safetensors.index.json   `max_shard_bytes`
    tokenizer.json                 optional copy

Written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under `path`.

`load_pretrained` detects the layout: our stacked-expert names; released files (`config.json` +
`model*.safetensors`, per-expert names, FP8/FP4 weights with scales, optional `model.` prefix);
reference-inference files (`model{rank}-mp{world}.safetensors`, merged across ranks). Quantised
weights are dequantised (quant.py) and everything is renamed to ours (naming.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import naming
from .config import ModelConfig
from .quant import dequant_fp4, dequant_fp8
from .transformer import Transformer

DEFAULT_SHARD_BYTES = 4 << 30
INDEX_FILE = "model.safetensors.index.json"
_MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
# kept in fp32 whatever the load dtype (fp32 in the release too; the model reads them in fp32)
_FP32_NAMES = re.compile(r"(attn_sink|\.ape|\.gate\.bias|(^|\.)hc_\w+)$")


# ---------------------------------------------------------------------- writing
class DestinationError(ValueError):
    """Refused to replace an existing directory that is not a previous output of ours."""


class WeightsFileError(ValueError):
    """A weights file that cannot be read (truncated, corrupt, not safetensors); the message
    starts with the file's path."""


# the names our writers put in a checkpoint / export directory (module docstring)
_OUR_FILES = re.compile(r"^(config\.json|tokenizer\.json|model\.safetensors(\.index\.json)?|"
                        r"model-\d{5}-of-\d{5}\.safetensors)$")


def is_previous_output(path: Path) -> bool:
    """A directory written by `save_pretrained` or export: only the files they write, and a
    config.json carrying the "v4lab" block (the marker)."""
    entries = list(path.iterdir())
    if not all(e.is_file() and not e.is_symlink() and _OUR_FILES.match(e.name) for e in entries):
        return False
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            return isinstance(json.load(f).get("v4lab"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuses (DestinationError) to replace `path` unless it is absent, an empty directory, a
    previous output of ours (`is_previous_output`) or `overwrite` is set. Replacing deletes
    what was there, so anything else (a run directory, a released download with its README,
    a file) must never be replaced by accident. Cheap: callers run it before any work."""
    path = Path(path)
    if overwrite or not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        raise DestinationError(f"{path}: exists and is not a directory; refusing to replace it "
                               f"(choose another destination, or pass --overwrite)")
    if not any(path.iterdir()) or is_previous_output(path):
        return
    names = sorted(e.name for e in path.iterdir())
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")
    raise DestinationError(f"{path}: destination is not empty and is not a previous v4lab "
                           f"checkpoint/export (it holds {shown}); writing there would delete "
                           f"it. Choose a new directory, or pass --overwrite (overwrite=True) "
                           f"to replace it and everything in it")


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary directory next to `path` that replaces `path` on success.
    `check_destination` runs before (so no work is wasted) and again just before the swap."""
    check_destination(path, overwrite)
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        check_destination(path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(path):
        old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, path)


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """`model.safetensors`, or numbered shards plus `model.safetensors.index.json`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(directory / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config(directory: Path, config: dict) -> None:
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def save_pretrained(model: Transformer, path: str | os.PathLike,
                    tokenizer_file: str | os.PathLike | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    overwrite: bool = False) -> None:
    """Writes `model` in our checkpoint format (module docstring) to directory `path`.
    `state_dict` replaces `model.state_dict()`, e.g. with expert stacks gathered from the
    expert-parallel ranks (the config always describes the full model). An existing `path`
    is replaced only if it is a previous checkpoint of ours or `overwrite` is set
    (`check_destination`)."""
    if tokenizer_file is not None and not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"tokenizer_file not found: {tokenizer_file}")
    check_destination(path, overwrite)
    config = model.cfg.to_hf_dict()
    config["v4lab"] = model.cfg.to_dict()
    config["v4lab"]["csa_mode"] = model.csa_mode
    with atomic_dir(path, overwrite) as tmp:
        write_config(tmp, config)
        write_tensors(tmp, model.state_dict() if state_dict is None else state_dict,
                      max_shard_bytes)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")


# ---------------------------------------------------------------------- reading
def resolve_weights_dir(path: str | os.PathLike) -> Path:
    """The weights directory a user means by `path`: the path itself (config.json +
    *.safetensors: `save_pretrained`, an export, a release), or, for a training checkpoint
    `runs/x/checkpoints/step_N` (weights under `model/`, spec in train/checkpoint.py), its
    `model/` subdirectory. Shared by generate.py's `ckpt=`, training's `init_from=` and frozen
    models, so they all accept the same paths."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir() or (path / "config.json").exists():
        return path  # load_pretrained says what is wrong with it, if anything
    inner = path / "model"
    if (inner / "config.json").is_file():
        return inner
    raise FileNotFoundError(f"{path}: no config.json, neither here nor in {inner} (give a "
                            f"weights directory with config.json + *.safetensors, or a "
                            f"training checkpoint step_N holding them under model/)")


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    return ModelConfig.from_json(file)


def tensor_files(path: Path) -> tuple[list[Path], str]:
    """The safetensors files of a checkpoint directory and their layout: 'index', 'single',
    'mp' (reference inference, ranks in order) or 'glob'."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({path / v for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsFileError(f"{index}: not a readable safetensors index "
                                   f"({type(e).__name__}: {e})") from None
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names {file.name}, which is missing")
        return files, "index"
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], "single"
    mp = sorted((int(m.group(1)), int(m.group(2)), p) for p in path.glob("*.safetensors")
                if (m := _MP_FILE.match(p.name)))
    if mp:
        world = mp[0][1]
        ranks = [r for r, w, _ in mp if w == world]
        if ranks != list(range(world)):
            raise FileNotFoundError(f"{path}: reference-inference shards for mp={world} are "
                                    f"incomplete (found ranks {ranks})")
        return [p for r, w, p in mp if w == world], "mp"
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint directory {path}")
    return files, "glob"


def read_tensors(files: list[Path], layout: str, keep: Callable[[str], bool] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors by stored name (reference-inference ranks merged), and the file of each.
    `keep(stored name)`: read only those (e.g. one expert-parallel rank's experts)."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file in files:
        for name, t in read_weights_file(file, keep=keep).items():
            if name not in tensors:
                tensors[name], where[name] = t, file.name
            elif layout == "mp" and naming.MP_SPLIT_DIM.get(naming.mp_split_key(name)) is not None:
                dim = naming.MP_SPLIT_DIM[naming.mp_split_key(name)]
                tensors[name] = torch.cat((tensors[name], t), dim=dim)
            elif layout != "mp":
                raise ValueError(f"{file.parent}: tensor {name} appears in both {where[name]} "
                                 f"and {file.name}")
    return tensors, where


def read_weights_file(file: str | os.PathLike, device: str = "cpu",
                      keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (or those `keep(name)` selects; the others are never
    read), in full (also for training's checkpoint loading). A truncated, corrupt or unreadable
    file is a WeightsFileError whose message starts with the file's path (safetensors' own error
    names no file)."""
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys() if keep is None or keep(name)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFileError(f"{file}: unreadable weights file ({type(e).__name__}: {e}); "
                               f"truncated or corrupt? (re-copy or re-export it)") from None


def released_to_ours(tensors: dict[str, torch.Tensor], where: dict[str, str], cfg: ModelConfig,
                     dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Renames, dequantises (FP8 blocks / FP4 experts) and stacks routed experts. Floating
    tensors are cast to `dtype`; with None, dequantised ones become bfloat16 (the release's
    compute dtype) and the others keep their stored dtype."""
    block = tuple(cfg.quantization.get("weight_block_size", (128, 128)))
    renamed: dict[str, tuple[torch.Tensor, str]] = {}
    for name, t in tensors.items():
        ours = naming.released_to_ours(name)
        if ours is not None:
            renamed[ours] = (t, where[name])
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, (t, file) in renamed.items():
        if name.endswith(".scale"):
            if name[:-len(".scale")] + ".weight" not in renamed:
                raise ValueError(f"{file}: scale tensor {name} has no weight "
                                 f"{name[:-len('.scale')]}.weight")
            continue
        scale = renamed.get(name[:-len(".weight")] + ".scale") if name.endswith(".weight") else None
        stored = t.dtype
        try:
            t = _dequantise(t, None if scale is None else scale[0], block)
        except ValueError as e:
            raise ValueError(f"{file}: tensor {name}: {e}") from None
        if t.is_floating_point():
            target = dtype or (torch.bfloat16 if t.dtype != stored else stored)
            t = t.to(torch.float32 if _FP32_NAMES.search(name) else target)
        if name.endswith("tid2eid"):
            t = t.long()
        hit = naming.per_expert(name)
        if hit:
            experts.setdefault((hit[0], hit[2]), {})[hit[1]] = t
        else:
            out[name] = t
    for (prefix, w), per in experts.items():
        ids = sorted(per)
        if ids != list(range(len(ids))) or len(ids) != cfg.n_routed_experts:
            missing = sorted(set(range(cfg.n_routed_experts)) - set(ids))
            raise ValueError(f"routed experts of {prefix}.{{e}}.{w}.weight: expected "
                             f"{cfg.n_routed_experts}, missing ids {missing[:8]}")
        out[f"{prefix}.{w}"] = torch.stack([per[e] for e in ids])
    return out


def _dequantise(t: torch.Tensor, scale: torch.Tensor | None, block) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise ValueError("float8 weight without a '.scale' tensor")
        return dequant_fp8(t, scale, block)
    if t.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
        if scale is None:
            raise ValueError(f"{t.dtype} weight without a '.scale' tensor (FP4 needs one)")
        return dequant_fp4(t, scale)
    if scale is not None:
        raise ValueError(f"has a '.scale' tensor but dtype {t.dtype} is not FP8/FP4")
    return t


def load_pretrained(path: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Transformer:
    """Loads a checkpoint directory in any supported layout (module docstring).

    dtype: floating tensors are cast to it, except the fp32-by-design ones (sinks, `ape`, mHC,
    router bias). Default: as stored, and dequantised FP8/FP4 weights as bfloat16."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ValueError(f"checkpoint must be a directory (config.json + *.safetensors): {path}")
    cfg = read_config(path)
    files, layout = tensor_files(path)
    tensors, where = read_tensors(files, layout)
    if naming.is_ours(tensors):
        state = {k: (v.to(torch.float32 if _FP32_NAMES.search(k) else dtype)
                     if dtype is not None and v.is_floating_point() else v)
                 for k, v in tensors.items()}
    else:
        state = released_to_ours(tensors, where, cfg, dtype)
        where = {naming.released_to_ours(k) or k: v for k, v in where.items()}
    if cfg.n_mtp_layers and not any(k.startswith("mtp.") for k in state):
        # transformers drops the MTP block when it saves; inference does not need it
        warnings.warn(f"{path}: no MTP tensors; loading without the MTP block")
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers])
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_state(model, state, where, path, files)
    model.load_state_dict(state, assign=True, strict=True)
    model.set_csa_mode(cfg.csa_mode)
    return model.to(device) if device is not None else model


def _check_state(model: Transformer, state: dict[str, torch.Tensor], where: dict[str, str],
                 path: Path, files: list[Path]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{path}: {len(missing)} tensor(s) missing from {names}, first: "
                         f"{missing[0]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise ValueError(f"{path}/{where.get(k, '?')}: unexpected tensor {k} (does config.json "
                         f"match the weights?)")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}/{where.get(k, '?')}: tensor {k} has shape {tuple(t.shape)},"
                             f" config.json implies {tuple(expected[k].shape)}")
