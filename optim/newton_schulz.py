"""Newton-Schulz orthogonalisation: the core of Muon.

Muon replaces a matrix update G = U·S·Vᵀ by (approximately) its orthogonal factor U·Vᵀ. Newton-
Schulz gets there with matmuls only: normalise G so that every singular value is ≤ 1, then apply
an odd polynomial p(x) = a·x + b·x³ + c·x⁵ to the singular values a fixed number of times, as
X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ. Each iteration maps every singular value σ to p(σ) and
keeps the singular vectors, so only the scalar map matters for accuracy (see `scalar_map`).

Schedules (per-iteration coefficient triples):
- ``hybrid10`` (DeepSeek-V4, the default): 8 × (3.4445, −4.7750, 2.0315) pull small singular
  values up fast, then 2 × (2, −1.5, 0.5) (the classical quintic Newton-Schulz, which converges
  to exactly 1) settle them at 1 ± 0.01.
- ``kj5``: Keller Jordan's 5 steps of (3.4445, −4.7750, 2.0315); leaves σ in roughly (0.7, 1.2).
- ``pe5``: the 5-step Polar Express table, with the normaliser inflated by 2 % for bf16 safety.

Why transpose: for an n×m input with n > m we iterate on Xᵀ so the Gram matrix A is the small
m×m side (cost 4·n·m² + 2·m³ per iteration instead of the n-sided version).

Why per-matrix norm: a stacked tensor [..., n, m] (e.g. experts) is a batch of independent
matrices. The Frobenius norm is taken over the last two dims only; a norm shared across the batch
would leave experts with small gradients barely moving (a known bug in public code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Triple = tuple[float, float, float]

KJ: Triple = (3.4445, -4.7750, 2.0315)
CLASSIC: Triple = (2.0, -1.5, 0.5)
POLAR_EXPRESS_5: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


@dataclass(frozen=True)
class NSSchedule:
    """A coefficient triple per iteration, plus the factor applied to the Frobenius normaliser."""

    name: str
    coefficients: tuple[Triple, ...]
    norm_factor: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.coefficients)


SCHEDULES: dict[str, NSSchedule] = {
    "hybrid10": NSSchedule("hybrid10", (KJ,) * 8 + (CLASSIC,) * 2),
    "kj5": NSSchedule("kj5", (KJ,) * 5),
    "pe5": NSSchedule("pe5", POLAR_EXPRESS_5, norm_factor=1.02),
}

ScheduleLike = Union[str, NSSchedule, Sequence[Sequence[float]]]


def get_schedule(spec: ScheduleLike) -> NSSchedule:
    """Resolves a schedule name, an `NSSchedule`, or an explicit list of (a, b, c) triples."""
    if isinstance(spec, NSSchedule):
        return spec
    if isinstance(spec, str):
        if spec not in SCHEDULES:
            raise ValueError(f"unknown Newton-Schulz schedule {spec!r}; choose one of "
                             f"{sorted(SCHEDULES)} or pass a list of (a, b, c) triples")
        return SCHEDULES[spec]
    triples = tuple(tuple(float(v) for v in t) for t in spec)
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"a custom Newton-Schulz schedule must be a non-empty list of (a, b, c) "
                         f"triples, got {spec!r}")
    return NSSchedule("custom", triples)  # type: ignore[arg-type]


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (fast, and reported stable by DeepSeek-V4); fp32 on CPU, where bf16
    matmuls are slow and exact tests want fp32."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def newton_schulz(G: torch.Tensor, schedule: ScheduleLike = "hybrid10",
                  dtype: torch.dtype | None = None, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal factor of every matrix in G [..., n, m] (same shape out, `dtype`).

    Never modifies G: the first cast/division makes a fresh tensor even when G already has
    `dtype` (public code once rescaled the caller's momentum buffer in place this way).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a [..., n, m] tensor, got shape {tuple(G.shape)}")
    sched = get_schedule(schedule)
    dtype = dtype or default_ns_dtype(G.device)
    batch_shape = G.shape[:-2]
    X = G.reshape(-1, *G.shape[-2:])                        # [B, n, m]
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT                                            # [B, s, l] with s <= l
    # per-matrix Frobenius norm, computed in fp32 so bf16 inputs do not lose range
    norm = torch.linalg.matrix_norm(X.float(), dim=(-2, -1), keepdim=True)
    X = (X.float() / (norm * sched.norm_factor + eps)).to(dtype)
    for a, b, c in sched.coefficients:
        A = torch.bmm(X, X.mT)                              # [B, s, s] Gram, small side
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)         # b·A + c·A²
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)       # a·X + B·X
    if transposed:
        X = X.mT
    return X.reshape(*batch_shape, *X.shape[-2:])


def scalar_map(x: torch.Tensor, schedule: ScheduleLike = "hybrid10") -> torch.Tensor:
    """What the schedule does to one singular value (after normalisation): p_k(…p_1(x)).

    Used to state exactly which inputs a schedule can bring to 1: e.g. hybrid10 maps every
    σ/‖G‖_F ≥ ~2.3e-5 into [0.99, 1.01], but smaller ones (the tail of a square Gaussian
    matrix) stay below.
    """
    for a, b, c in get_schedule(schedule).coefficients:
        x = a * x + b * x ** 3 + c * x ** 5
    return x
