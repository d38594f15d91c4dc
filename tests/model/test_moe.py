"""DeepSeekMoE FFN (model/moe.py, model/dispatcher.py): routing, hash table, grouped experts,
balance loss, bias update, gradients. Tiny shapes, CPU, fp32 unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import get_config
from model.dispatcher import LocalDispatcher
from model.moe import (MoE, build_hash_table, experts_grouped_mm, experts_padded,
                       routing_agreement, sequence_balance_loss, swiglu)

E, K, DIM, INTER, VOCAB = 4, 2, 16, 12, 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # unseeded draws below stay reproducible


def small_cfg(**overrides):
    kw = dict(vocab_size=VOCAB, dim=DIM, moe_inter_dim=INTER, n_routed_experts=E,
              n_activated_experts=K, n_hash_layers=1, route_scale=1.5, swiglu_limit=10.0)
    kw.update(overrides)
    return get_config("tiny", **kw)


def make_moe(layer_id=1, seed=0, std=0.3, **overrides) -> MoE:
    moe = MoE(small_cfg(**overrides), layer_id)
    moe.init_weights(std, torch.Generator().manual_seed(seed))
    return moe


def ref_swiglu(g, u, limit):
    return F.silu(torch.minimum(g, torch.tensor(limit))) * torch.clamp(u, -limit, limit)


def naive_moe(moe: MoE, x, idx, weights):
    """Per-token, per-pick loop straight from spec §5.3: x [T, dim] -> [T, dim]."""
    ex, lim = moe.experts, moe.experts.swiglu_limit
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = ref_swiglu(ex.w1[e] @ x[t], ex.w3[e] @ x[t], lim) * weights[t, j]
            out[t] += ex.w2[e] @ h
    se = moe.shared_experts
    if se is not None:
        out += (se.w2.weight @ ref_swiglu(se.w1.weight @ x.T, se.w3.weight @ x.T, lim)).T
    return out


def router_weights(moe: MoE, x_flat, idx):
    """Scores gathered at idx, normalised over the picks, times route_scale (spec §5.1)."""
    scores = F.softplus(x_flat @ moe.gate.weight.T).sqrt()
    w = scores.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * moe.gate.route_scale


# ------------------------------------------------------------------------------- routing
def test_selection_uses_biased_scores_weights_use_raw_scores():
    moe = make_moe()
    x = torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(1))
    x_flat = x.reshape(1, DIM)
    scores = F.softplus(x_flat @ moe.gate.weight.T).sqrt()[0]
    worst = int(scores.argmin())
    before = moe(x, None).routes[0, 0]
    assert worst not in before.tolist()
    moe.gate.bias[worst] = 10.0                                   # forces the worst expert in
    weights, idx, _ = moe.gate(x_flat, None)
    assert worst in idx[0].tolist()
    torch.testing.assert_close(weights, router_weights(moe, x_flat, idx), rtol=1e-6, atol=0)
    assert torch.isclose(weights.sum(), torch.tensor(1.5))
    out = moe(x, None)
    assert torch.equal(out.routes[0, 0], idx[0])
    torch.testing.assert_close(out.out.reshape(1, DIM), naive_moe(moe, x_flat, idx, weights),
                               rtol=1e-5, atol=1e-6)


def test_hash_layer_routes_by_table_and_has_no_bias():
    moe = make_moe(layer_id=0)
    assert moe.is_hash and "bias" not in dict(moe.gate.named_buffers())
    table = moe.gate.tid2eid
    assert table.dtype == torch.int64 and table.shape == (VOCAB, K)
    assert not table.requires_grad
    assert "gate.tid2eid" not in dict(moe.named_parameters())
    assert "gate.tid2eid" in moe.state_dict()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 5, DIM)
    out = moe(x, ids)
    assert torch.equal(out.routes, table[ids])
    weights, idx, _ = moe.gate(x.reshape(-1, DIM), ids.reshape(-1))
    torch.testing.assert_close(weights, router_weights(moe, x.reshape(-1, DIM), idx))
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.update_bias(torch.arange(E, dtype=torch.float32))         # no-op on hash layers
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in state.items())
    assert out.balance_loss.item() == 0.0
    with pytest.raises(ValueError, match="input_ids"):
        moe(x, None)
    with pytest.raises(ValueError, match="input_ids"):
        moe(x, torch.full((2, 5), VOCAB))


def test_hash_layers_only_below_n_hash_layers():
    cfg = small_cfg()
    assert MoE(cfg, 0).is_hash
    assert not MoE(cfg, 1).is_hash
    assert not MoE(cfg, cfg.n_layers).is_hash                     # MTP block
    with pytest.raises(ValueError, match="layer_id"):
        MoE(cfg, cfg.n_layers + cfg.n_mtp_layers)


@pytest.mark.parametrize("vocab,n_exp,k", [(64, 4, 2), (63, 6, 4), (101, 7, 3), (10, 5, 5)])
def test_hash_table_balanced_distinct_deterministic(vocab, n_exp, k):
    table = build_hash_table(vocab, n_exp, k, seed=3)
    assert table.shape == (vocab, k)
    assert (table.sort(dim=1).values.diff(dim=1) != 0).all()      # k distinct experts per token
    load = torch.bincount(table.flatten(), minlength=n_exp)
    assert load.max() - load.min() <= 1                           # ≈ vocab*k/E each
    assert torch.equal(table, build_hash_table(vocab, n_exp, k, seed=3))
    if k < n_exp:
        assert not torch.equal(table, build_hash_table(vocab, n_exp, k, seed=4))


def test_routes_replay_uses_given_ids_with_current_scores():
    moe = make_moe()
    x = torch.randn(2, 3, DIM)
    routes = torch.tensor([[[3, 1], [0, 2], [2, 3]], [[1, 0], [3, 2], [0, 1]]])
    out = moe(x, None, routes=routes)
    assert torch.equal(out.routes, routes)
    x_flat, idx = x.reshape(-1, DIM), routes.reshape(-1, K)
    weights, got_idx, _ = moe.gate(x_flat, None, idx)
    assert torch.equal(got_idx, idx)
    torch.testing.assert_close(weights, router_weights(moe, x_flat, idx))
    torch.testing.assert_close(out.out.reshape(-1, DIM), naive_moe(moe, x_flat, idx, weights),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="routes"):
        moe(x, None, routes=routes[..., :1])
    with pytest.raises(ValueError, match="routes"):
        moe(x, None, routes=routes + E)
    with pytest.raises(ValueError, match="routes"):
        moe(x, None, routes=routes.float())


def test_bias_update_moves_load_toward_balance():
    moe = make_moe(n_routed_experts=8, std=0.3)
    g = torch.Generator().manual_seed(5)
    # Skew: every token leans toward experts 0 and 1.
    x = torch.randn(4, 16, DIM, generator=g) + 3.0 * (moe.gate.weight[0] + moe.gate.weight[1])
    first = moe(x, None).counts
    ratio = [float(first.max() / first.mean())]
    for _ in range(30):
        moe.update_bias(moe(x, None).counts, speed=0.05)
        counts = moe(x, None).counts
        ratio.append(float(counts.max() / counts.mean()))
    assert ratio[0] > 2.0
    assert ratio[-1] < 0.6 * ratio[0]
    b = moe.gate.bias
    assert b[0] < 0 and b[1] < 0                                  # overloaded experts went down


def test_bias_update_rejects_bad_counts():
    with pytest.raises(ValueError, match="counts"):
        make_moe().update_bias(torch.ones(E + 1))


# ------------------------------------------------------------------------------- experts
def test_grouped_experts_equal_naive_reference_with_empty_and_full_experts():
    moe = make_moe(std=0.5)
    x = torch.randn(2, 4, DIM)
    # Expert 0 in every token's picks, expert 3 in none.
    routes = torch.tensor([[[0, 1], [2, 0], [0, 2], [1, 0]], [[0, 2], [0, 1], [2, 0], [0, 1]]])
    out = moe(x, None, routes=routes)
    assert out.counts.tolist() == [8.0, 4.0, 4.0, 0.0]
    x_flat, idx = x.reshape(-1, DIM), routes.reshape(-1, K)
    weights = router_weights(moe, x_flat, idx)
    ref = naive_moe(moe, x_flat, idx, weights)
    torch.testing.assert_close(out.out.reshape(-1, DIM), ref, rtol=1e-5, atol=1e-6)
    # Backward agrees too (router weight through the routing weights, every expert tensor).
    probe = torch.randn_like(ref)
    params = [moe.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3]
    got = torch.autograd.grad((out.out.reshape(-1, DIM) * probe).sum(), params)
    want = torch.autograd.grad((ref * probe).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_grouped_mm_path_matches_padded_path_forward():
    """_grouped_mm's forward runs on CPU (its backward does not), so compare forwards here;
    alignment padding must not change results."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    g = torch.Generator().manual_seed(6)
    w1, w3 = torch.randn(E, INTER, DIM, generator=g), torch.randn(E, INTER, DIM, generator=g)
    w2 = torch.randn(E, DIM, INTER, generator=g)
    counts = torch.tensor([5, 0, 1, 7])
    x = torch.randn(int(counts.sum()), DIM, generator=g)
    weights = torch.rand(x.shape[0], generator=g)
    ref = experts_padded(x, counts, weights, w1, w3, w2, 10.0)
    for align in (1, 16):
        got = experts_grouped_mm(x, counts, weights, w1, w3, w2, 10.0, align=align)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cpu_inference_takes_the_grouped_path_and_compiles_through_it():
    """Without autograd on a CPU the experts run `_grouped_mm` over exactly their rows (where
    this torch's CPU kernel runs), as an opaque op under `torch.compile`: the same output as
    the padded path eagerly and compiled; with autograd they stay on the padded path."""
    from model.moe import cpu_inference_grouped_mm

    moe = make_moe(std=0.5)
    x = torch.randn(3, 5, DIM)
    with torch.no_grad():
        if not cpu_inference_grouped_mm(x, moe.experts.w1):
            pytest.skip("this torch's CPU _grouped_mm does not run fp32")
        grouped = moe(x, None).out
        moe.experts.impl = "padded"
        padded = moe(x, None).out
        moe.experts.impl = "auto"
        compiled = torch.compile(lambda t: moe(t, None).out, backend="aot_eager",
                                 fullgraph=True)(x)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, padded, rtol=1e-5, atol=1e-5)
    assert not cpu_inference_grouped_mm(x, moe.experts.w1)  # grad enabled here
    with torch.no_grad():
        assert not cpu_inference_grouped_mm(torch.randn(2, 3), torch.randn(E, 4, 3))


def test_grouped_mm_path_matches_padded_path_backward():
    """Where this torch's CPU _grouped_mm backward runs (fp32, 16-byte aligned rows), the
    gradients must match the padded path's; skipped where it does not."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(E, INTER, DIM, generator=g), torch.randn(E, INTER, DIM, generator=g),
               torch.randn(E, DIM, INTER, generator=g), torch.randn(9, DIM, generator=g)]
    counts, weights = torch.tensor([0, 4, 5, 0]), torch.rand(9, generator=g)
    grads = []
    for fn in (experts_padded, experts_grouped_mm):
        w1, w3, w2, x = (t.clone().requires_grad_() for t in tensors)
        y = fn(x, counts, weights, w1, w3, w2, 10.0)
        try:
            grads.append(torch.autograd.grad((y * y).sum(), [x, w1, w3, w2]))
        except RuntimeError as e:
            pytest.skip(f"_grouped_mm backward unsupported here: {e}")
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_swiglu_clamp_semantics():
    gate = torch.tensor([20.0, -20.0, 5.0, 3.0])
    up = torch.tensor([30.0, -30.0, 2.0, -15.0])
    expect = F.silu(torch.tensor([10.0, -20.0, 5.0, 3.0])) * torch.tensor([10.0, -10.0, 2.0, -10.0])
    torch.testing.assert_close(swiglu(gate, up, 10.0), expect)
    torch.testing.assert_close(swiglu(gate, up, 0.0), F.silu(gate) * up)   # 0 disables
    assert swiglu(gate.bfloat16(), up.bfloat16(), 10.0).dtype == torch.float32
    # Shared expert clamps too: large weights push pre-activations past the limit.
    moe = make_moe(std=3.0)
    x = torch.randn(1, 2, DIM)
    se = moe.shared_experts
    pre = se.w1.weight @ x.reshape(-1, DIM).T
    assert pre.abs().max() > 10
    expect = (se.w2.weight @ ref_swiglu(pre, se.w3.weight @ x.reshape(-1, DIM).T, 10.0)).T
    torch.testing.assert_close(se(x.reshape(-1, DIM)), expect, rtol=1e-5, atol=1e-4)


def test_gradients_reach_router_experts_shared_but_not_bias():
    moe = make_moe()
    x = torch.randn(2, 3, DIM, requires_grad=True)
    routes = torch.tensor([[[0, 1], [1, 2], [2, 0]], [[0, 2], [1, 0], [2, 1]]])  # expert 3 idle
    out = moe(x, None, routes=routes)
    (out.out * torch.randn_like(out.out)).sum().backward()        # no balance loss: via weights
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    for name in ("w1", "w2", "w3"):
        grad = getattr(moe.experts, name).grad
        assert (grad[:3].flatten(1).abs().sum(1) > 0).all(), name
        assert grad[3].abs().sum() == 0, name
    for lin in (moe.shared_experts.w1, moe.shared_experts.w2, moe.shared_experts.w3):
        assert lin.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert not moe.gate.bias.requires_grad and moe.gate.bias.grad is None
    assert "gate.bias" not in dict(moe.named_parameters())
    assert "gate.bias" in moe.state_dict()


# ------------------------------------------------------------------------------- losses
def test_balance_loss_hand_computed():
    # E=2, k=1. Row 0 (both valid): s' = [.75,.25], [.5,.5]; both pick expert 0:
    #   f = 2/(1*2)*[2,0] = [2,0], P = [.625,.375], L = 1.25.
    # Row 1 (second token masked): s' = [.25,.75], picks expert 1: f = [0,2], P = [.25,.75],
    #   L = 1.5. Row 2 fully masked: left out. Mean = 1.375.
    scores = torch.tensor([[[3.0, 1.0], [1.0, 1.0]],
                           [[1.0, 3.0], [9.0, 1.0]],
                           [[5.0, 1.0], [1.0, 5.0]]])
    idx = torch.tensor([[[0], [0]], [[1], [0]], [[0], [1]]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    loss = sequence_balance_loss(scores, idx, valid)
    torch.testing.assert_close(loss, torch.tensor(1.375))
    torch.testing.assert_close(sequence_balance_loss(scores[:1], idx[:1], None),
                               torch.tensor(1.25))
    # Perfectly balanced picks with uniform scores give exactly 1.
    uni = torch.ones(1, 4, 2)
    torch.testing.assert_close(sequence_balance_loss(uni, torch.tensor([[[0], [1], [0], [1]]]),
                                                     None), torch.tensor(1.0))


def test_counts_and_balance_loss_exclude_masked_tokens():
    moe = make_moe()
    x = torch.randn(2, 5, DIM)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    out = moe(x, None, token_mask=mask)
    expect = torch.bincount(out.routes[mask].flatten(), minlength=E).float()
    assert torch.equal(out.counts, expect) and out.counts.sum() == K * mask.sum()
    # Padding positions cannot change the loss: rerun with garbage in the masked slots.
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    torch.testing.assert_close(moe(x2, None, token_mask=mask).balance_loss, out.balance_loss)
    with pytest.raises(ValueError, match="token_mask"):
        moe(x, None, token_mask=mask.long())


# ------------------------------------------------------------------------------- plumbing
def test_local_dispatcher_roundtrip_and_replaceable():
    disp = LocalDispatcher(E)
    x = torch.randn(3, DIM)
    ids = torch.tensor([[2, 0], [0, 1], [3, 0]])
    w = torch.rand(3, 2)
    xs, counts, handle = disp.dispatch(x, ids, w)
    assert counts.tolist() == [3, 1, 1, 1]
    assert torch.equal(xs[:3], x)                                 # expert 0: tokens 0,1,2 in order
    torch.testing.assert_close(disp.combine(xs, handle), 2 * x)
    torch.testing.assert_close(disp.combine(xs, handle, weighted=True), x * w.sum(1, True))

    class Counting(LocalDispatcher):
        calls = 0

        def dispatch(self, *args):
            Counting.calls += 1
            return super().dispatch(*args)

    moe = make_moe()
    moe.dispatcher = Counting(E)
    moe(torch.randn(1, 2, DIM), None)
    assert Counting.calls == 1


def test_bf16_input_keeps_dtype_and_bad_x_rejected():
    moe = make_moe()
    out = moe(torch.randn(1, 3, DIM, dtype=torch.bfloat16), None)
    assert out.out.dtype == torch.bfloat16
    assert out.balance_loss.dtype == torch.float32 and out.counts.dtype == torch.float32
    assert out.routes.dtype == torch.int64
    with pytest.raises(ValueError, match="x"):
        moe(torch.randn(3, DIM), None)


def test_init_is_deterministic_and_meta_build_allocates_nothing():
    a, b = make_moe(layer_id=0, seed=7), make_moe(layer_id=0, seed=7)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.experts.w1, make_moe(layer_id=0, seed=8).experts.w1)
    with torch.device("meta"):
        big = MoE(get_config("flash"), 0)
    assert all(t.is_meta for t in [*big.parameters(), *big.buffers()])
    big.init_weights(0.02, torch.Generator().manual_seed(0))     # no-op on meta, no crash
    # meta -> real -> init gives the same module as building directly on CPU
    with torch.device("meta"):
        lazy = MoE(small_cfg(), 0)
    lazy.to_empty(device="cpu")
    lazy.init_weights(0.3, torch.Generator().manual_seed(7))
    assert all(torch.equal(lazy.state_dict()[k], v) for k, v in a.state_dict().items())


def test_sharded_meta_build_initialises_the_full_models_slice():
    """Expert parallelism builds on meta, keeps its experts, then materialises: each rank's
    experts must equal the matching slice of the unsharded model's init."""
    from model.dispatcher import LocalDispatcher
    from model.transformer import Transformer

    cfg = get_config("tiny")
    full = Transformer(cfg)
    for ep_rank in range(2):
        with torch.device("meta"):
            part = Transformer(cfg)
        part.shard_experts(ep_rank, 2, lambda layer_id: LocalDispatcher(cfg.n_routed_experts // 2))
        part.to_empty(device="cpu")
        part.init_weights()
        lo = ep_rank * cfg.n_routed_experts // 2
        for (name, p), q in zip(full.named_parameters(), part.parameters()):
            want = p[lo:lo + q.shape[0]] if ".ffn.experts." in name else p
            assert torch.equal(want, q), name
        for (name, b), c in zip(full.named_buffers(), part.buffers()):
            assert torch.equal(b, c), name


# ------------------------------------------------------------------------- keep routing
def test_keep_routing_forces_replayed_experts_keeps_router_gradient_and_reports_live_pick():
    """GRPO replays the sampler's routes (posttraining.md §1.2 item 4): the replayed experts
    are used even where the router disagrees (here the bottom-k, disjoint from its own pick),
    their weights come from the current scores (so the router still learns), and the router's
    own pick is reported as live_routes, equal to a forward without replay."""
    moe = make_moe()
    x = torch.randn(2, 5, DIM)
    own = moe(x, None)
    assert own.live_routes is None                                # nothing replayed
    x_flat = x.reshape(-1, DIM)
    bottom = (-router_weights(moe, x_flat, torch.arange(E).expand(10, E))).topk(K).indices
    bottom = bottom.reshape(2, 5, K)                              # bias is 0: lowest scores
    out = moe(x, None, routes=bottom)
    assert torch.equal(out.routes, bottom)
    assert torch.equal(out.live_routes, own.routes) and not out.live_routes.requires_grad
    assert float(routing_agreement(bottom, out.live_routes)) == 0.0
    assert float(routing_agreement(own.routes, out.live_routes)) == 1.0
    weights, _, _ = moe.gate(x_flat, None, bottom.reshape(-1, K))
    assert (weights > 0).all()
    torch.testing.assert_close(out.out.reshape(-1, DIM),
                               naive_moe(moe, x_flat, bottom.reshape(-1, K), weights),
                               rtol=1e-5, atol=1e-6)
    out.out.square().sum().backward()
    grad = moe.gate.weight.grad
    assert torch.isfinite(grad).all()
    assert (grad[bottom.unique()].abs().sum(-1) > 0).all()       # every replayed expert's row


def test_keep_routing_live_pick_on_hash_layers():
    moe = make_moe(layer_id=0)                                    # n_hash_layers=1
    ids = torch.randint(0, VOCAB, (2, 4))
    x = torch.randn(2, 4, DIM)
    routes = (moe.gate.tid2eid[ids] + 1) % E
    out = moe(x, ids, routes=routes)
    assert torch.equal(out.routes, routes)
    assert torch.equal(out.live_routes, moe.gate.tid2eid[ids])
    assert moe(x, None, routes=routes).live_routes is None        # no ids: no table lookup


def test_routing_agreement_is_a_set_overlap_over_masked_tokens():
    replayed = torch.tensor([[[0, 1], [2, 3], [0, 3]]])           # [1, 3, 2]
    live = torch.tensor([[[1, 0], [2, 0], [1, 2]]])               # order within a token is free
    assert float(routing_agreement(replayed, live)) == 0.5       # (1 + 1/2 + 0) / 3
    assert float(routing_agreement(replayed, live, torch.tensor([[True, True, False]]))) == 0.75
    assert float(routing_agreement(replayed, replayed)) == 1.0
    wide = torch.tensor([[[3, 2, 1], [0, 1, 2], [1, 2, 0]]])      # another k
    assert float(routing_agreement(replayed, wide)) == 0.5       # (1/2 + 1/2 + 1/2) / 3
    assert routing_agreement(replayed, live, torch.zeros(1, 3, dtype=torch.bool)).isnan()
    with pytest.raises(ValueError, match="routing_agreement"):
        routing_agreement(replayed, live[:, :2])
    with pytest.raises(ValueError, match="mask"):
        routing_agreement(replayed, live, torch.ones(1, 3))
