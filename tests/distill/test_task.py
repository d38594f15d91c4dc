"""The distillation task (`distill/task.py`) on real micro models, without the trainer.

- Each row reaches its own teacher: with one teacher per domain, the tokens a teacher's hidden
  states are kept for are exactly the response tokens of its domain's rows, and the loss of a
  row equals the dense KL to that row's teacher computed from full logits (fp32, same forward:
  1e-5 absolute on KLs of O(1e-1 - 1)).
- A mixture `teacher_weights` gives w·KL₁ + (1−w)·KL₂ per token.
- Every mode and term runs and is finite: kl=topk, kl=sampled (whose value at the first update
  is the sampled estimate), the task-reward term, the MTP term.
- The teacher map is checked: a domain whose teacher was not loaded is an error naming it.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.inference.conftest import build_model, micro_config
from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)



def distill_cfg(run_dir, **updates):
    from distill.config import DistillTrainConfig

    cfg = OmegaConf.structured(DistillTrainConfig)
    base = {"run_dir": str(run_dir), "data.micro_batch": 4, "distill.prompts_per_step": 4,
            "distill.group_size": 2, "distill.max_new_tokens": 6, "distill.kl_chunk": 7,
            "distill.teachers": {"strings": "a", "arith": "b"}}
    for key, value in {**base, **updates}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    d = cfg.distill
    cfg.batch.global_batch = d.prompts_per_step * d.group_size // d.updates
    return cfg


@pytest.fixture(scope="module")
def models():
    cfg = micro_config(vocab_size=512, max_seq_len=256)
    teachers = {}
    for name, seed in (("strings", 1), ("arith", 2)):
        t = build_model(cfg, seed)
        with torch.no_grad():
            t.head.weight.mul_(6.0)
        teachers[name] = t.requires_grad_(False)
    return cfg, build_model(cfg, 0), teachers


def make_task(cfg, tokenizer_file, model_cfg, teachers):
    from distill.onpolicy import build_domains
    from distill.task import DistillTask
    from train.dist import DistInfo

    return DistillTask(cfg, DistInfo(0, 1, 0, torch.device("cpu")), model_cfg, tokenizer_file,
                       build_domains(cfg), teachers)


def dense_row_kl(student, teacher, batch):
    """[N] KL(student ‖ teacher) at the response tokens, from full logits."""
    from distill.loss import reverse_kl_dense

    sel = batch["gen_mask"] > 0
    zs = student(batch["input_ids"], token_mask=batch["token_mask"], mtp=False).logits
    zt = teacher(batch["input_ids"], token_mask=batch["token_mask"], mtp=False).logits
    return reverse_kl_dense(zs[:, :-1][sel], zt[:, :-1][sel])


def test_each_row_reaches_its_own_teacher(tmp_path, models, domain_tokenizer_file):  # noqa: F811
    model_cfg, student, teachers = models
    cfg = distill_cfg(tmp_path, **{"distill.keep_routing": False, "distill.prompts_per_step": 8,
                                   "distill.group_size": 1})
    task = make_task(cfg, domain_tokenizer_file, model_cfg, teachers)
    batches = task.batches(0, 2, student)
    seen = set()
    for batch in batches:
        sel = batch["gen_mask"] > 0
        row_of_token = sel.nonzero()[:, 0]
        names = [task.domain_names[i] for i in batch["domain_id"].tolist()]
        per_token_teacher = {}
        for name in task.teacher_names:
            tokens = batch.get(f"teacher_tokens/{name}", torch.zeros(0, dtype=torch.long))
            rows = {names[r] for r in row_of_token[tokens].tolist()}
            assert rows <= {name}, (name, rows)
            for t in tokens.tolist():
                per_token_teacher[t] = name
            seen |= rows
        assert sorted(per_token_teacher) == list(range(int(sel.sum())))  # every token, once
        with torch.no_grad():
            out = task.loss(student, batch)
            want = torch.zeros(int(sel.sum()))
            for name in task.teacher_names:
                dense = dense_row_kl(student, teachers[name], batch)
                mine = torch.tensor([per_token_teacher[t] == name for t in range(len(want))])
                want = torch.where(mine, dense, want)
        assert float(out.total) == pytest.approx(float(want.sum()), abs=1e-5 * len(want))
        assert float(out.total) > 0.05 * len(want)
    assert seen == {"strings", "arith"}


def test_a_mixture_weights_the_teachers(tmp_path, models, domain_tokenizer_file):  # noqa: F811
    model_cfg, student, teachers = models
    mix = {"strings": {"strings": 0.25, "arith": 0.75}}
    cfg = distill_cfg(tmp_path, **{"distill.keep_routing": False, "distill.domains": ["strings"],
                                   "distill.teacher_weights": mix})
    task = make_task(cfg, domain_tokenizer_file, model_cfg, teachers)
    batch = task.batches(0, 2, student)[0]
    with torch.no_grad():
        out = task.loss(student, batch)
        want = (0.25 * dense_row_kl(student, teachers["strings"], batch)
                + 0.75 * dense_row_kl(student, teachers["arith"], batch))
    assert float(out.total) == pytest.approx(float(want.sum()), rel=1e-5)


@pytest.mark.parametrize("updates", [
    {"distill.kl": "topk", "distill.topk": 8},
    {"distill.kl": "sampled"},
    {"distill.reward_coef": 0.5},
    {"distill.mtp_weight": 0.3},
    {"distill.top_p": 0.9, "distill.top_k": 20},
])
def test_every_mode_and_term_runs(tmp_path, models, domain_tokenizer_file, updates):  # noqa: F811
    model_cfg, student, teachers = models
    cfg = distill_cfg(tmp_path, **updates)
    task = make_task(cfg, domain_tokenizer_file, model_cfg, teachers)
    for batch in task.batches(0, 2, student):
        student.zero_grad()
        out = task.loss(student, batch)
        assert torch.isfinite(out.total)
        out.total.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        if updates.get("distill.kl") == "sampled":  # π_θ = π_old at the first update
            assert float(out.total.detach()) == pytest.approx(float(out.metrics["kl"]), abs=1e-4)
        if "distill.mtp_weight" in updates:
            assert float(out.metrics["mtp_kl"]) > 0
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in student.named_parameters() if n.startswith("mtp."))


def test_a_missing_teacher_is_named(tmp_path, models, domain_tokenizer_file):  # noqa: F811
    model_cfg, student, teachers = models
    cfg = distill_cfg(tmp_path)
    with pytest.raises(ValueError, match="no teacher model for \\['arith'\\]"):
        make_task(cfg, domain_tokenizer_file, model_cfg, {"strings": teachers["strings"]})
