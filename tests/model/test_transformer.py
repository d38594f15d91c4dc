"""Whole-model behaviour on the tiny preset: causality, document isolation, gradients, learning,
routing replay, determinism; configs and parameter counts of the released shapes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, get_config
from model.loss import compute_loss, next_token_labels, shift_labels
from model.moe import routing_agreement
from model.summary import count_parameters
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(os.environ.get("V4_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
CONFIGS = CONFORMANCE / "configs"
needs_conformance = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"released configs not found at {CONFIGS} (set V4_CONFORMANCE_DIR)")

TINY = get_config("tiny")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(TINY).eval()


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("change,field", [
    (dict(n_heads=6, o_groups=4), "n_heads"),
    (dict(compress_ratios=(0, 4, 16)), "compress_ratios"),
    (dict(score_func="relu"), "score_func"),
    (dict(compress_ratios=(0, 2, 16, 4, 0)), "compress_ratios"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(csa_mode="topk"), "csa_mode"),
])
def test_config_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        TINY.replace(**change)


def test_tiny_preset_has_every_layer_kind():
    kinds = {TINY.layer_kind(i) for i in range(TINY.n_layers)}
    assert kinds == {"swa", "csa", "hca"}
    assert TINY.n_hash_layers >= 1 and TINY.n_mtp_layers == 1 and TINY.hc_mult == 4
    assert 3e6 < count_parameters(TINY).total < 30e6


@needs_conformance
@pytest.mark.parametrize("name", ["flash", "pro"])
def test_released_configs_import_in_both_namings(name):
    preset = get_config(name)
    shape_fields = [f for f in preset.to_dict() if f not in ("quantization", "expert_dtype")]
    for naming in ("hf", "inference"):
        cfg = get_config(str(CONFIGS / f"{name}_{naming}_config.json"))
        for f in shape_fields:
            assert getattr(cfg, f) == getattr(preset, f), (naming, f)
    # export to HF naming and back
    again = ModelConfig.from_released(preset.to_hf_dict())
    assert again == preset


def test_bad_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    raw = TINY.to_hf_dict()
    raw.update(num_attention_heads=3, o_groups=2)
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"bad.json: ModelConfig.n_heads=3"):
        get_config(str(bad))
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_config("huge")


@pytest.mark.parametrize("name,total,active,tol_total,tol_active", [
    ("flash", 284e9, 13e9, 0.01, 0.05),
    ("pro", 1.6e12, 49e9, 0.03, 0.05),
])
def test_released_parameter_counts(name, total, active, tol_total, tol_active):
    counts = count_parameters(get_config(name))
    full = counts.total + (counts.mtp if name == "pro" else 0)  # Pro's 1.6T includes MTP
    assert abs(full / total - 1) < tol_total, full
    assert abs(counts.activated / active - 1) < tol_active, counts.activated


def test_model_summary_cli():
    out = subprocess.run([sys.executable, "-m", "model", "conf=flash"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "284.33B" in out.stdout and "13.27B" in out.stdout and "KV cache at 1M" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "model", "conf=huge"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown model preset" in bad.stderr


# ---------------------------------------------------------------------- behaviour
def test_whole_model_causality(tiny_model):
    torch.manual_seed(1)
    ids = torch.randint(0, TINY.vocab_size, (1, 300))
    with torch.no_grad():
        base = tiny_model(ids)
        for t in (15, 63, 64, 200):
            ids2 = ids.clone()
            ids2[:, t + 1:] = torch.randint(0, TINY.vocab_size, (1, 299 - t))
            out = tiny_model(ids2)
            assert torch.equal(base.logits[:, :t + 1], out.logits[:, :t + 1]), t
            # MTP at position i reads token i+1: unaffected up to t-1
            assert torch.equal(base.mtp_logits[0][:, :t], out.mtp_logits[0][:, :t]), t
            assert not torch.allclose(base.logits[:, t + 1:], out.logits[:, t + 1:])


def test_packed_documents_equal_documents_alone(tiny_model):
    """Each document alone gives the packed row's logits. BLAS rounding depends on the batch
    shape, which can flip a top-k expert choice at a near-tie; the alone runs therefore replay
    the packed run's routes (checked to agree on ≥ 97% of choices) so the comparison isolates
    attention, compression, indexer and MTP."""
    torch.manual_seed(2)
    lengths = [37, 90, 61]
    ids = torch.randint(2, TINY.vocab_size, (1, sum(lengths)))
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = tiny_model(ids, doc_ids=doc)
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            own = tiny_model(ids[:, sl])
            agree = torch.stack([(a[:, sl] == b).float().mean()
                                 for a, b in zip(packed.routes, own.routes)]).mean()
            assert agree > 0.97, agree
            alone = tiny_model(ids[:, sl], routes=[r[:, sl] for r in packed.routes])
            torch.testing.assert_close(packed.logits[:, sl], alone.logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(packed.mtp_logits[0][:, sl], alone.mtp_logits[0],
                                       atol=1e-4, rtol=1e-4)
            start += n


def test_labels_never_cross_documents():
    ids = torch.arange(10)[None]
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    labels = next_token_labels(ids, doc)
    assert labels.tolist() == [[1, 2, -100, 4, 5, 6, -100, 8, 9, -100]]
    assert shift_labels(labels, doc, 1).tolist() == [[2, -100, -100, 5, 6, -100, -100, 9, -100,
                                                      -100]]


def test_every_parameter_gets_a_gradient_and_buffers_are_frozen():
    torch.manual_seed(3)
    model = Transformer(TINY)
    model.set_csa_mode("sparse", indexer_loss=True)
    ids = torch.randint(0, TINY.vocab_size, (2, 128))
    loss = compute_loss(model(ids), ids)
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []  # no intended exception
    names = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "layers.0.ffn.gate.tid2eid" in buffers and "layers.1.ffn.gate.bias" in buffers
    assert not any(n.endswith(("tid2eid", "gate.bias")) for n in names)


def test_dense_csa_mode_trains_indexer_too():
    torch.manual_seed(4)
    model = Transformer(TINY)
    model.set_csa_mode("dense", indexer_loss=True)
    ids = torch.randint(0, TINY.vocab_size, (1, 96))
    out = model(ids)
    assert out.indexer_loss > 0
    compute_loss(out, ids).total.backward()
    assert model.layers[1].attn.indexer.wq_b.weight.grad.abs().sum() > 0


def test_routes_replay_and_shapes(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        out = tiny_model(ids)
        assert len(out.routes) == TINY.n_layers + TINY.n_mtp_layers
        assert out.routes[1].shape == (2, 40, TINY.n_activated_experts)
        assert out.expert_counts.shape == (5, TINY.n_routed_experts)
        assert out.expert_counts.sum(1).eq(2 * 40 * TINY.n_activated_experts).all()
        replay = tiny_model(ids, routes=out.routes)
        torch.testing.assert_close(replay.logits, out.logits)
        other = [torch.roll(r, 1, dims=-1) if i else r for i, r in enumerate(out.routes)]
        other[2] = (out.routes[2] + 1) % TINY.n_routed_experts
        assert not torch.allclose(tiny_model(ids, routes=other).logits, out.logits)
    with pytest.raises(ValueError, match="routes"):
        tiny_model(ids, routes=out.routes[:2])


def test_replayed_routes_report_the_live_router_pick(tiny_model):
    """Keep Routing through the whole model: `live_routes` is what each router would have
    picked for the hidden states it got. Replaying the model's own routes changes nothing (live
    = replayed, agreement 1); replaying others at layer 1 uses them, leaves that router's own
    pick as the no-replay one (its input does not depend on layer 1), and it gets gradient."""
    ids = torch.randint(0, TINY.vocab_size, (1, 32))
    n = TINY.n_layers
    with torch.no_grad():
        own = tiny_model(ids)
        assert own.live_routes == [None] * (n + TINY.n_mtp_layers)
        same = tiny_model(ids, routes=own.routes[:n] + [None] * TINY.n_mtp_layers)
    for i in range(n):
        assert torch.equal(same.live_routes[i], own.routes[i])
        assert float(routing_agreement(own.routes[i], same.live_routes[i])) == 1.0
    assert same.live_routes[n:] == [None] * TINY.n_mtp_layers
    other = list(own.routes[:n]) + [None] * TINY.n_mtp_layers
    other[1] = (own.routes[1] + 1) % TINY.n_routed_experts
    try:
        out = tiny_model(ids, routes=other)
        assert torch.equal(out.routes[1], other[1])
        assert torch.equal(out.live_routes[1], own.routes[1])
        assert float(routing_agreement(other[1], out.live_routes[1])) < 1.0
        out.logits.square().mean().backward()
        grad = tiny_model.layers[1].ffn.gate.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        tiny_model.zero_grad(set_to_none=True)


def test_router_bias_update_through_model():
    model = Transformer(TINY)
    counts = torch.zeros(5, TINY.n_routed_experts)
    counts[:, 0] = 100.0
    model.update_router_biases(counts, speed=0.01)
    bias = model.layers[1].ffn.gate.bias
    assert bias[0] < 0 and (bias[1:] > 0).all()
    assert not hasattr(model.layers[0].ffn.gate, "bias") or model.layers[0].ffn.gate.bias is None


def test_init_is_deterministic():
    a, b = Transformer(TINY), Transformer(TINY)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = Transformer(TINY.replace(seed=1))
    assert not torch.equal(c.layers[0].attn.wq_a.weight, a.layers[0].attn.wq_a.weight)


def test_tiny_forward_backward_2x512_is_fast():
    model = Transformer(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 512))
    start = time.perf_counter()
    compute_loss(model(ids), ids).total.backward()
    assert time.perf_counter() - start < 60  # a few seconds here; generous for loaded CI


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(5)
    model = Transformer(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        loss = compute_loss(model(ids), ids).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if loss.item() < 0.5:
            break
    assert first > 8.5 and loss.item() < 0.5, (first, loss.item(), step)


def test_bf16_autocast_forward_backward(tiny_model):
    """Under bf16 autocast the fp32 islands (router, compressor softmax, mHC, losses) keep the
    result close to fp32, and backward runs."""
    ids = torch.randint(0, TINY.vocab_size, (1, 96))
    with torch.no_grad():
        ref = tiny_model(ids)
    model = Transformer(TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, routes=ref.routes)
        loss = compute_loss(out, ids)
    assert out.balance_loss.dtype == torch.float32 and loss.total.dtype == torch.float32
    loss.total.backward()
    assert torch.isfinite(model.layers[1].attn.wq_a.weight.grad).all()
    diff = (out.logits.float() - ref.logits).abs().max()
    assert diff < 0.1 * ref.logits.abs().max(), diff
