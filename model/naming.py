"""Checkpoint tensor names: ours, the released Hugging Face files, the reference-inference files.

Our parameter names already follow the release (`layers.N.attn.wq_a.weight`, `ffn.gate.bias`,
`hc_attn_fn`, ...). What differs:
- routed experts: ours are stacked `layers.N.ffn.experts.w1` `[E, inter, dim]`; released files
  hold one `layers.N.ffn.experts.E.w1.weight` per expert;
- released files may prefix `model.` and use V3 spellings (`self_attn`, `mlp`,
  `weight_scale_inv`, `e_score_correction_bias`), which the reference converter rewrites;
  directories written by transformers' `save_pretrained` add a few of its own (`_HF_SAVED`)
  and have no MTP block;
- quantised weights come with a `.scale` tensor (see quant.py);
- MTP blocks in released files carry copies of the embedding and head (`mtp.N.emb*`,
  `mtp.N.head.weight`), which the reference converter drops (ours shares the main ones);
- reference-inference files (`model{rank}-mp{world}.safetensors`) split some tensors across
  model-parallel ranks (`MP_SPLIT_DIM`) and routed experts by index range.
"""

from __future__ import annotations

import re

import torch

_STACKED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(w[123])$")
_PER_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
_MTP_COPY = re.compile(r"^mtp\.\d+\.(emb|embed|head)\b")
# spellings transformers' `save_pretrained` writes for DeepseekV4 (its reverse renaming is only
# partial: these four keep or gain their transformers names)
_HF_SAVED = [(re.compile(r"^embed_tokens\."), "embed."), (re.compile(r"^lm_head\."), "head."),
             (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
             (re.compile(r"^(layers\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight")]

# reference inference model parallelism: tensor key -> dim split across ranks
MP_SPLIT_DIM = {"embed": 0, "head": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "attn_sink": 0,
                "weights_proj": 0}


def is_ours(names) -> bool:
    """Our own format has stacked routed experts (`...ffn.experts.w1`)."""
    return any(_STACKED_EXPERT.match(n) for n in names)


def released_to_ours(name: str) -> str | None:
    """A released / reference-inference tensor name in our spelling (per-expert names kept);
    None for tensors we do not keep (the MTP blocks' embedding and head copies)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if _MTP_COPY.match(name):
        return None
    name = name.replace(".self_attn.", ".attn.").replace(".mlp.", ".ffn.")
    name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
    for pattern, repl in _HF_SAVED:
        name = pattern.sub(repl, name)
    return name


def per_expert(name: str) -> tuple[str, int, str, str] | None:
    """`layers.3.ffn.experts.7.w1.weight` → ('layers.3.ffn.experts', 7, 'w1', 'weight')."""
    m = _PER_EXPERT.match(name)
    return (m.group(1), int(m.group(2)), m.group(3), m.group(4)) if m else None


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → released naming (one tensor per routed expert, same dtype and values)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _STACKED_EXPERT.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out


def mp_split_key(name: str) -> str:
    """The reference converter's key for a tensor (its module name, or the tensor name for the
    weight-less tensors)."""
    parts = name.split(".")
    if any(x in name for x in ("hc", "attn_sink", "tid2eid", "ape")):
        return parts[-1]
    return parts[-2] if len(parts) > 1 else parts[-1]
