"""The distillation losses (`distill/loss.py`) on hand-made tensors.

Contracts re-derived from TRL's `tests/experimental/test_gkd_trainer.py::TestGeneralizedJSDLoss`
(the reverse direction equals `F.kl_div` with the arguments swapped; identical inputs give 0)
and from the issue: the chunked full-vocabulary KL equals a dense reference in value and
gradient for every chunk size.

Tolerances: everything is fp32 with logits of magnitude ~10 (dim 16, unit-variance weights) over
a vocabulary of 64; a log-softmax there is exact to ~1e-6 relative, and a chunked evaluation
differs from the dense one only by summation order (the per-row sums are the same; rows are
independent), so 1e-5 absolute on KLs of O(1-10) and on gradients of O(1) holds with a wide
margin. Gradients get 5e-5 absolute + 1e-4 relative: a one-row chunk takes another matmul path,
whose logits (|z| up to ~15, dim 16) differ by ~eps·|z|·sqrt(dim) ≈ 4e-6, and the gradient
multiplies that by the head rows' norm (~4) and the row weights (≤ 2). Any mistake (a wrong row, a missing mask, the forward direction) moves them by
O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.loss import (chunked_reverse_kl, chunked_token_logprobs, reverse_kl_dense,
                          sampled_kl_loss, topk_reverse_kl_dense)
from model.sampling import KeptSets, logprobs_over_kept

N, DIM, VOCAB = 11, 16, 64


def tensors(seed=0, teacher_dim=DIM):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, DIM, generator=g, requires_grad=True)
    ws = torch.randn(VOCAB, DIM, generator=g, requires_grad=True)
    ht = torch.randn(N, teacher_dim, generator=g)
    wt = torch.randn(VOCAB, teacher_dim, generator=g)
    return hs, ws, ht, wt


def kept_sets(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, VOCAB, generator=g) < 0.3
    mask[:, 5] = True  # every row keeps at least one token
    return mask, KeptSets.from_mask(mask)


@pytest.mark.parametrize("chunk", [1, 3, N, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_full_kl_equals_the_dense_reference(chunk, masked):
    hs, ws, ht, wt = tensors(teacher_dim=24)  # a teacher of another width
    mask, kept = kept_sets() if masked else (None, None)
    got = chunked_reverse_kl(hs, ws, ht, wt, kept=kept, chunk=chunk)
    gh, gw = torch.autograd.grad((got * (1 + torch.arange(N) / N)).sum(), (hs, ws))
    want = reverse_kl_dense(hs @ ws.t(), ht @ wt.t(), mask)
    wh, ww = torch.autograd.grad((want * (1 + torch.arange(N) / N)).sum(), (hs, ws))
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, wh, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(gw, ww, atol=5e-5, rtol=1e-4)
    assert (got > 0).all()


def test_reverse_kl_matches_kl_div_on_small_distributions():
    # TRL's pinned 2-token case: KL(S‖T) = kl_div(input=log T, target=log S)
    s = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]).log()
    t = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7]]).log()
    want = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(reverse_kl_dense(s, t), want, atol=1e-6, rtol=0)
    by_hand = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(reverse_kl_dense(s, t), by_hand, atol=1e-6, rtol=0)
    forward = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    assert not torch.allclose(reverse_kl_dense(s, t)[0], forward[0], atol=1e-3)  # direction
    hs, ws, _, _ = tensors()
    with torch.no_grad():
        dense = reverse_kl_dense(hs @ ws.t(), (hs @ ws.t()) * 0.5)
        want = F.kl_div(F.log_softmax((hs @ ws.t()) * 0.5, -1), F.log_softmax(hs @ ws.t(), -1),
                        reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["full", "topk"])
def test_identical_student_and_teacher_give_zero(mode):
    hs, ws, _, _ = tensors()
    kl = chunked_reverse_kl(hs, ws, hs.detach(), ws.detach(), chunk=4, mode=mode, k=5)
    assert kl.abs().max() < 1e-5
    gh, = torch.autograd.grad(kl.sum(), hs)
    assert gh.abs().max() < 1e-4  # a minimum: the gradient vanishes too


def test_outside_the_kept_set_nothing_counts():
    """Teacher logits outside a row's kept set change nothing (both sides are renormalised over
    the set), and the gradient stays finite (no 0·inf)."""
    hs, ws, ht, wt = tensors()
    mask, kept = kept_sets()
    base = chunked_reverse_kl(hs, ws, ht, wt, kept=kept, chunk=4)
    zt = ht @ wt.t()
    moved = zt + (~mask) * 50.0  # only outside the kept sets
    dense = reverse_kl_dense(hs @ ws.t(), moved, mask)
    torch.testing.assert_close(base, dense, atol=1e-5, rtol=0)
    gh, = torch.autograd.grad(base.sum(), hs)
    assert torch.isfinite(gh).all()


def test_topk_is_exact_at_full_width_and_a_lower_bound_below():
    """With k = vocab the tail is empty and the top-k form is the full KL; with k < vocab it is
    the KL of a coarser partition (k tokens + one bucket), never above the full KL (the data
    processing inequality) and well above 0 for different distributions."""
    hs, ws, ht, wt = tensors()
    full = chunked_reverse_kl(hs, ws, ht, wt, chunk=4)
    exact = chunked_reverse_kl(hs, ws, ht, wt, chunk=4, mode="topk", k=VOCAB)
    torch.testing.assert_close(exact, full, atol=1e-4, rtol=0)
    coarse = chunked_reverse_kl(hs, ws, ht, wt, chunk=4, mode="topk", k=4)
    assert (coarse <= full + 1e-5).all() and (coarse > 0).all()
    dense = topk_reverse_kl_dense(hs @ ws.t(), ht @ wt.t(), 4)
    torch.testing.assert_close(coarse, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_token_logprobs_equal_the_sampler_form(masked):
    hs, ws, _, _ = tensors()
    mask, kept = kept_sets() if masked else (None, None)
    g = torch.Generator().manual_seed(3)
    if masked:  # a token each row could have drawn
        tokens = torch.stack([row.nonzero()[torch.randint(len(row.nonzero()), (1,),
                                                          generator=g)][0, 0] for row in mask])
    else:
        tokens = torch.randint(VOCAB, (N,), generator=g)
    got = chunked_token_logprobs(hs, ws, tokens, kept=kept, chunk=3)
    want = logprobs_over_kept(hs @ ws.t(), tokens, kept, 1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    gg, = torch.autograd.grad(got.sum(), hs)
    wg, = torch.autograd.grad(want.sum(), hs)
    torch.testing.assert_close(gg, wg, atol=1e-5, rtol=0)


def test_sampled_mode_value_and_gradient():
    """At π_θ = π_old the per-token loss is the sampled reverse-KL estimate
    log π_old − log π_T, and its gradient w.r.t. log π_θ is that estimate (−A): descending it
    lowers the log-prob of tokens the teacher finds less likely than the student does."""
    old = torch.tensor([-1.0, -2.0, -0.5])
    teacher = torch.tensor([-3.0, -1.0, -0.5])
    logp = old.clone().requires_grad_(True)
    loss = sampled_kl_loss(logp, old, teacher)
    torch.testing.assert_close(loss, old - teacher)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, old - teacher)


def test_bad_arguments_are_named():
    hs, ws, ht, wt = tensors()
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_reverse_kl(hs, ws, ht, wt[:10])
    with pytest.raises(ValueError, match="rows"):
        chunked_reverse_kl(hs, ws, ht[:3], wt)
    with pytest.raises(ValueError, match="mode"):
        chunked_reverse_kl(hs, ws, ht, wt, mode="jsd")


@pytest.mark.parametrize("mode", ["full", "topk"])
def test_no_tensor_of_all_tokens_by_vocab_exists_in_forward_or_backward(mode):
    """The issue's memory contract, measured: the tensors the loss creates (forward and the
    checkpointed backward, `train/memory.py`) peak at a few chunks of `[chunk, vocab]` fp32
    logits, never at the batch's `[tokens, vocab]`. Measured here: ~7 chunk-sized buffers
    (student and teacher logits, their log-softmax and probabilities, the gradient); the bound
    leaves room for 12, still a fifth of the dense tensor that 2048 tokens would need."""
    from train.memory import SectionPeak

    tokens, dim, vocab, chunk = 2048, 16, 1000, 32
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(tokens, dim, generator=g, requires_grad=True)
    ws = torch.randn(vocab, dim, generator=g, requires_grad=True)
    ht, wt = torch.randn(tokens, dim, generator=g), torch.randn(vocab, dim, generator=g)
    peaks = {}
    for c in (chunk, 4 * chunk):
        with SectionPeak(torch.device("cpu")) as peak:
            chunked_reverse_kl(hs, ws, ht, wt, chunk=c, mode=mode, k=8).sum().backward()
        peaks[c] = peak.bytes
    one_chunk = chunk * vocab * 4
    assert peaks[chunk] < 12 * one_chunk, peaks[chunk] / one_chunk
    assert peaks[chunk] < tokens * vocab * 4 / 5
    assert peaks[4 * chunk] > 3 * peaks[chunk]  # it scales with the chunk, not the batch
