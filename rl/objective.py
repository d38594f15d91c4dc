"""The DeepSeek-V3.2 GRPO objective as pure tensor functions (no model, no trainer).

Per sampled token t of response o_i (the loss to *minimise* is the negative objective):

    loss_{i,t} = -( min(r_{i,t}·Â_i, clip(r_{i,t}, 1-ε_low, 1+ε_high)·Â_i)·M_i - β_i·D̂_{i,t} )
    r_{i,t}    = π_θ(o_{i,t}) / π_old(o_{i,t})                      (importance ratio)
    D̂_{i,t}    = w_{i,t}·(ρ_{i,t} - log ρ_{i,t} - 1), ρ = π_ref/π_θ, w = π_θ/π_old  (unbiased k3)
    Â_i        = R_i - mean_j R_j   (V3.2)   or   (R_i - mean_j R_j) / (std_j R_j + eps)   (R1)
    M_i        = 0 iff Â_i < 0 and mean_t log(π_sampler/π_θ)(o_{i,t}) > δ, else 1     (OPSM)

and the per-token losses are aggregated by `loss_agg`.

Why each choice:
- Mean-only advantage (`adv_norm=mean`, DeepSeek-V3.2 §3.1; also Dr.GRPO, arXiv 2503.20783): the
  /std of DeepSeekMath/R1 up-weights groups whose rewards barely differ (near-solved or
  near-impossible prompts). `mean_std` is kept for R1 parity and uses the population std
  (unbiased=False), so a normalised group has std exactly 1 up to eps; TRL/verl use Bessel's
  correction, which only rescales every advantage by sqrt((G-1)/G), a constant the learning rate
  absorbs. A group whose rewards are all equal gets exactly zero advantages (forced with a
  `where`, since a float `R - mean(R)` of equal values is not always exactly 0, e.g. 7 × 0.7,
  and /(0+eps) would blow that rounding up).
- Clip-higher (ε_high > ε_low, DAPO arXiv 2503.14476): a larger upper bound lets low-probability
  tokens with positive advantage grow, which counters entropy collapse.
- Unbiased KL (V3.2 Eq. 7): E_{π_old}[w · k3] = KL(π_θ‖π_ref) exactly when w = π_θ/π_old, and w is
  kept attached to the graph. With x = log π_θ, o = log π_old, r = log π_ref:
      f(x)  = e^{x-o} (e^{r-x} - (r-x) - 1) = e^{r-o} - e^{x-o}(r-x) - e^{x-o}
      f'(x) = -e^{x-o}(r-x) + e^{x-o} - e^{x-o} = e^{x-o} (x - r) = w · (log π_θ - log π_ref),
  a gradient linear in the log-ratio, whereas plain k3 (`kl_unbiased=False`) has
  d/dx (e^{r-x} - (r-x) - 1) = 1 - e^{r-x}, which is unbounded where π_θ ≪ π_ref. β may differ per
  domain (V3.2 found weak or no KL better for maths), hence the per-sample `beta` argument.
- OPSM (V3.2 §3.1): drop only negative-advantage samples that are far off-policy; the sampler's
  (engine's) log-probs are the behaviour policy, so the mask covers both staleness and
  train/inference mismatch. It is a constant (no gradient).
- Loss aggregation: `seq-mean-token-mean` is GRPO as published (1/G Σ_i 1/|o_i| Σ_t);
  `token-mean` is DAPO's token-level loss (long responses are not down-weighted per token);
  `seq-mean-token-sum-norm` is Dr.GRPO (a constant `norm_len`, e.g. the maximum response tokens,
  instead of |o_i|, removing the length bias).

Units rule. `aggregate` returns (sum, count) with the count taken from the mask alone
(`unit_count`), so the trainer can compute it before the forward. The trainer's loss is
Σ sums / Σ counts over all micro-batches and ranks, which makes the gradient independent of how
the global batch is cut:
- token-mean: count = trained tokens;
- both seq modes: count = sequences with at least one trained token. A sequence with no trained
  token (a padding row, a fully masked truncated sample) carries no signal and does not count,
  so padding a micro-batch with empty rows cannot change the loss scale. OPSM-masked sequences
  do count (their KL term still trains, and dropping them must not up-weight the others).
Metrics are sums in the same units: `pg_loss` and `kl` are aggregated exactly like the loss (so
total = pg_loss + β·kl for a scalar β); the diagnostics (`clip_low_frac`, `clip_high_frac`,
`ratio`, `opsm_masked`, and `mismatch_kl` = the k3 estimate exp(d) - d - 1, d = log π_θ/π_sampler,
of KL(sampler‖π_θ) on the sampled tokens) are per-token means per unit — over all trained tokens for
token-mean, per sequence then summed for the seq modes (Dr.GRPO's /norm_len would make a
fraction depend on response length) — so "metric / global count" is a plain mean (for
`opsm_masked`: the fraction of masked sequences, or of tokens in masked sequences under
token-mean).

Padding (mask 0: padding, prompt, tool-result tokens) may hold any value, e.g. ±1e4 or inf: every
input is passed through `torch.where(mask, x, 0)` before use (never multiplied by the mask), so
padding changes neither values nor gradients. Everything is computed in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
ADV_NORMS = ("mean", "mean_std")
METRICS = ("pg_loss", "kl", "clip_low_frac", "clip_high_frac", "ratio", "opsm_masked",
           "mismatch_kl")


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ObjectiveConfig:
    clip_low: float = 0.2        # ε_low: the ratio's lower bound is 1 - ε_low
    clip_high: float = 0.28      # ε_high (clip-higher, DAPO): upper bound 1 + ε_high
    beta: float = 0.0            # KL coefficient; a per-sample [S] tensor via grpo_loss(beta=...)
    kl_unbiased: bool = True     # V3.2: k3 weighted by π_θ/π_old (attached); False = plain k3
    opsm_delta: float | None = None   # off-policy sequence masking threshold δ; None = off
    loss_agg: str = "seq-mean-token-mean"
    norm_len: int | None = None  # constant length for seq-mean-token-sum-norm (required there)

    def validate(self) -> None:
        """ValueError naming the first bad field (cheap; call at start-up)."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"grpo.{name}={getattr(self, name)!r}: {why}")

        if not (_finite_number(self.clip_low) and 0 <= self.clip_low < 1):
            bad("clip_low", "must be a number in [0, 1) (the lower ratio bound 1-clip_low > 0)")
        if not (_finite_number(self.clip_high) and self.clip_high >= 0):
            bad("clip_high", "must be a finite number >= 0")
        if not (_finite_number(self.beta) and self.beta >= 0):
            bad("beta", "must be a finite number >= 0")
        if not isinstance(self.kl_unbiased, bool):
            bad("kl_unbiased", "must be true or false")
        if self.opsm_delta is not None and not (_finite_number(self.opsm_delta)
                                                and self.opsm_delta >= 0):
            bad("opsm_delta", "must be null (off) or a finite number >= 0")
        if self.loss_agg not in LOSS_AGGS:
            bad("loss_agg", f"choose one of {', '.join(LOSS_AGGS)}")
        if self.norm_len is not None and not (isinstance(self.norm_len, int)
                                              and not isinstance(self.norm_len, bool)
                                              and self.norm_len > 0):
            bad("norm_len", "must be null or a positive integer")
        if self.loss_agg == "seq-mean-token-sum-norm" and self.norm_len is None:
            bad("norm_len", "loss_agg=seq-mean-token-sum-norm needs a constant length "
                            "(Dr.GRPO: the maximum response tokens)")


# ---------------------------------------------------------------------------------- advantages
def group_advantages(rewards: Tensor, norm: str = "mean", eps: float = 1e-6) -> Tensor:
    """rewards [groups, G] -> advantages [groups, G] fp32, one scalar per sample (applied to every
    token of it). `mean`: R - mean(R) (V3.2); `mean_std`: (R - mean(R)) / (std(R) + eps) with the
    population std (R1). An all-equal group gives exactly 0."""
    if norm not in ADV_NORMS:
        raise ValueError(f"grpo.adv_norm={norm!r}: choose one of {', '.join(ADV_NORMS)}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape [groups, G], got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: a group needs G >= 2 samples for a baseline, got "
                         f"G={rewards.shape[1]}")
    if not (_finite_number(eps) and eps > 0):
        raise ValueError(f"eps={eps!r}: must be a finite number > 0")
    r = rewards.detach().double()                                # [groups, G]
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards: contains a non-finite value (a reward function returned "
                         "nan/inf)")
    flat = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)    # [groups, 1] all-equal groups
    adv = torch.where(flat, torch.zeros_like(r), r - r.mean(1, keepdim=True))
    if norm == "mean_std":
        adv = adv / (r.std(1, keepdim=True, unbiased=False) + eps)
    return adv.float()


# ------------------------------------------------------------------------------------- helpers
def _as_mask(mask: Tensor) -> Tensor:
    """Any dtype -> bool [S, T]: nonzero = trained token."""
    return mask if mask.dtype == torch.bool else mask != 0


def _clean(x: Tensor, m: Tensor) -> Tensor:
    """fp32 copy with 0 at padding; `where` (not a product) so inf/nan there cannot leak into
    values or gradients."""
    return torch.where(m, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def _check_mode(mode: str, norm_len: int | None = None) -> None:
    if mode not in LOSS_AGGS:
        raise ValueError(f"grpo.loss_agg={mode!r}: choose one of {', '.join(LOSS_AGGS)}")
    if mode == "seq-mean-token-sum-norm" and not (isinstance(norm_len, int) and norm_len > 0):
        raise ValueError(f"grpo.norm_len={norm_len!r}: seq-mean-token-sum-norm needs a "
                         f"positive constant length")


def _mean_mode(mode: str) -> str:
    """The aggregation that turns a per-token diagnostic into a plain mean in `mode`'s units."""
    return "token-mean" if mode == "token-mean" else "seq-mean-token-mean"


def unit_count(mask: Tensor, mode: str) -> float:
    """The units a micro-batch contributes to the global count (see the module's units rule):
    trained tokens for token-mean, sequences with >= 1 trained token for the seq modes. Depends on
    the mask alone, so a Task's `count(batch)` can call it before any forward."""
    _check_mode(mode, 1)
    m = _as_mask(mask)                                           # [S, T]
    return float(m.sum()) if mode == "token-mean" else float(m.any(1).sum())


def _agg_sum(per_token: Tensor, m: Tensor, mode: str, norm_len: int | None) -> Tensor:
    x = _clean(per_token, m)                                     # [S, T]
    if mode == "token-mean":
        return x.sum()
    rows = x.sum(1)                                              # [S]
    if mode == "seq-mean-token-mean":
        return (rows / m.sum(1).clamp_min(1)).sum()              # empty rows add exactly 0
    return rows.sum() / norm_len


def aggregate(per_token: Tensor, mask: Tensor, mode: str,
              norm_len: int | None = None) -> tuple[Tensor, float]:
    """per_token [S, T], mask [S, T] -> (sum [] fp32, count) with the loss = Σ sums / Σ counts
    over micro-batches and ranks:
      token-mean:              (Σ_{i,t} x·m,                 trained tokens)
      seq-mean-token-mean:     (Σ_i Σ_t x·m / max(|o_i|, 1), sequences with |o_i| >= 1)
      seq-mean-token-sum-norm: (Σ_i Σ_t x·m / norm_len,      sequences with |o_i| >= 1)"""
    _check_mode(mode, norm_len)
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"aggregate: per_token {tuple(per_token.shape)} and mask "
                         f"{tuple(mask.shape)} must both be [S, T]")
    m = _as_mask(mask)
    return _agg_sum(per_token, m, mode, norm_len), unit_count(m, mode)


# ----------------------------------------------------------------------------- objective parts
def off_policy_mask(advantages: Tensor, sampler_logp: Tensor, logp: Tensor, mask: Tensor,
                    delta: float | None) -> Tensor:
    """advantages [S], sampler_logp / logp / mask [S, T] -> M [S] fp32 in {0, 1}, no gradient.
    M_i = 0 iff Â_i < 0 and the mean over trained tokens of log(π_sampler/π_θ) exceeds δ; a
    sequence without trained tokens has mean 0 and is kept. None -> all ones."""
    if delta is None:
        return torch.ones(advantages.shape[0], dtype=torch.float32, device=advantages.device)
    m = _as_mask(mask)
    with torch.no_grad():
        gap = _clean(sampler_logp, m) - _clean(logp.detach(), m)        # [S, T], 0 at padding
        mean_gap = gap.sum(1) / m.sum(1).clamp_min(1)                   # [S]
        return stale_keep(mean_gap, delta, advantages)


def stale_keep(mean_gap: Tensor, delta: float, advantages: Tensor | None = None) -> Tensor:
    """The off-policy sequence mask's rule, shared by GRPO and distillation: keep [S] fp32 in
    {0, 1}, 0 where a sequence's mean log(π_old/π_θ) over its trained tokens (`mean_gap` [S])
    exceeds δ, and, given `advantages` [S] (GRPO), only where its advantage is negative (a stale
    sample that is reinforced still teaches the right direction)."""
    drop = mean_gap > delta
    if advantages is not None:
        drop = (advantages.detach().float() < 0) & drop
    return (~drop).float()


def surrogate(ratio: Tensor, advantages: Tensor, clip: tuple[float, float] | None = None):
    """The importance-weighted policy-gradient objective per token: ratio·Â, or PPO's clipped
    min(ratio·Â, clip(ratio, lo, hi)·Â) with `clip` = (lo, hi). GRPO clips; distillation's
    task-reward term (`distill.reward_coef`) does not."""
    if clip is None:
        return ratio * advantages
    return torch.minimum(ratio * advantages, ratio.clamp(*clip) * advantages)


def kl_penalty(logp: Tensor, ref_logp: Tensor, old_logp: Tensor, unbiased: bool = True) -> Tensor:
    """Per-token KL estimate [S, T] fp32. k3 = ρ - log ρ - 1 with ρ = π_ref/π_θ (computed as
    expm1(d) - d, d = log ρ, which keeps precision where ρ ≈ 1). `unbiased` (V3.2): times
    w = exp(logp - old_logp) with the graph attached through logp (old and ref are constants);
    its gradient is w·(logp - ref_logp) (derivation in the module docstring). The inputs are used
    as given: mask padding first (grpo_loss does)."""
    x = logp.float()                                             # [S, T] differentiable
    d = ref_logp.detach().float() - x                            # [S, T] log ρ
    k3 = torch.expm1(d) - d
    if not unbiased:
        return k3
    return torch.exp(x - old_logp.detach().float()) * k3


@dataclass
class ObjectiveOutput:
    total: Tensor                 # [] the loss (negative objective) as a sum in `count` units
    count: float                  # units of this micro-batch (unit_count of the mask)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name -> [] sum, same units


def _beta(cfg: ObjectiveConfig, beta, S: int, device) -> float | Tensor:
    """cfg.beta or the override: a float, or a per-sample [S, 1] fp32 tensor."""
    if beta is None:
        beta = cfg.beta
    if isinstance(beta, Tensor):
        if beta.dim() == 0:
            beta = float(beta)
        else:
            if tuple(beta.shape) != (S,):
                raise ValueError(f"beta: expected a float or a per-sample tensor [S]={S}, got "
                                 f"shape {tuple(beta.shape)}")
            b = beta.detach().to(device=device, dtype=torch.float32)
            if not bool((torch.isfinite(b) & (b >= 0)).all()):
                raise ValueError("beta: every per-sample value must be finite and >= 0")
            return b[:, None]
    if not (_finite_number(beta) and beta >= 0):
        raise ValueError(f"beta={beta!r}: must be a finite number >= 0")
    return float(beta)


def _check_inputs(logp, old_logp, sampler_logp, ref_logp, advantages, mask) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [S, T], got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "sampler_logp": sampler_logp, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, t in named.items():
        if t.shape != logp.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from logp's "
                             f"{tuple(logp.shape)}")
    if tuple(advantages.shape) != (logp.shape[0],):
        raise ValueError(f"advantages: expected shape [S]=({logp.shape[0]},), got "
                         f"{tuple(advantages.shape)}")


def grpo_loss(logp: Tensor, old_logp: Tensor, sampler_logp: Tensor, ref_logp: Tensor | None,
              advantages: Tensor, mask: Tensor, cfg: ObjectiveConfig,
              beta: Tensor | float | None = None) -> ObjectiveOutput:
    """The V3.2 GRPO loss of one micro-batch (formula in the module docstring).

    logp [S, T]          current policy log-probs of the sampled tokens (differentiable; already
                         renormalised over the kept sampling set by the caller)
    old_logp [S, T]      π_old (the sampler's or recomputed), constant
    sampler_logp [S, T]  the engine's log-probs (OPSM and the mismatch metric), constant
    ref_logp [S, T]      reference policy, constant; None = no KL term (kl metric 0)
    advantages [S]       one per sample (group_advantages, flattened)
    mask [S, T]          1 = trained token; 0 = padding / prompt / tool result (any value there)
    beta                 overrides cfg.beta: a float or a per-sample [S] tensor (per domain)
    """
    cfg.validate()
    _check_inputs(logp, old_logp, sampler_logp, ref_logp, advantages, mask)
    S = logp.shape[0]
    b = _beta(cfg, beta, S, logp.device)
    kl_trains = not (isinstance(b, float) and b == 0.0)
    if ref_logp is None and kl_trains:
        raise ValueError(f"beta={cfg.beta if beta is None else beta!r} > 0 needs ref_logp "
                         f"(the reference policy's log-probs); got None")
    mode, norm_len = cfg.loss_agg, cfg.norm_len
    m = _as_mask(mask)                                           # [S, T] bool
    lp = _clean(logp, m)                                         # [S, T] fp32, graph kept
    old = _clean(old_logp.detach(), m)                           # [S, T]
    smp = _clean(sampler_logp.detach(), m)                       # [S, T]
    adv = advantages.detach().float()[:, None]                   # [S, 1]
    keep = off_policy_mask(adv[:, 0], smp, lp, m, cfg.opsm_delta)[:, None]   # [S, 1]

    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    ratio = torch.exp(lp - old)                                  # [S, T], exactly 1 at padding
    pg = -surrogate(ratio, adv, (lo, hi)) * keep                 # [S, T]
    per_token = pg
    if ref_logp is None:
        kl = torch.zeros_like(lp)
    else:
        ref = _clean(ref_logp.detach(), m)
        if kl_trains:
            kl = kl_penalty(lp, ref, old, cfg.kl_unbiased)       # [S, T]
            per_token = pg + b * kl
        else:  # metric only: no graph, so an extreme value cannot turn 0·grad into nan
            with torch.no_grad():
                kl = kl_penalty(lp.detach(), ref, old, cfg.kl_unbiased)
    total = _agg_sum(per_token, m, mode, norm_len)
    metrics = _diagnostics(lp, smp, ratio, adv, keep, pg, kl, m, cfg)
    return ObjectiveOutput(total=total, count=unit_count(m, mode), metrics=metrics)


@torch.no_grad()
def _diagnostics(lp, smp, ratio, adv, keep, pg, kl, m, cfg: ObjectiveConfig) -> dict:
    """grpo_loss's metric sums: the policy-gradient and KL terms in the loss's units, and the
    per-token means of clipping, the ratio, OPSM's masking and the sampler mismatch."""
    mode, norm_len = cfg.loss_agg, cfg.norm_len
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    d = lp.detach() - smp                                        # [S, T] log(π_θ/π_sampler)
    r = ratio.detach()
    diagnostics = {
        "clip_low_frac": ((adv < 0) & (r < lo)).float(),
        "clip_high_frac": ((adv > 0) & (r > hi)).float(),
        "ratio": r,
        "opsm_masked": (1.0 - keep).expand_as(r),
        "mismatch_kl": torch.expm1(d) - d,
    }
    metrics = {"pg_loss": _agg_sum(pg.detach(), m, mode, norm_len),
               "kl": _agg_sum(kl.detach(), m, mode, norm_len)}
    mean_mode = _mean_mode(mode)
    metrics.update({k: _agg_sum(v, m, mean_mode, norm_len) for k, v in diagnostics.items()})
    return metrics
