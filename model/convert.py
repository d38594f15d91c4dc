"""Hugging Face interop: export our checkpoints to a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads as `DeepseekV4ForCausalLM`, and import
such directories (or the released weights) back.

    python -m model.convert export SRC DST [--dtype bfloat16] [--shard-gb 4] [--overwrite]
        (SRC: a weights directory, or a training checkpoint runs/x/checkpoints/step_N)
    python -m model.convert import SRC DST [--dtype float32] [--overwrite]

DST is written atomically (a temporary sibling renamed into place). An existing DST is replaced
only if it is a previous checkpoint/export of ours (only our files, config.json with the
"v4lab" block); anything else (a run directory, a released download) is refused before any work
unless `--overwrite` says to replace it and everything in it.

The exported tensors use the released naming (per-expert `layers.N.ffn.experts.E.w1.weight`,
unquantised), which transformers' own conversion mapping renames on load; MTP blocks are
written too (transformers ignores them, our import keeps them), so ours → HF → ours is
bit-exact. config.json gets what transformers needs on top of `to_hf_dict()`: `layer_types`
and `compress_rates`, because transformers keeps one ratio per layer type (it cannot express
two different HCA ratios; export refuses such a config), plus the "v4lab" block with our full
config for the way back.

Where transformers' DeepseekV4 differs from the released reference code (we follow the
reference): see model/INFERENCE.md, "transformers vs the reference".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from . import naming
from .config import CSA_RATIO, ModelConfig
from .transformer import Transformer
from .weights import (DEFAULT_SHARD_BYTES, _FP32_NAMES, atomic_dir, check_destination,
                      load_pretrained, resolve_weights_dir, save_pretrained, write_config,
                      write_tensors)

_HF_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
             "hca": "heavily_compressed_attention"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, csa_mode: str | None = None) -> dict:
    """`config.json` for transformers' `DeepseekV4Config` (unquantised weights)."""
    hca = sorted({r for r in cfg.compress_ratios[:cfg.n_layers] if r and r != CSA_RATIO})
    if len(hca) > 1:
        raise ValueError(f"compress_ratios={list(cfg.compress_ratios)}: transformers' "
                         f"DeepseekV4Config holds one HCA ratio, this model uses {hca}")
    out = cfg.to_hf_dict()
    out.pop("quantization_config", None)  # exported weights are plain floats
    out.pop("expert_dtype", None)
    out["layer_types"] = [_HF_TYPES[cfg.layer_kind(i)] for i in range(cfg.n_layers)]
    out["compress_rates"] = {"compressed_sparse_attention": CSA_RATIO,
                             "heavily_compressed_attention": hca[0] if hca else 128}
    out["torch_dtype"] = out["dtype"] = str(dtype).removeprefix("torch.")
    out["v4lab"] = cfg.to_dict()
    if csa_mode is not None:
        out["v4lab"]["csa_mode"] = csa_mode
    return out


def export_hf(model: Transformer, dst: str | os.PathLike, dtype: torch.dtype | None = None,
              tokenizer_file: str | os.PathLike | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    """Writes `model` as a Hugging Face directory. `dtype` casts floating tensors (not the
    fp32-by-design ones); default: as stored. `overwrite`: see `weights.check_destination`."""
    check_destination(dst, overwrite)
    state = {}
    for name, t in model.state_dict().items():
        if dtype is not None and t.is_floating_point() and not _FP32_NAMES.search(name):
            t = t.to(dtype)
        state[name] = t
    stored = dtype or model.embed.weight.dtype
    with atomic_dir(dst, overwrite) as tmp:
        write_config(tmp, hf_config(model.cfg, stored, model.csa_mode))
        write_tensors(tmp, naming.split_experts(state), max_shard_bytes)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")


def import_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    """Any supported directory (exported, released, reference-inference) → our format."""
    check_destination(dst, overwrite)
    model = load_pretrained(src, dtype=dtype)
    tok = Path(src) / "tokenizer.json"
    save_pretrained(model, dst, tokenizer_file=tok if tok.is_file() else None,
                    max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"--dtype {name!r}: not a torch floating dtype (e.g. bfloat16, float32)")
    return dt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=("export", "import"))
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default=None, help="cast floating weights (default: keep)")
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST even if it is not a previous checkpoint/export")
    args = parser.parse_args(argv)
    shard = int(args.shard_gb * 2**30)
    try:
        check_destination(args.dst, args.overwrite)  # before loading anything
        _dtype(args.dtype)
        if args.direction == "export":
            src = resolve_weights_dir(args.src)  # a training checkpoint step_N: its model/
            model = load_pretrained(src)
            tok = src / "tokenizer.json"
            export_hf(model, args.dst, _dtype(args.dtype), tok if tok.is_file() else None, shard,
                      overwrite=args.overwrite)
        else:
            import_hf(args.src, args.dst, _dtype(args.dtype), shard, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
