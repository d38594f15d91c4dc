"""The GRPO task (`rl/grpo_task.py`) on a real micro model, without the trainer.

- Same code, same numbers: at the first update of a fresh rollout (fp32, top-k + top-p + T=0.7,
  so the kept sets matter) the training forward with the sampled routes replayed and π_θ
  renormalised over the kept sets gives back the sampler's log-probs: ratio 1 and mismatch KL 0
  up to fp32 rounding (the cached decode and the full forward sum in different orders; the
  sampler-side test in tests/inference bounds the log-prob gap at 1e-4, so the mean ratio is
  within 1e-4 of 1 and the k3 mismatch, second order in the gap, below 1e-7). With
  `recompute_old_logprobs` π_old comes from the same forward on the same inputs: the ratio is
  exactly 1 (bitwise on CPU) and the clip fractions exactly 0.
- Rollouts as data: the generated positions, advantages (zero mean per group), kept sets and
  routes line up; the live router agrees with the replayed routes at the first update.
- Rewards never crash a run: a verifier that raises or hangs scores 0 and is counted; prompts
  longer than the context are skipped and, when nothing is left, a clear error says so.
- Config errors name the key.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from data.domains.base import Score
from data.domains.strings import StringsDomain
from rl.grpo_task import MIN_VARIED_GROUPS
from tests.inference.conftest import build_model, micro_config
from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)



def grpo_cfg(run_dir, **updates):
    from rl.config import GRPOTrainConfig

    cfg = OmegaConf.structured(GRPOTrainConfig)
    base = {"run_dir": str(run_dir), "data.micro_batch": 4, "grpo.prompts_per_step": 2,
            "grpo.group_size": 4, "grpo.max_new_tokens": 8, "grpo.temperature": 0.7,
            "grpo.top_k": 12, "grpo.top_p": 0.9, "grpo.overlong": "none"}
    for key, value in {**base, **updates}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    if "batch.global_batch" not in updates:  # what conf/grpo.yaml derives
        g = cfg.grpo
        cfg.batch.global_batch = max(g.prompts_per_step * g.group_size // g.updates, 1)
    return cfg


def make_task(cfg, tokenizer_file, model_cfg, domains=None, generate_fn=None):
    from rl.grpo_task import GRPOTask
    from train.dist import DistInfo
    from data.domains.spec import section_domains

    domains = domains if domains is not None else section_domains(cfg.grpo, "grpo")
    return GRPOTask(cfg, DistInfo(0, 1, 0, torch.device("cpu")), model_cfg, tokenizer_file,
                    domains, generate_fn=generate_fn)


@pytest.fixture(scope="module")
def policy():
    cfg = micro_config(vocab_size=512, max_seq_len=256)
    return cfg, build_model(cfg, seed=3)


def n_micro(cfg) -> int:
    g = cfg.grpo
    return g.prompts_per_step * g.group_size // g.updates // cfg.data.micro_batch


@pytest.mark.parametrize("recompute", [False, True])
def test_first_update_reproduces_the_sampler(tmp_path, policy, domain_tokenizer_file,  # noqa: F811
                                             recompute):
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.recompute_old_logprobs": recompute})
    task = make_task(cfg, domain_tokenizer_file, model_cfg)
    batches = task.batches(0, n_micro(cfg), model)
    assert len(batches) == n_micro(cfg)
    for batch in batches:
        assert "kept_ids" in batch and "routes" in batch  # top-k/top-p: kept sets stored
        out = task.loss(model, batch)
        count = task.count(batch)
        m = {k: float(v) / count for k, v in out.metrics.items()}
        if recompute:
            assert float(out.metrics["ratio"]) == count  # exactly 1 per token
            assert m["clip_low_frac"] == 0.0 and m["clip_high_frac"] == 0.0
        else:
            assert abs(m["ratio"] - 1.0) < 1e-4, m
            assert m["mismatch_kl"] < 1e-7, m
        assert m["routing_agreement"] > 0.99, m
        out.total.backward()  # the loss reaches the weights, routers included
        router = model.layers[1].ffn.gate.weight.grad
        assert router is not None and torch.isfinite(router).all()
        model.zero_grad()


def test_rollout_batches_line_up(tmp_path, policy, domain_tokenizer_file):  # noqa: F811
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.updates": 2, "grpo.prompts_per_step": 4})
    task = make_task(cfg, domain_tokenizer_file, model_cfg)
    first = task.batches(0, n_micro(cfg), model)
    assert len(task.buffer) == 1  # μ = 2: the second mini-batch waits for the next step
    metrics = task.step_metrics(1.0)
    assert metrics["rollout/index"] == 1 and 0 <= metrics["reward/mean"] <= 1
    assert task.step_metrics(1.0) == {}  # logged once
    second = task.batches(1, n_micro(cfg), model)
    assert not task.buffer and task.rollouts == 1  # no new rollout for the second update
    advantages = []
    for batch in first + second:
        gen = batch["gen_mask"]
        assert gen.shape == batch["sampler_logp"].shape == batch["loss_mask"].shape
        assert (batch["sampler_logp"][gen == 0] == 0).all()
        assert (batch["sampler_logp"][gen > 0] <= 0).all()
        assert int(batch["kept_counts"].numel()) == int(gen.sum())
        # the kept set of each generated position holds the token that was drawn
        targets = batch["input_ids"][:, 1:][gen > 0]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                             batch["kept_counts"].long().cumsum(0)])
        for row, tok in enumerate(targets.tolist()):
            assert tok in batch["kept_ids"][offsets[row]:offsets[row + 1]].tolist()
        assert batch["routes"].shape[:2] == batch["input_ids"].shape
        advantages += batch["advantages"].tolist()
    assert abs(sum(advantages)) < 1e-5  # group means are subtracted
    # resume: the state holds the unused mini-batch
    state = task.state_dict()
    again = make_task(cfg, domain_tokenizer_file, model_cfg)
    again.load_state_dict(state)
    assert again.cursor == task.cursor and again.rollouts == task.rollouts


def test_tool_results_are_context_not_targets(tmp_path, domain_tokenizer_file):  # noqa: F811
    """Calculator (multi-turn): the tool result the rollout appends is in `input_ids` but never
    a generated position (no log-prob, no loss); the model's own turns are."""
    from data.domains.calculator import CalculatorDomain
    from encoding.tokenizer import load_tokenizer
    from tests.train._rollout_support import Oracle

    tok = load_tokenizer(domain_tokenizer_file)
    cfg = grpo_cfg(tmp_path, **{"grpo.keep_routing": False, "grpo.top_k": 0,
                                "grpo.top_p": 1.0, "grpo.group_size": 2,
                                "grpo.max_new_tokens": 64})
    model_cfg = micro_config(vocab_size=512, max_seq_len=256)
    domain = CalculatorDomain(schema="brief")
    probe = make_task(cfg, domain_tokenizer_file, model_cfg, [(domain, 1.0)])
    items = [probe.prompt(i)[1] for i in range(cfg.grpo.prompts_per_step)]
    task = make_task(cfg, domain_tokenizer_file, model_cfg, [(domain, 1.0)],
                     generate_fn=Oracle(tok, items))
    (batch,) = task.batches(0, 1, build_model(model_cfg))  # the oracle samples
    assert "routes" not in batch and "kept_ids" not in batch
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row, 1:]
        gen = batch["gen_mask"][row] > 0
        generated = tok.decode(ids[gen].tolist(), skip_special_tokens=False)
        context = tok.decode(ids[~gen & batch["token_mask"][row, 1:]].tolist(),
                             skip_special_tokens=False)
        assert "<tool_result>" in context and "<tool_result>" not in generated
        assert "calculator" in generated  # the model's own tool call is trained
        assert (batch["sampler_logp"][row][~gen] == 0).all()
        assert (batch["loss_mask"][row][~gen] == 0).all()
    assert task.step_metrics(1.0)["reward/mean"] == 1.0  # the oracle answers correctly


class RaisingStrings(StringsDomain):
    def verify(self, item, completion_text):
        raise RuntimeError("verifier bug")


class HangingStrings(StringsDomain):
    def verify(self, item, completion_text):
        while True:
            pass


def test_verifier_errors_and_hangs_score_zero(tmp_path, policy, domain_tokenizer_file):  # noqa: F811
    from train.verify import timed_verify

    item = StringsDomain().sample("train", 0)
    start = time.perf_counter()
    score = timed_verify(HangingStrings(), item, "x", timeout=0.2)
    assert time.perf_counter() - start < 5
    assert score.reward == 0 and score.error.startswith("timeout")
    assert timed_verify(RaisingStrings(), item, "x", 1.0).error.startswith("RuntimeError")
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.reward_timeout": 0.05})
    task = make_task(cfg, domain_tokenizer_file, model_cfg, [(HangingStrings(), 1.0)])
    task.batches(0, n_micro(cfg), model)
    m = task.step_metrics(1.0)
    assert m["rollout/verifier_timeouts"] == 8 and m["reward/mean"] == 0.0


class ZeroStrings(StringsDomain):
    def verify(self, item, completion_text):
        return Score.graded(False, "never")


def test_dynamic_sampling_refills_zero_variance_groups(tmp_path, policy,
                                                      domain_tokenizer_file):  # noqa: F811
    """Every group has zero reward variance: dynamic sampling draws `max_refill_rounds` more
    rounds of prompts, then fills the batch with zero-variance groups (zero advantages)."""
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.dynamic_sampling": True, "grpo.max_refill_rounds": 2})
    task = make_task(cfg, domain_tokenizer_file, model_cfg, [(ZeroStrings(), 1.0)])
    batches = task.batches(0, n_micro(cfg), model)
    assert task.cursor == 3 * cfg.grpo.prompts_per_step  # the first round and two refills
    m = task.step_metrics(1.0)
    assert m["rollout/zero_var_frac"] == 1.0 and m["rollout/rounds"] == 3
    assert all((b["advantages"] == 0).all() for b in batches)
    plain = make_task(grpo_cfg(tmp_path), domain_tokenizer_file, model_cfg,
                      [(ZeroStrings(), 1.0)])
    plain.batches(0, n_micro(cfg), model)
    assert plain.cursor == cfg.grpo.prompts_per_step  # without it: one round


def test_prompts_longer_than_the_context_are_a_clear_error(tmp_path, domain_tokenizer_file):  # noqa: F811
    model_cfg = micro_config(vocab_size=512, max_seq_len=8)
    model = build_model(model_cfg)
    cfg = grpo_cfg(tmp_path)
    task = make_task(cfg, domain_tokenizer_file, model_cfg)
    with pytest.raises(RuntimeError, match="longer than the context"):
        task.batches(0, n_micro(cfg), model)


def test_config_errors_name_the_key(tmp_path):
    from rl.config import grpo_problems

    cases = [({"grpo.group_size": 1}, "grpo.group_size=1"),
             ({"grpo.loss_agg": "sum"}, "grpo.loss_agg='sum'"),
             ({"grpo.prompts_per_step": 3}, "multiple of the world size 2"),
             ({"grpo.updates": 3}, "grpo.updates=3"),
             ({"grpo.beta_per_domain": {"arith": 0.1}}, "grpo.beta_per_domain"),
             ({"grpo.temperature": 0.0}, "grpo.temperature=0.0"),
             ({"batch.global_batch": 16}, "batch.global_batch=16: GRPO takes"),
             ({"grpo.speculative": True, "parallel.ep_size": 2}, "grpo.speculative=true")]
    for changes, message in cases:
        problems = grpo_problems(grpo_cfg(tmp_path, **changes), world=2)
        assert any(message in p for p in problems), (changes, problems)
    assert grpo_problems(grpo_cfg(tmp_path), world=2) == []


def test_a_reference_that_does_not_match_the_policy_is_named(tmp_path,
                                                             domain_tokenizer_file):  # noqa: F811
    from model.weights import save_pretrained
    from rl.grpo import pre_checks
    from train.init import InitFromError

    policy_cfg = micro_config(vocab_size=512, max_seq_len=256)
    base, other = tmp_path / "base" / "model", tmp_path / "other" / "model"
    save_pretrained(build_model(policy_cfg), base, domain_tokenizer_file)
    save_pretrained(build_model(micro_config(vocab_size=512, max_seq_len=256, dim=96)), other,
                    domain_tokenizer_file)
    cfg = grpo_cfg(tmp_path, **{"init_from": str(base), "grpo.ref": str(other),
                                "grpo.beta": 0.1, "model.preset": str(base / "config.json")})
    with pytest.raises(InitFromError, match="grpo.ref=") as e:
        pre_checks(cfg, policy_cfg, 1)
    # the hint is a fix that works: the policy's model is fixed by init_from, so the reference
    # must change (a preset or data.tokenizer override would not help)
    assert "give a checkpoint trained from the same base as init_from (leave grpo.ref unset" \
        in str(e.value) and "model.preset=" not in str(e.value)
    from tests.helpers.fixtures import train_bpe

    (tmp_path / "tok2").mkdir()
    other_tok = train_bpe([f"other words {i} here" for i in range(200)], 300,
                          tmp_path / "tok2" / "tokenizer.json")
    save_pretrained(build_model(policy_cfg), tmp_path / "retok" / "model", other_tok)
    OmegaConf.update(cfg, "grpo.ref", str(tmp_path / "retok" / "model"), merge=False)
    with pytest.raises(InitFromError, match="tokenizer mismatch") as e:
        pre_checks(cfg, policy_cfg, 1)
    assert "leave grpo.ref unset" in str(e.value) and "data.tokenizer=" not in str(e.value)
    OmegaConf.update(cfg, "grpo.beta", 0.0, merge=False)
    pre_checks(cfg, policy_cfg, 1)  # β = 0: no reference is read at all


def test_score_type_is_the_domains(tmp_path):
    from rl.rewards import shaped_reward

    good, bad = Score.graded(True, "ok"), Score.invalid("unreadable")
    assert shaped_reward(good, 10, False, 64) == 1.0
    assert shaped_reward(bad, 10, False, 64) == 0.0  # no format bonus
    assert shaped_reward(good, 32, False, 64, length_penalty=0.5) == pytest.approx(0.75)
    # DAPO soft penalty: 0 before the buffer, linear inside it, full at the limit
    assert shaped_reward(good, 40, False, 64, overlong="penalty", overlong_buffer=16) == 1.0
    assert shaped_reward(good, 56, False, 64, overlong="penalty",
                         overlong_buffer=16) == pytest.approx(0.5)
    assert shaped_reward(bad, 64, True, 64, overlong="penalty", overlong_buffer=16) == -1.0


def test_a_stop_signal_ends_the_rollout_between_chunks(tmp_path, policy,
                                                     domain_tokenizer_file):  # noqa: F811
    """A stop flag raised during generation ends the rollout after the chunk in flight (not
    after the whole rollout) with `StopRequested`, and the task's state is as before the step,
    so the checkpoint the trainer then writes resumes into the same prompts."""
    from train.task import StopRequested

    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.rollout_batch_size": 2})  # 8 rows: 4 chunks
    calls = []

    def counting_generate(*args, **kwargs):
        from model.generation import generate

        calls.append(len(args[1]))
        return generate(*args, **kwargs)

    task = make_task(cfg, domain_tokenizer_file, model_cfg, generate_fn=counting_generate)
    task.stop_check = lambda: len(calls) >= 1       # the signal arrives during chunk 1
    before = task.state_dict()
    with pytest.raises(StopRequested):
        task.batches(0, n_micro(cfg), model)
    assert calls == [2]                             # one chunk of 2 rows, not 4
    assert task.state_dict() == before
    task.stop_check = lambda: False                 # resumed: the same prompts are drawn
    task.batches(0, n_micro(cfg), model)
    assert task.cursor == cfg.grpo.prompts_per_step and len(calls) == 5


class ScoringStrings(StringsDomain):
    """Returns a fixed Score, or exits, whatever the completion."""

    def __init__(self, score=None, exit_code=None):
        super().__init__()
        self.score, self.exit_code = score, exit_code

    def verify(self, item, completion_text):
        if self.exit_code is not None:
            import sys
            sys.exit(self.exit_code)
        return self.score


@pytest.mark.parametrize("score,reward,error", [
    (Score(0.5, False, True, "half the cases"), 0.5, None),           # partial credit is used
    (Score(1.0, True, True, "right"), 1.0, None),
    (Score(float("nan"), True, True, "nan"), 0.0, "Score.reward=nan is not a finite"),
    (Score(2.0, True, True, "big"), 0.0, "Score.reward=2.0 is not a finite number in [0, 1]"),
    (Score(0.5, False, False, "bonus"), 0.0, "for an unreadable answer"),
])
def test_score_reward_is_used_or_refused(score, reward, error):
    from data.domains.base import safe_verify
    from rl.rewards import shaped_reward

    item = StringsDomain().sample("train", 0)
    got = safe_verify(ScoringStrings(score), item, "x")
    assert (got.error is None) == (error is None) and (error is None or error in got.error)
    assert shaped_reward(got, 3, False, 8) == reward


def test_a_verifier_calling_sys_exit_scores_zero_instead_of_ending_the_run():
    from train.verify import timed_verify

    item = StringsDomain().sample("train", 0)
    got = timed_verify(ScoringStrings(exit_code=3), item, "x", 1.0)
    assert got.reward == 0 and got.error == "SystemExit: the verifier called sys.exit(3)"


def test_first_error_of_each_kind_is_shown_and_a_dead_rollout_warns(tmp_path, policy, capsys,
                                                                  domain_tokenizer_file):  # noqa: F811
    """Every sample's verifier raises: the first RuntimeError is printed (once, with its item),
    and the rollout warns that no sample carries a learning signal."""
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path)
    task = make_task(cfg, domain_tokenizer_file, model_cfg, [(RaisingStrings(), 1.0)])
    task.batches(0, n_micro(cfg), model)
    err = capsys.readouterr().err
    assert err.count("first verifier RuntimeError") == 1, err
    assert "RuntimeError: verifier bug" in err and "item strings/" in err
    assert "no sample carries a learning signal (8 of 8 verifier errors" in err
    assert task.step_metrics(1.0)["rollout/no_signal"] == 1.0
    task.batches(1, n_micro(cfg), model)                  # the next rollout
    assert "first verifier" not in capsys.readouterr().err        # shown once per run


def test_all_truncated_under_overlong_mask_warns(tmp_path, policy, capsys,
                                                domain_tokenizer_file):  # noqa: F811
    model_cfg, model = policy  # a random model never ends within 2 tokens
    cfg = grpo_cfg(tmp_path, **{"grpo.max_new_tokens": 2, "grpo.overlong": "mask"})
    task = make_task(cfg, domain_tokenizer_file, model_cfg)
    task.batches(0, n_micro(cfg), model)
    assert ("0 of 8 verifier errors or timeouts, 8 truncated and masked by grpo.overlong=mask; "
            "raise grpo.max_new_tokens") in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_or_seq_len_is_warned(domain_tokenizer_file):  # noqa: F811
    from rl.rollout_config import reply_budget_warnings

    domains = [(StringsDomain(), 1.0)]
    assert reply_budget_warnings("grpo", 8, 256, 256, domain_tokenizer_file, domains) == []
    over = reply_budget_warnings("grpo", 300, 256, 256, domain_tokenizer_file, domains)
    assert len(over) == 2
    assert "in the model's context (max_seq_len=256); longer replies are cut" in over[0]
    assert "exceed data.seq_len=256" in over[1] and "set data.seq_len >= " in over[1]
    short = reply_budget_warnings("grpo", 8, 16, 256, domain_tokenizer_file, domains)
    assert len(short) == 1 and "data.seq_len=16" in short[0]


class HalfStrings(StringsDomain):
    """Correct for every other completion it is asked about: groups always vary."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def verify(self, item, completion_text):
        self.calls += 1
        return Score.graded(self.calls % 2 == 0, "alternating")


def test_band_check_fires_on_an_expert_that_solves_nothing_and_is_silent_in_the_band(
        tmp_path, policy, capsys, domain_tokenizer_file):  # noqa: F811
    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path)
    dead = make_task(cfg, domain_tokenizer_file, model_cfg, [(ZeroStrings(), 1.0)])
    dead.batches(0, n_micro(cfg), model)
    err = capsys.readouterr().err
    assert "outside the band GRPO learns in: 0% of the first rollout's prompt groups" in err
    assert "it solves none of its samples" in err
    band = json.loads((tmp_path / "band.json").read_text())  # what the pipeline reads
    assert band["in_band"] is False and band["side"] == "solves none"
    assert band["varied_groups"] == 0.0 and band["mean_reward"] == 0.0
    live = make_task(cfg, domain_tokenizer_file, model_cfg, [(HalfStrings(), 1.0)])
    live.batches(0, n_micro(cfg), model)
    assert "outside the band" not in capsys.readouterr().err
    band = json.loads((tmp_path / "band.json").read_text())
    assert band["in_band"] is True and band["varied_groups"] >= MIN_VARIED_GROUPS


def test_band_stop_declines_before_any_update(tmp_path, policy, domain_tokenizer_file):  # noqa: F811
    """grpo.band=stop: outside the band the first rollout raises `StageDeclined` (the entry
    point exits 3 without a checkpoint), with the reason; in the band it trains as usual."""
    from train.task import StageDeclined

    model_cfg, model = policy
    cfg = grpo_cfg(tmp_path, **{"grpo.band": "stop"})
    dead = make_task(cfg, domain_tokenizer_file, model_cfg, [(ZeroStrings(), 1.0)])
    with pytest.raises(StageDeclined, match="outside the band .* nothing was trained"):
        dead.batches(0, n_micro(cfg), model)
    live = make_task(cfg, domain_tokenizer_file, model_cfg, [(HalfStrings(), 1.0)])
    assert live.batches(0, n_micro(cfg), model)
