"""No learning signal, no update (`Trainer.signal_in`), through the real trainer step (DeepSpeed
engine, MuonAdamW with Muon or AdamW everywhere).

Run A takes steps [a, empty, b]; run B takes [a, b]. The empty step's micro-batches have no
target at all (its loss is 0 and so is its gradient). Held, it must leave every weight, buffer and
optimizer tensor bitwise as step a left them, the learning rate where it was, and count one
`steps_without_signal`; then step b must find exactly the state run B's step b finds, so both
runs end bitwise equal. Without the hold, AdamW's momentum and weight decay (or Muon's momentum)
move the weights on the empty step and the runs differ: the test checks that the empty step would
change something (the plain optimizer step differs), so it can fail.

Also the GRPO task's own rule: zero advantages everywhere carry no signal unless a KL penalty
is on.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.train.test_trainer_seam import ROWS, SEQ, VOCAB, MaskedSFTTask, global_batch, \
    model_config

pytest.importorskip("deepspeed")


class PlannedTask(MaskedSFTTask):
    """The seam test's batch per step, or the same rows with no target ("empty")."""

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, 0, 1)
        self.seed = seed

    def step_batches(self, kind: str, n_micro: int):
        full = global_batch()
        if kind == "empty":
            full["labels"] = torch.full_like(full["labels"], -100)
        elif kind == "b":  # another batch than a's
            full["input_ids"] = (full["input_ids"] * 7 + 3) % VOCAB
        size = ROWS // n_micro
        return [{k: v[i * size:(i + 1) * size] for k, v in full.items()} for i in range(n_micro)]


def _snapshot(trainer) -> dict:
    opt = trainer.optimizer.state_dict()["state"]
    return {"weights": {k: v.detach().numpy().copy()
                        for k, v in trainer.model.state_dict().items()},
            "opt": {(i, k): v.detach().numpy().copy() if torch.is_tensor(v) else v
                    for i, st in opt.items() for k, v in st.items()},
            "lr": trainer.scheduler.get_last_lr()[0]}


def run_plan(rank: int, world: int, plan: list[str], optim_name: str, run_dir: str):
    from omegaconf import OmegaConf

    from train.config import TrainConfig
    from train.dist import DistInfo
    from train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in {"run_dir": run_dir, "device": "cpu", "dtype": "fp32", "steps": 10,
                       "data.seq_len": SEQ, "data.micro_batch": 4, "data.vocab_size": VOCAB,
                       "batch.global_batch": ROWS, "recipe.csa_dense_until": 0,
                       "recipe.indexer_warmup_steps": 0, "optim.name": optim_name,
                       "optim.lr": 1e-2, "schedule.warmup_steps": 0}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    trainer = Trainer(cfg, DistInfo(rank, world, rank, torch.device("cpu")), model_config())
    trainer.attach(PlannedTask(cfg, 0))
    trainer.build()
    trainer.enter_phase(trainer.phase_for(0))
    out = []
    for kind in plan:
        stats = trainer.step_on(trainer.task.step_batches(kind, trainer.gas))
        trainer.count_outcome(stats)
        out.append({**_snapshot(trainer), "no_signal": stats.no_signal,
                    "held": trainer.steps_without_signal})
    return out


def _equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("optim_name", ["adamw", "muon"])
def test_a_step_without_signal_changes_nothing_and_the_run_continues_as_without_it(
        optim_name, tmp_path):
    held = run_distributed(run_plan, 1, ["a", "empty", "b"], optim_name, str(tmp_path / "A"),
                           timeout=240)[0]
    plain = run_distributed(run_plan, 1, ["a", "b"], optim_name, str(tmp_path / "B"),
                            timeout=240)[0]
    after_a, empty, after_b = held
    assert [s["no_signal"] for s in held] == [False, True, False] and after_b["held"] == 1
    assert _equal(empty["weights"], after_a["weights"])          # weights and buffers
    assert _equal(empty["opt"], after_a["opt"]) and empty["lr"] == after_a["lr"]
    assert _equal(after_b["weights"], plain[1]["weights"])       # as if the step never was
    assert _equal(after_b["opt"], plain[1]["opt"]) and after_b["lr"] == plain[1]["lr"]
    # the power to fail: an optimizer step on the empty batch would have moved the weights
    assert not _equal(after_a["weights"], plain[1]["weights"])


def test_grpo_zero_advantages_carry_no_signal_unless_kl_is_on():
    from types import SimpleNamespace

    from rl.grpo_task import GRPOTask

    task = SimpleNamespace()
    mask = torch.ones(2, 5)
    batch = {"loss_mask": mask, "advantages": torch.zeros(2), "beta": torch.zeros(2)}
    assert not GRPOTask.carries_signal(task, batch)
    assert GRPOTask.carries_signal(task, {**batch, "advantages": torch.tensor([0.0, 0.5])})
    masked = {**batch, "advantages": torch.tensor([0.0, 0.5]),
              "loss_mask": torch.stack([mask[0], torch.zeros(5)])}
    assert not GRPOTask.carries_signal(task, masked)             # the row with signal is masked
    kl = {**batch, "beta": torch.full((2,), 0.1), "ref_logp": torch.zeros(2, 5)}
    assert GRPOTask.carries_signal(task, kl)
