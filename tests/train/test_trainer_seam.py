"""The trainer core as a seam: a stage's loss is a sum plus a count, and the trainer divides by
the count summed over micro-batches and ranks.

An assistant-masked SFT-style loss whose micro-batches hold very different numbers of target
tokens (1 to 31 of 32) must give the gradient of (Σ token losses) / (Σ target tokens) whether the
8-row global batch runs as 1 rank × 8 micro-batches, 1 × 1 big batch or 2 gloo ranks × 4, through
the real trainer (DeepSpeed engine, MuonAdamW, `Trainer.accumulate`), and that gradient equals
plain autograd of the definition. A mean per micro-batch (the old contract) would weight a
micro-batch of 1 target token like one of 31: the test checks that this differs by far more than
the tolerance, so it has the power to fail.

Tolerance: fp32 throughout; the three layouts sum the same ~250 per-token terms of O(1) in
different orders, and DeepSpeed's average over ranks rescales by 1/world and back, so gradients
agree to a few ulps of their magnitude (max |g| ~ 1e-2 here): atol 1e-6 and rtol 1e-5.

The stage here does not train the MTP block (`train_mtp = False`): its parameters must get no
gradient at all (frozen, skipped in the forward), in every layout.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from train.task import Task

pytest.importorskip("deepspeed")

ROWS, SEQ, VOCAB = 8, 32, 256
TARGETS = [1, 31, 3, 17, 2, 29, 8, 5]  # target tokens per row: very uneven micro-batches


def model_config():
    from tests.parallel.harness import small_config

    return small_config(vocab_size=VOCAB)


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.full((ROWS, SEQ), -100)
    for r, n in enumerate(TARGETS):  # the "assistant" part: the last n positions
        labels[r, SEQ - 1 - n:SEQ - 1] = ids[r, SEQ - n:]
    return {"input_ids": ids, "labels": labels}


def token_loss_sum(model, batch) -> torch.Tensor:
    out = model(batch["input_ids"], mtp=False)
    return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1),
                                             batch["labels"].flatten(), ignore_index=-100,
                                             reduction="sum"), out


class MaskedSFTTask(Task):
    """A minimal stage: this rank's rows of one fixed global batch, cut into micro-batches."""

    train_mtp = False

    def __init__(self, cfg, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world

    def batches(self, step, n_micro, model):
        full = global_batch()
        mine = {k: v[self.rank::self.world] for k, v in full.items()}
        size = len(mine["input_ids"]) // n_micro
        return [{k: v[i * size:(i + 1) * size] for k, v in mine.items()} for i in range(n_micro)]

    def count(self, batch):
        return float((batch["labels"] != -100).sum())

    def loss(self, model, batch):
        from train.task import LossOutput

        total, out = token_loss_sum(model, batch)
        return LossOutput(total, {"ce": total.detach()}, out.expert_counts)


def trainer_gradients(rank: int, world: int, micro_batch: int, run_dir: str):
    from omegaconf import OmegaConf

    from train.config import TrainConfig
    from train.dist import DistInfo
    from train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in {"run_dir": run_dir, "device": "cpu", "dtype": "fp32", "steps": 10,
                       "data.seq_len": SEQ, "data.micro_batch": micro_batch, "data.vocab_size": VOCAB,
                       "batch.global_batch": ROWS, "recipe.csa_dense_until": 0,
                       "recipe.indexer_warmup_steps": 0}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    trainer = Trainer(cfg, info, model_config())
    trainer.attach(MaskedSFTTask(cfg, rank, world))
    trainer.build()
    trainer.enter_phase(trainer.phase_for(0))
    initial = {k: v.detach().numpy().copy() for k, v in trainer.model.state_dict().items()}
    trainer.accumulate(trainer.task.batches(0, trainer.gas, trainer.model))
    grads = {n: None if p.grad is None else p.grad.detach().numpy().copy()
             for n, p in trainer.model.named_parameters()}
    return {"grads": grads, "gas": trainer.gas, "count": trainer.global_count,
            "loss": float(trainer.sums[0]), "initial": initial if rank == 0 else None}


def reference_gradients(initial: dict[str, np.ndarray], per_micro_batch_mean: bool = False):
    """Plain autograd of the definition (or of the old per-micro-batch mean, for contrast)."""
    from model.transformer import Transformer

    model = Transformer(model_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
    model.set_csa_mode("sparse", indexer_loss=True)
    batch = global_batch()
    if per_micro_batch_mean:
        parts = [token_loss_sum(model, {k: v[i:i + 1] for k, v in batch.items()})[0]
                 / TARGETS[i] for i in range(ROWS)]
        loss = torch.stack(parts).mean()
    else:
        loss = token_loss_sum(model, batch)[0] / sum(TARGETS)
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    run = lambda world, micro: run_distributed(  # noqa: E731
        trainer_gradients, world, micro, str(tmp_path_factory.mktemp("run")), timeout=240)
    return {"1x8": run(1, 1), "1x1": run(1, 8), "2x4": run(2, 1)}


def test_gradient_is_sum_over_global_count_in_every_layout(layouts):
    one = layouts["1x8"][0]
    assert one["gas"] == 8 and layouts["1x1"][0]["gas"] == 1 and layouts["2x4"][0]["gas"] == 4
    assert one["count"] == sum(TARGETS)
    reference = reference_gradients(one["initial"])
    old_rule = reference_gradients(one["initial"], per_micro_batch_mean=True)
    trained = sorted(reference)
    # DeepSpeed materialises zeros for trainable parameters the loss did not reach (here the
    # indexer, trained only by its own KL term); autograd leaves them None
    for n, g in one["grads"].items():
        assert n in reference or g is None or not g.any(), f"{n}: gradient autograd has not"
    for name, results in layouts.items():
        for rank, got in enumerate(results):
            for n in trained:
                np.testing.assert_allclose(got["grads"][n], reference[n], atol=1e-6, rtol=1e-5,
                                           err_msg=f"{name} rank {rank}: gradient of {n}")
    # the contract has teeth: the old per-micro-batch mean moves gradients far beyond 1e-6
    worst = max(float(np.abs(old_rule[n] - reference[n]).max()) for n in trained)
    assert worst > 1e-4, worst


def test_a_stage_that_does_not_train_mtp_leaves_it_without_gradients(layouts):
    for results in layouts.values():
        for got in results:
            mtp = {n: g for n, g in got["grads"].items() if n.startswith("mtp.")}
            assert mtp and all(g is None for g in mtp.values())
            assert any(g is not None for n, g in got["grads"].items()
                       if not n.startswith("mtp."))
