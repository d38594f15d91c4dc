"""Which optimizer updates which parameter: an explicit, name-based table checked at start-up.

DeepSeek-V4 (report §2.4): "We maintain the AdamW optimizer for the embedding module, the
prediction head module, the static biases and gating factors of mHC modules, and the weights of
all RMSNorm modules. All other modules are updated with Muon."

Why a table and not `ndim == 2`: the embedding and head are 2-D but belong to AdamW, and public
integrations have silently sent everything to AdamW (ZeRO-3 reports 1-D shapes) or to SGD. So
every trainable parameter must match rules of exactly one group; a parameter matching no rule,
or rules of both groups, stops construction with an error naming it.

Allow-list for the tensors the report leaves ambiguous (v4_architecture.md §10.2 "Open", §12.7).
Our choice, and why:

============================  ======  ===========================================================
tensor                        group   why
============================  ======  ===========================================================
``attn.attn_sink`` [H]        AdamW   a per-head logit bias (1-D), not a matrix
``compressor.ape`` [r, c·d]   AdamW   an additive positional bias; rows are positions, not a
                                      linear map, so orthogonalising it has no meaning
``ffn.gate.weight`` [E, d]    Muon    the router is a linear map d → E, one of "all other
                                      modules"; Muon per the report's wording
``hc_{attn,ffn,head}_fn``     Muon    the mHC *dynamic* projection is a linear map (24 × 4d); the
                                      report exempts only the static base and scale.
                                      (PaddleFormers puts all mHC on AdamW: use `overrides`.)
``attn.wo_a.weight``          Muon    orthogonalised per output group (o_groups independent maps,
                                      see `row_splits`), since each group is its own matrix
============================  ======  ===========================================================

`row_splits` (name → number of row blocks) says which 2-D weights are several logical matrices
stacked on the row axis; Muon orthogonalises and scales each block on its own. Stacked experts
[E, n, m] need no entry: every leading dim is a batch of independent matrices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

MUON, ADAMW = "muon", "adamw"


@dataclass(frozen=True)
class Rule:
    """`pattern` is searched (re.search) in the full parameter name."""

    pattern: str
    group: str
    why: str
    min_ndim: int = 0   # the rule only applies to tensors with at least this many dims
    max_ndim: int = 99  # ... and at most this many

    def matches(self, name: str, ndim: int) -> bool:
        return self.min_ndim <= ndim <= self.max_ndim and re.search(self.pattern, name) is not None


ADAMW_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)embed\.weight$", ADAMW, "embedding"),
    Rule(r"(^|\.)head\.weight$", ADAMW, "output (prediction) head"),
    Rule(r"(^|\.)\w*norm\.weight$", ADAMW, "RMSNorm weight"),
    Rule(r"(^|\.)hc_\w+_base$", ADAMW, "mHC static bias"),
    Rule(r"(^|\.)hc_\w+_scale$", ADAMW, "mHC gating factor"),
    Rule(r".", ADAMW, "1-D tensor", max_ndim=1),
    # allow-list (ambiguous in the report; see the module docstring)
    Rule(r"(^|\.)attn_sink$", ADAMW, "allow-list: attention-sink logit bias"),
    Rule(r"(^|\.)compressor\.ape$", ADAMW, "allow-list: compressor positional bias"),
)

# Muon rules match on names only: a Muon-named tensor that is not a matrix (e.g. a placeholder
# shape) then also matches the 1-D AdamW rule and fails, instead of silently going to AdamW.
MUON_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)attn\.(wq_a|wq_b|wkv|wo_b)\.weight$", MUON, "attention projection"),
    Rule(r"(^|\.)compressor\.(wkv|wgate)\.weight$", MUON, "compressor projection"),
    Rule(r"(^|\.)indexer\.(wq_b|weights_proj)\.weight$", MUON, "indexer projection"),
    Rule(r"(^|\.)experts\.w[123]$", MUON, "routed experts (per expert)"),
    Rule(r"(^|\.)shared_experts\.w[123]\.weight$", MUON, "shared expert"),
    Rule(r"(^|\.)(e_proj|h_proj)\.weight$", MUON, "MTP projection"),
    # allow-list (ambiguous in the report; see the module docstring)
    Rule(r"(^|\.)ffn\.gate\.weight$", MUON, "allow-list: MoE router"),
    Rule(r"(^|\.)hc_\w+_fn$", MUON, "allow-list: mHC dynamic projection"),
    Rule(r"(^|\.)attn\.wo_a\.weight$", MUON, "allow-list: grouped output projection"),
)

DEFAULT_RULES: tuple[Rule, ...] = ADAMW_RULES + MUON_RULES

# name pattern -> row blocks: an int, or the name of a model-config attribute holding it
DEFAULT_ROW_SPLITS: dict[str, int | str] = {r"(^|\.)attn\.wo_a\.weight$": "o_groups"}


def logical_shape(p: torch.Tensor) -> torch.Size:
    """The full shape, also under DeepSpeed `zero.Init` (which leaves a (0,) placeholder)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def assign(name: str, shape: torch.Size, rules: Iterable[Rule] = DEFAULT_RULES,
           overrides: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(group, reason) for one parameter; raises if it matches no rule or both groups."""
    ndim = len(shape)
    for pattern, group in (overrides or {}).items():
        if re.search(pattern, name):
            _check_group(group, f"override {pattern!r}")
            if group == MUON and ndim < 2:
                raise ValueError(f"parameter {name!r} {tuple(shape)}: override {pattern!r} sends "
                                 f"a {ndim}-D tensor to Muon, which needs matrices")
            return group, f"override {pattern!r}"
    hits = [r for r in rules if r.matches(name, ndim)]
    groups = {r.group for r in hits}
    if not groups:
        raise ValueError(
            f"parameter {name!r} {tuple(shape)} matches no optimizer rule: add it to "
            f"optim.groups (MUON_RULES / ADAMW_RULES) or pass overrides={{pattern: 'muon'|'adamw'}}")
    if len(groups) > 1:
        listed = "; ".join(f"{r.group}: {r.why} ({r.pattern})" for r in hits)
        raise ValueError(f"parameter {name!r} {tuple(shape)} matches rules of both groups "
                         f"({listed}); resolve it with overrides={{...}}")
    return hits[0].group, hits[0].why


def _check_group(group: str, where: str) -> None:
    if group not in (MUON, ADAMW):
        raise ValueError(f"{where}: group must be {MUON!r} or {ADAMW!r}, got {group!r}")


def resolve_row_blocks(name: str, shape: torch.Size, row_splits: Mapping[str, int | str],
                       model_config: Any) -> int:
    """How many independent row blocks a Muon matrix holds (1 unless a `row_splits` entry says)."""
    for pattern, spec in row_splits.items():
        if not re.search(pattern, name):
            continue
        if isinstance(spec, str):
            if model_config is None or not hasattr(model_config, spec):
                raise ValueError(
                    f"parameter {name!r}: row split {pattern!r} needs model_config.{spec}, but no "
                    f"model config was found (pass model_config=..., or row_splits={{}} to "
                    f"orthogonalise it as one matrix)")
            spec = int(getattr(model_config, spec))
        k = int(spec)
        if k < 1 or shape[-2] % k:
            raise ValueError(f"parameter {name!r} {tuple(shape)}: {shape[-2]} rows cannot be "
                             f"split into {k} blocks ({pattern!r})")
        return k
    return 1


def param_groups(model: nn.Module, *, rules: Iterable[Rule] = DEFAULT_RULES,
                 overrides: Mapping[str, str] | None = None,
                 row_splits: Mapping[str, int | str] | None = None,
                 model_config: Any = None) -> list[dict[str, Any]]:
    """Two parameter groups for `MuonAdamW`: [Muon group, AdamW group] (empty ones dropped).

    Each group carries `param_names` (torch's convention) and, for Muon, `row_blocks` per param.
    Frozen parameters (requires_grad=False) are left out. The model config (for `row_splits`)
    defaults to `model.cfg` / `model.config` / `model.args`.
    """
    rules = tuple(rules)
    row_splits = DEFAULT_ROW_SPLITS if row_splits is None else row_splits
    if model_config is None:
        model_config = next((getattr(model, a) for a in ("cfg", "config", "args")
                             if getattr(model, a, None) is not None), None)
    muon: dict[str, list] = {"params": [], "param_names": [], "row_blocks": []}
    adamw: dict[str, list] = {"params": [], "param_names": []}
    seen: dict[int, tuple[str, str]] = {}
    # remove_duplicate=False: a tensor shared under two names must agree on its group
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        shape = logical_shape(p)
        group, _ = assign(name, shape, rules, overrides)
        if id(p) in seen:
            first, first_group = seen[id(p)]
            if first_group != group:
                raise ValueError(f"parameter {name!r} is the same tensor as {first!r} but lands in "
                                 f"{group!r} while {first!r} lands in {first_group!r}")
            continue
        seen[id(p)] = (name, group)
        if group == MUON:
            muon["params"].append(p)
            muon["param_names"].append(name)
            muon["row_blocks"].append(resolve_row_blocks(name, shape, row_splits, model_config))
        else:
            adamw["params"].append(p)
            adamw["param_names"].append(name)
    out = [dict(muon, use_muon=True), dict(adamw, use_muon=False)]
    return [g for g in out if g["params"]]


def summarize(groups: list[dict[str, Any]]) -> str:
    """The start-up log line: tensors and parameters per optimizer."""
    parts = []
    for label, flag in (("Muon", True), ("AdamW", False)):
        ps = [p for g in groups if bool(g.get("use_muon")) is flag for p in g["params"]]
        n = sum(logical_shape(p).numel() for p in ps)
        parts.append(f"{label}: {n:,} parameters in {len(ps)} tensors")
    return "optimizer groups: " + "; ".join(parts)
