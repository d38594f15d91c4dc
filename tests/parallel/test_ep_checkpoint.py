"""Checkpoints are independent of ep_size: a model saved at EP=2 (experts gathered into full
stacks by the checkpoint code) loads at EP=1 and EP=4 (experts sliced per rank) and gives the
same logits; the consolidated safetensors hold every expert and load without any EP code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.parallel.harness import perturbed_model, small_config

pytest.importorskip("deepspeed")


def _model(ep_size: int):
    return perturbed_model(ep_size)


def _batch():
    return torch.randint(2, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _save(rank, world, run_dir):
    import optim
    from train import checkpoint as ckpt
    from train import expert_parallel as ep
    from train.dist import DistInfo

    model, groups = _model(world)
    opt = optim.build_optimizer(model, lr=1e-3, model_config=model.cfg,
                                expert_process_group=ep.optimizer_shard_group(groups))
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    ckpt.save_checkpoint(run_dir, 1, info, model, opt, {"step": 1}, "", None, keep=1,
                         ep_groups=groups)
    with torch.no_grad():
        return model(_batch()).logits.numpy()


def _load(rank, world, model_dir):
    from model.transformer import Transformer
    from train import checkpoint as ckpt
    from train import expert_parallel as ep

    torch.manual_seed(1)                       # a different init: everything must come from disk
    model = Transformer(small_config(seed=5))
    if world > 1:
        ep.shard_model(model, ep.create_groups(world))
    ckpt.load_weights(Path(model_dir), model, "cpu")
    with torch.no_grad():
        return model.eval()(_batch()).logits.numpy()


def test_save_at_ep2_load_at_ep1_and_ep4_same_logits(tmp_path):
    saved = run_distributed(_save, 2, tmp_path, timeout=120)
    np.testing.assert_allclose(saved[0], saved[1], atol=1e-6)
    model_dir = tmp_path / "checkpoints" / "step_00000001" / "model"
    from tests.helpers.weights import read_weights

    w = read_weights(model_dir)                                   # both ranks wrote files
    assert w["layers.1.ffn.experts.w1"].shape[0] == 8             # all experts, not rank 0's
    assert w["mtp.0.ffn.experts.w2"].shape[0] == 8
    full, _ = _model(1)                                           # the unsharded truth
    for k, t in full.state_dict().items():
        torch.testing.assert_close(w[k], t, msg=k)
    with torch.no_grad():
        truth = full(_batch()).logits.numpy()
    np.testing.assert_allclose(saved[0], truth, atol=1e-5, rtol=1e-5)
    at1 = run_distributed(_load, 1, model_dir, timeout=120)[0]
    np.testing.assert_allclose(at1, truth, atol=1e-5, rtol=1e-5)
    at4 = run_distributed(_load, 4, model_dir, timeout=150)
    for logits in at4:
        np.testing.assert_allclose(logits, truth, atol=1e-5, rtol=1e-5)
    # the consolidated export loads with the plain loader (no EP code involved)
    from model.weights import load_pretrained

    with torch.no_grad():
        plain = load_pretrained(model_dir).eval()(_batch()).logits.numpy()
    np.testing.assert_allclose(plain, truth, atol=1e-5, rtol=1e-5)


def test_resume_at_another_ep_size_fails_clearly(tmp_path):
    from train import checkpoint as ckpt
    from train.dist import DistInfo

    run_distributed(_save, 2, tmp_path, timeout=120)
    path = tmp_path / "checkpoints" / "step_00000001"
    state = torch.load(path / "trainer_rank0.pt", weights_only=False)
    assert state["ep_size"] == 2
    from model.transformer import Transformer

    model = Transformer(small_config())
    model.expert_parallel = (0, 1)
    with pytest.raises(ValueError, match="parallel.ep_size=2, resuming with 1"):
        ckpt.load_checkpoint(path, DistInfo(0, 2, 0, torch.device("cpu")), model, None)
