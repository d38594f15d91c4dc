"""Rollouts as data: scored samples → padded micro-batches the on-policy losses read (GRPO,
distillation).

A micro-batch of `b` samples, each prompt + response (tool-result tokens included), right-padded
to the longest, `L` tokens:

    input_ids     [b, L]        int64   prompt + response, padding = pad_id
    token_mask    [b, L]        bool    real tokens (padding is computed, never counted)
    routes        [b, L, layers, topk]  int32  the experts every layer used while sampling
    loss_mask     [b, L-1]      fp32    1 where logits[:, t] predict a generated token t+1
    sampler_logp  [b, L-1]      fp32    the sampler's processed log-probs there (0 elsewhere)
    old_logp      [b, L-1]      fp32    π_old (= sampler_logp unless recomputed)
    ref_logp      [b, L-1]      fp32    the reference policy's (GRPO, only when β > 0)
    advantages    [b]           fp32    (GRPO; 0 where a stage has none)
    beta          [b]           fp32    per-domain KL weight (GRPO)
    kept_ids, kept_counts               the kept-token sets of the loss_mask positions in
                                        row-major order (`KeptSets`), absent when sampling kept
                                        the whole vocabulary

Targets are `input_ids[:, 1:]`; position t of every `[b, L-1]` tensor belongs to the token at
t+1. Inserted tokens (tool results) and the prompt have loss_mask 0, so they are context only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from model.sampling import KeptSets


def collate(samples: Sequence[Any], advantages: Sequence[float], betas: Sequence[float],
            pad_id: int, n_layers: int, topk: int, keep_routing: bool) -> dict[str, Any]:
    """`samples`: `train.rollout.Sample`s (with `routes` when `keep_routing`)."""
    b = len(samples)
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    token_mask = torch.zeros(b, width, dtype=torch.bool)
    loss_mask = torch.zeros(b, width - 1)
    sampler = torch.zeros(b, width - 1)
    routes = torch.zeros(b, width, n_layers, topk, dtype=torch.int32) if keep_routing else None
    kept_parts, any_kept = [], False
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        token_mask[i, :p + r] = True
        if r:
            loss_mask[i, p - 1:p + r - 1] = torch.tensor(s.loss_mask, dtype=torch.float32)
            sampler[i, p - 1:p + r - 1] = s.logprobs.float()
        if keep_routing:
            if s.routes is None or s.routes.shape[0] < p + r:
                raise ValueError(f"{s.item_id}: keep_routing needs the sampled routes of every "
                                 f"token; the rollout returned "
                                 f"{None if s.routes is None else tuple(s.routes.shape)}")
            routes[i, :p + r] = s.routes[:p + r].to(torch.int32)
        kept = getattr(s, "kept", None)
        if kept is not None:
            any_kept = True
            if len(kept) != int(sum(s.loss_mask)):
                raise ValueError(f"{s.item_id}: {len(kept)} kept sets for "
                                 f"{int(sum(s.loss_mask))} generated tokens")
        kept_parts.append(kept)
    batch = {"input_ids": ids, "token_mask": token_mask, "loss_mask": loss_mask,
             "sampler_logp": sampler, "old_logp": sampler.clone(),
             "advantages": torch.tensor(list(advantages), dtype=torch.float32),
             "beta": torch.tensor(list(betas), dtype=torch.float32)}
    if keep_routing:
        batch["routes"] = routes
    if any_kept:
        if any(k is None for k in kept_parts):
            raise ValueError("kept sets: some samples have them and some do not (one sampling "
                             "configuration per rollout)")
        kept = KeptSets.cat(kept_parts)
        batch["kept_ids"], batch["kept_counts"] = kept.ids, kept.counts
    return batch


def kept_sets(batch: dict[str, Any]) -> KeptSets | None:
    if "kept_ids" not in batch:
        return None
    return KeptSets(batch["kept_ids"], batch["kept_counts"])


def route_list(batch: dict[str, Any], n_layers: int, n_mtp: int) -> list | None:
    """`Transformer.forward`'s `routes=`: one `[b, L, topk]` per main layer, None per MTP block."""
    routes = batch.get("routes")
    if routes is None:
        return None
    return [routes[:, :, layer] for layer in range(n_layers)] + [None] * n_mtp
