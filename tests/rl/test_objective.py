"""rl/objective.py: the V3.2 GRPO objective as pure tensor functions.

Tolerances. Everything runs in fp32 (unit roundoff 6e-8) on O(1) values. Gradients w.r.t. logp are
per-element products of a handful of factors; splitting the batch differently changes only which
sums an element's value goes through, not the per-element arithmetic, so 1e-6 is generous there.
The KL gradient identity is checked against autograd, which computes w·k3 - w·expm1(d) (two terms
of size up to w·e^|d| ≈ 20 for the test's |d| <= 2, |logp - old| <= 1 that cancel), so a few ulp
of 20 → atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from rl.objective import (ADV_NORMS, LOSS_AGGS, METRICS, ObjectiveConfig, aggregate,
                          group_advantages, grpo_loss, kl_penalty, off_policy_mask, unit_count)
from tests.helpers.distributed import run_distributed
from tests.helpers.fixtures import one_thread  # noqa: F401 (autouse fixture)

NORM_LEN = 9
LENGTHS = (5, 1, 0, 7, 3, 6, 2)   # trained tokens per row: uneven, one empty row
T = 8


def _cfg(mode: str, **kw) -> ObjectiveConfig:
    kw.setdefault("norm_len", NORM_LEN if mode == "seq-mean-token-sum-norm" else None)
    return ObjectiveConfig(loss_agg=mode, **kw)


def _batch(seed: int = 0, lengths=LENGTHS, t: int = T) -> dict:
    """A batch with a one-token 'prompt' column, uneven responses and ±1e4 at every mask-0
    position of every log-prob input, so any padding leak shows up as inf/nan."""
    g = torch.Generator().manual_seed(seed)
    S = len(lengths)
    mask = torch.zeros(S, t)
    for i, n in enumerate(lengths):
        mask[i, 1:1 + n] = 1
    def lp():
        return -torch.rand(S, t, generator=g) * 2 - 0.05
    logp = lp()
    old = logp + (torch.rand(S, t, generator=g) - 0.5)            # |logp - old| <= 0.5
    sampler = old + (torch.rand(S, t, generator=g) - 0.5) * 0.4
    ref = lp()
    junk = torch.where(torch.rand(S, t, generator=g) < 0.5, -1e4, 1e4)
    pad = lambda x: torch.where(mask.bool(), x, junk)            # noqa: E731
    adv = torch.randn(S, generator=g)
    return dict(logp=pad(logp), old_logp=pad(old), sampler_logp=pad(sampler), ref_logp=pad(ref),
                advantages=adv, mask=mask)


def _norms(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """agg_norm per row [S, 1] such that d loss / d per_token = mask / agg_norm."""
    n = mask.sum(1, keepdim=True)
    seqs = float((n > 0).sum())
    if mode == "token-mean":
        return torch.full_like(n, float(mask.sum()))
    if mode == "seq-mean-token-mean":
        return n.clamp_min(1) * seqs
    return torch.full_like(n, NORM_LEN * seqs)


# ---------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ADV_NORMS)
def test_all_equal_group_gives_exact_zero_advantages(norm, dtype):
    # 7 x 0.7: the naive R - mean(R) is 6e-8 in fp32 and 1e-16 in fp64, not 0 (and /(0 + eps)
    # would blow it up); fp32 rewards are exact in an fp64 mean, fp64 ones are not
    rewards = torch.tensor([[0.7] * 7, [0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.2]], dtype=dtype)
    adv = group_advantages(rewards, norm)
    assert adv.dtype == torch.float32 and adv.shape == (2, 7)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(7))
    centred = rewards[1].double() - rewards[1].double().mean()
    if norm == "mean":
        torch.testing.assert_close(adv[1], centred.float(), rtol=0, atol=1e-7)  # fp32 output
    else:
        # population std: exactly 1 up to eps/std ~ 3e-6 (std ≈ 0.4)
        assert abs(adv[1].double().std(unbiased=False).item() - 1) < 1e-5
        assert abs(adv[1].double().mean().item()) < 1e-6
        torch.testing.assert_close(adv[1].double(), centred / centred.std(unbiased=False),
                                   rtol=1e-5, atol=1e-6)


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="adv_norm"):
        group_advantages(torch.ones(3, 2), "std")
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))


# ---------------------------------------------------------------------------- off-policy mask
def _opsm_rows():
    """sampler log-probs 0, so log(π_sampler/π_θ) = -logp; two trained tokens per row."""
    logp = torch.tensor([[-1.0, -3.0],     # Â > 0, mean 2   -> kept (positive advantage)
                         [-0.25, -0.75],   # Â < 0, mean 0.5 -> kept (close to on-policy)
                         [-1.5, -2.5]])    # Â < 0, mean 2   -> dropped at δ = 1
    adv = torch.tensor([1.0, -1.0, -0.5])
    old = logp + torch.tensor([[0.1, -0.2], [0.3, 0.0], [-0.1, 0.2]])
    ref = logp - 0.3
    return logp, old, torch.zeros_like(logp), ref, adv, torch.ones_like(logp)


def _insert_padding(x: torch.Tensor, values) -> torch.Tensor:
    """[S, 2] -> [S, 5]: padding at columns 0 (prompt), 2 (tool result) and 4 (tail)."""
    S = x.shape[0]
    col = lambda v: torch.full((S, 1), v)                            # noqa: E731
    return torch.cat([col(values[0]), x[:, :1], col(values[1]), x[:, 1:], col(values[2])], 1)


def _loss_and_grad(logp, old, sampler, ref, adv, mask, cfg):
    logp = logp.clone().requires_grad_()
    out = grpo_loss(logp, old, sampler, ref, adv, mask, cfg, beta=0.1)
    (out.total / out.count).backward()
    return out, logp.grad


def test_off_policy_mask_and_padding_invariance():
    logp, old, sampler, ref, adv, mask = _opsm_rows()
    keep = off_policy_mask(adv, sampler, logp, mask, 1.0)
    assert torch.equal(keep, torch.tensor([1.0, 1.0, 0.0])) and not keep.requires_grad
    assert torch.equal(off_policy_mask(adv, sampler, logp, mask, None), torch.ones(3))
    assert torch.equal(off_policy_mask(adv, sampler, logp, mask, 2.5), torch.ones(3))

    # the same batch with padding columns holding huge / infinite log-probs
    p = dict(logp=_insert_padding(logp, (-1e4, 1e4, -1e4)),
             old=_insert_padding(old, (1e4, -1e4, float("-inf"))),
             sampler=_insert_padding(sampler, (1e4, -1e4, 1e4)),
             ref=_insert_padding(ref, (-1e4, 1e4, float("inf"))))
    pmask = _insert_padding(mask, (0.0, 0.0, 0.0))
    assert torch.equal(off_policy_mask(adv, p["sampler"], p["logp"], pmask, 1.0), keep)

    cfg = ObjectiveConfig(opsm_delta=1.0)
    ref_out, ref_grad = _loss_and_grad(logp, old, sampler, ref, adv, mask, cfg)
    out, grad = _loss_and_grad(p["logp"], p["old"], p["sampler"], p["ref"], adv, pmask, cfg)
    assert out.count == ref_out.count == 3
    torch.testing.assert_close(out.total, ref_out.total, rtol=1e-6, atol=1e-7)
    for k in METRICS:
        torch.testing.assert_close(out.metrics[k], ref_out.metrics[k], rtol=1e-6, atol=1e-7)
    assert out.metrics["opsm_masked"].item() == 1.0           # one of the three sequences
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[:, [0, 2, 4]], torch.zeros(3, 3))
    torch.testing.assert_close(grad[:, [1, 3]], ref_grad, rtol=1e-6, atol=1e-7)
    # the masked sequence keeps only its KL gradient, the others also their policy gradient
    lp0 = logp.clone().requires_grad_()
    no_pg = grpo_loss(lp0, old, sampler, ref, torch.zeros(3), mask, cfg, beta=0.1)
    (no_pg.total / no_pg.count).backward()
    torch.testing.assert_close(ref_grad[2], lp0.grad[2], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ref_grad[:2], lp0.grad[:2])


# ------------------------------------------------------------------------------------------ KL
def _kl_inputs():
    g = torch.Generator().manual_seed(3)
    x = -torch.rand(4, 6, generator=g) * 2 - 0.1
    ref = -torch.rand(4, 6, generator=g) * 2 - 0.1               # |ref - x| <= 2
    old = x + torch.rand(4, 6, generator=g) * 2 - 1              # |x - old| <= 1
    return x, ref, old


def test_unbiased_kl_gradient_is_w_times_log_ratio():
    """d/dx [e^{x-o}(e^{r-x} - (r-x) - 1)] = e^{x-o}(x - r): the e^{r-o} term is constant and
    the two ±e^{x-o} terms cancel (derivation in rl/objective.py)."""
    x, ref, old = _kl_inputs()
    w = torch.exp(x - old)
    plain = torch.exp(ref - x) - (ref - x) - 1
    xs = x.clone().requires_grad_()
    kl = kl_penalty(xs, ref, old, unbiased=True)
    torch.testing.assert_close(kl.detach(), w * plain, rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    torch.testing.assert_close(xs.grad, w * (x - ref), rtol=1e-5, atol=1e-5)
    # the plain k3 gradient 1 - e^{r-x}, which a detached ratio would also give (times w)
    xs = x.clone().requires_grad_()
    kl_penalty(xs, ref, old, unbiased=False).sum().backward()
    torch.testing.assert_close(xs.grad, 1 - torch.exp(ref - x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(xs.grad * w, w * (x - ref), atol=1e-3)


@pytest.mark.parametrize("unbiased", [True, False])
def test_grpo_kl_term_per_sample_beta(unbiased):
    """With zero advantages only β_i·KL trains: token-mean gradient β_i·dKL/dx·m / N."""
    x, ref, old = _kl_inputs()
    mask = torch.ones_like(x)
    mask[1, 3:] = 0
    beta = torch.tensor([0.0, 0.5, 1.0, 2.0])
    xs = x.clone().requires_grad_()
    cfg = ObjectiveConfig(loss_agg="token-mean", kl_unbiased=unbiased)
    out = grpo_loss(xs, old, old, ref, torch.zeros(4), mask, cfg, beta=beta)
    (out.total / out.count).backward()
    dkl = torch.exp(x - old) * (x - ref) if unbiased else 1 - torch.exp(ref - x)
    torch.testing.assert_close(xs.grad, beta[:, None] * dkl * mask / mask.sum(),
                               rtol=1e-5, atol=1e-6)
    # beta = 0 with a reference: the kl value is still reported, and nothing trains
    xs = x.clone().requires_grad_()
    out0 = grpo_loss(xs, old, old, ref, torch.zeros(4), mask, cfg)
    (out0.total / out0.count).backward()
    assert torch.equal(xs.grad, torch.zeros_like(x)) and out0.metrics["kl"].item() > 0
    kl_tok = kl_penalty(x, ref, old, unbiased)
    torch.testing.assert_close(out0.metrics["kl"], (kl_tok * mask).sum(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- policy term
@pytest.mark.parametrize("mode", LOSS_AGGS)
def test_policy_gradient_at_ratio_one(mode):
    b = _batch(1)
    m = b["mask"]
    old = b["logp"].clone()
    grads = []
    for sign in (1.0, -1.0):
        lp = b["logp"].clone().requires_grad_()
        out = grpo_loss(lp, old, b["sampler_logp"], None, sign * b["advantages"], m, _cfg(mode))
        (out.total / out.count).backward()
        grads.append(lp.grad)
        assert out.metrics["ratio"].item() == out.count          # r == exp(0) == 1 exactly
        assert out.metrics["clip_low_frac"].item() == 0 == out.metrics["clip_high_frac"].item()
        assert out.metrics["kl"].item() == 0                     # no reference
        assert out.count == unit_count(m, mode)
    expected = -b["advantages"][:, None] * m / _norms(m, mode)
    torch.testing.assert_close(grads[0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], -grads[0], rtol=0, atol=0)


def test_clipped_branch_has_no_gradient():
    """One token per sample; ε_low = 0.2, ε_high = 0.28."""
    ratio = torch.tensor([[1.5], [1.5], [0.5], [0.5]])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    old = torch.full((4, 1), -1.0)
    lp = (old + ratio.log()).requires_grad_()
    out = grpo_loss(lp, old, old, None, adv, torch.ones(4, 1), ObjectiveConfig())
    out.total.backward()
    # d/dlogp of -r·Â is -r·Â where the unclipped branch is the minimum, 0 where the clip is
    torch.testing.assert_close(lp.grad[:, 0], torch.tensor([0.0, 1.5, 0.0, -0.5]),
                               rtol=1e-6, atol=1e-7)
    assert out.metrics["clip_high_frac"].item() == 1 and out.metrics["clip_low_frac"].item() == 1
    torch.testing.assert_close(out.total, -(1.28 * 1 + 1.5 * -1 + 0.8 * -1 + 0.5 * 1)
                               * torch.ones(()), rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------- aggregation
def test_aggregate_matches_the_written_formulas():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(LENGTHS), T, generator=g)
    m = _batch()["mask"]
    n = m.sum(1)
    rows = [(x[i] * m[i]).sum() for i in range(len(LENGTHS))]
    s, c = aggregate(x, m, "token-mean")
    assert c == sum(LENGTHS)
    torch.testing.assert_close(s, (x * m).sum())
    s, c = aggregate(x, m, "seq-mean-token-mean")
    assert c == len(LENGTHS) - 1                                 # the empty row does not count
    torch.testing.assert_close(s, sum(r / n[i] for i, r in enumerate(rows) if n[i] > 0))
    s, c = aggregate(x, m, "seq-mean-token-sum-norm", norm_len=NORM_LEN)
    torch.testing.assert_close(s, sum(rows) / NORM_LEN)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(x, m, "seq-mean-token-sum-norm")


def _split_grad(b: dict, mode: str, sizes) -> torch.Tensor:
    cfg = _cfg(mode, opsm_delta=0.3, beta=0.05)
    lp = b["logp"].clone().requires_grad_()
    total, count, start = 0.0, 0.0, 0
    for n in sizes:
        rows = slice(start, start + n)
        start += n
        out = grpo_loss(lp[rows], b["old_logp"][rows], b["sampler_logp"][rows],
                        b["ref_logp"][rows], b["advantages"][rows], b["mask"][rows], cfg)
        assert out.count == unit_count(b["mask"][rows], mode)
        assert sorted(out.metrics) == sorted(METRICS)
        torch.testing.assert_close(out.total.detach(),
                                   out.metrics["pg_loss"] + 0.05 * out.metrics["kl"])
        total, count = total + out.total, count + out.count
    (total / count).backward()
    return lp.grad


@pytest.mark.parametrize("mode", LOSS_AGGS)
def test_gradient_independent_of_micro_batching(mode):
    b = _batch(2)
    whole = _split_grad(b, mode, [7])
    assert torch.isfinite(whole).all() and whole.abs().sum() > 0
    for sizes in ([3, 4], [1, 2, 3, 1]):
        torch.testing.assert_close(_split_grad(b, mode, sizes), whole, rtol=1e-6, atol=1e-6)
    # an extra empty row (micro-batch padding) changes nothing either
    lengths = LENGTHS + (0,)
    padded = _batch(2, lengths)
    for k in ("logp", "old_logp", "sampler_logp", "ref_logp", "mask"):
        padded[k][:-1] = b[k]
    padded["advantages"][:-1] = b["advantages"]
    torch.testing.assert_close(_split_grad(padded, mode, [4, 4])[:-1], whole,
                               rtol=1e-6, atol=1e-6)


# two gloo ranks, each with two uneven micro-batches, the way train/trainer.py `accumulate` scales
RANK_ROWS = ([1, 2], [3, 1])          # rows per micro-batch on rank 0, rank 1 (7 rows in all)


def _theta_batch():
    """Shared parameters θ [P] -> logp [S, T] = -softplus(base + X·θ), so ranks' gradients are
    gradients of the same tensor and can be averaged like DeepSpeed does."""
    g = torch.Generator().manual_seed(11)
    b = _batch(4)
    X = torch.randn(len(LENGTHS), T, 3, generator=g)
    base = torch.randn(len(LENGTHS), T, generator=g)
    return b, X, base


def _theta_grad(mode: str, row_groups, rank: int = 0, world: int = 1) -> torch.Tensor:
    b, X, base = _theta_batch()
    cfg = _cfg(mode, opsm_delta=0.3, beta=0.05)
    theta = torch.full((3,), 0.1, requires_grad=True)
    starts = [0]
    for sizes in row_groups:
        starts.append(starts[-1] + sum(sizes))
    mine, start = row_groups[rank], starts[rank]
    slices = []
    for n in mine:
        slices.append(slice(start, start + n))
        start += n
    local = torch.tensor([sum(unit_count(b["mask"][s], mode) for s in slices)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(local)
    global_count = float(local)
    scale = len(slices) * world / max(global_count, 1.0)       # as train/trainer.py accumulate
    for s in slices:
        logp = -torch.nn.functional.softplus(base[s] + X[s] @ theta)
        logp = torch.where(b["mask"][s].bool(), logp, b["logp"][s])   # keep the ±1e4 padding
        out = grpo_loss(logp, b["old_logp"][s], b["sampler_logp"][s], b["ref_logp"][s],
                        b["advantages"][s], b["mask"][s], cfg)
        (out.total * scale).backward()
    grad = theta.grad / len(slices)                            # DeepSpeed: / gas ...
    if world > 1:
        dist.all_reduce(grad)
    return grad / world                                        # ... and the mean over ranks


def _rank_fn(rank, world):
    return {mode: _theta_grad(mode, RANK_ROWS, rank, world) for mode in LOSS_AGGS}


def test_gradient_independent_of_ranks_gloo():
    results = run_distributed(_rank_fn, 2, timeout=120)
    for mode in LOSS_AGGS:
        single = _theta_grad(mode, ([len(LENGTHS)],))
        assert single.abs().sum() > 0
        for r in results:
            torch.testing.assert_close(r[mode], single, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, field", [
    (dict(loss_agg="x"), "grpo.loss_agg='x'"),
    (dict(clip_low=1.0), "grpo.clip_low"),
    (dict(clip_low=-0.1), "grpo.clip_low"),
    (dict(clip_high=-0.1), "grpo.clip_high"),
    (dict(clip_high=math.inf), "grpo.clip_high"),
    (dict(beta=-1.0), "grpo.beta"),
    (dict(beta=math.nan), "grpo.beta"),
    (dict(opsm_delta=-0.5), "grpo.opsm_delta"),
    (dict(kl_unbiased="yes"), "grpo.kl_unbiased"),
    (dict(loss_agg="seq-mean-token-sum-norm"), "grpo.norm_len"),
    (dict(loss_agg="seq-mean-token-sum-norm", norm_len=0), "grpo.norm_len"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        ObjectiveConfig(**kwargs).validate()
    assert field in str(e.value)
    ObjectiveConfig().validate()


def test_grpo_input_errors_and_dtype():
    b = _batch()
    args = [b[k] for k in ("logp", "old_logp", "sampler_logp", "ref_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(*args[:3], None, *args[4:], ObjectiveConfig(beta=0.1))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(*args[:4], args[4][:-1], args[5], ObjectiveConfig())
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(args[0], args[1][:, :-1], *args[2:], ObjectiveConfig())
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(*args, ObjectiveConfig(), beta=torch.ones(3))
    out = grpo_loss(*(a.bfloat16() if a.dim() == 2 else a for a in args), ObjectiveConfig())
    assert out.total.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.metrics.values())
