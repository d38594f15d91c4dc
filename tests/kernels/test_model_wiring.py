"""The model's kernel path equals its reference path: a tiny model's logits and gradients with
every dispatcher on Triton (interpreter on CPU) match `V4_KERNELS=ref`."""

import pytest
import torch

from model.config import get_config
from model.loss import compute_loss
from model.transformer import Transformer


def _run(monkeypatch, mode):
    monkeypatch.setenv("V4_KERNELS", mode)
    cfg = get_config("tiny").replace(dim=64, n_heads=2, head_dim=32, rope_head_dim=8,
                                     q_lora_rank=32, o_lora_rank=32, index_n_heads=2,
                                     index_head_dim=16, index_topk=4, moe_inter_dim=32,
                                     n_routed_experts=4, vocab_size=256, window_size=8,
                                     compress_ratios=(0, 4, 8, 4, 0),
                                     # the interpreted mHC backward costs per Sinkhorn
                                     # iteration; tests/kernels/test_mhc.py checks all 20
                                     hc_sinkhorn_iters=4)
    model = Transformer(cfg)
    model.set_csa_mode("sparse", indexer_loss=True)
    # 28 tokens, two documents: several CSA/HCA blocks, the window and the indexer's top-k all
    # act, and one block straddles the document boundary
    ids = torch.randint(0, cfg.vocab_size, (1, 28), generator=torch.Generator().manual_seed(0))
    out = model(ids, doc_ids=torch.tensor([[0] * 18 + [1] * 10]))
    loss = compute_loss(out, ids).total
    loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(300)
def test_model_kernel_path_matches_reference(monkeypatch):
    ref_logits, ref_grads = _run(monkeypatch, "ref")
    logits, grads = _run(monkeypatch, "triton")
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-4, rtol=2e-3, msg=name)
