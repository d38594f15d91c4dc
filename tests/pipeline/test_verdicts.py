"""The report's verdicts (`pipeline/verdicts.py`): "learned" only when a stage's metric moved
by more than the run's own noise, and a stage that made its model worse on greedy evaluation is
named."""

from __future__ import annotations

from pipeline.verdicts import noise, regressions, verdict


def test_a_lucky_sample_is_not_learning_but_a_steady_rise_is():
    # the calculator GRPO run of issue #34: one correct sample in 64 at step 7, zero elsewhere
    lucky = [0.0] * 6 + [0.016, 0.0, 0.0, 0.008]
    v = verdict(lucky, rises=True)
    assert v["last"] > v["first"] and not v["learned"], v      # old rule: last > first = yes
    steady = [0.30, 0.34, 0.37, 0.42, 0.45, 0.49, 0.52, 0.56, 0.60, 0.63]
    assert verdict(steady, rises=True)["learned"]
    noisy_fall = [7.0, 5.1, 6.9, 4.8, 7.2, 5.0, 6.8, 5.2, 6.6, 5.1]   # a scatter, no trend
    assert not verdict(noisy_fall, rises=False)["learned"]
    falling = [7.2, 6.1, 5.0, 4.2, 3.1, 2.4, 1.6, 1.0, 0.6, 0.3]
    assert verdict(falling, rises=False)["learned"]
    assert not verdict(falling, rises=True)["learned"]            # the wrong way
    assert noise([1.0, 2.0, 3.0, 4.0]) == 0.0                      # a trend is not noise
    assert verdict([1.0], rises=True)["learned"] is False


def _row(pass1, fmt, n=100):
    return {"pass@1": pass1, "format_valid": fmt, "evaluated": n}


def test_a_stage_that_made_its_model_worse_is_named():
    table = {"sft/calculator": {"domains": {"calculator": _row(0.0, 0.53),
                                            "strings": _row(0.0, 0.0)}},
             "grpo/calculator": {"domains": {"calculator": _row(0.0, 0.0),
                                             "strings": _row(0.0, 0.0)}},
             "sft/strings": {"domains": {"strings": _row(0.62, 1.0)}},
             "grpo/strings": {"domains": {"strings": _row(0.60, 1.0)}},   # within noise
             "sft/mixed": {"domains": {"calculator": _row(0.01, 1.0), "strings": _row(0.65, 1.0)}},
             "distill": {"domains": {"calculator": _row(0.0, 0.0), "strings": _row(0.73, 1.0)}}}
    worse = regressions(table, ["strings", "calculator"])
    assert worse == ["grpo/calculator made calculator worse than sft/calculator: "
                     "format_valid 0.530 -> 0.000",
                     "distill made calculator worse than sft/mixed: format_valid 1.000 -> 0.000"]
    assert regressions({k: v for k, v in table.items() if "calculator" not in k},
                       ["strings"]) == []


def test_a_grpo_stage_that_started_outside_the_band_is_named(tmp_path):
    from types import SimpleNamespace

    from pipeline.verdicts import out_of_band

    rows = {"grpo/calculator": [{"step": 1, "rollout/zero_var_frac": 1.0, "reward/mean": 0.0,
                                 "steps_without_signal": 1},
                                {"step": 10, "steps_without_signal": 8}],
            "grpo/strings": [{"step": 1, "rollout/zero_var_frac": 0.5, "reward/mean": 0.4,
                              "steps_without_signal": 0}]}
    stages = [SimpleNamespace(name=n, kind="grpo") for n in rows] + \
        [SimpleNamespace(name="sft/strings", kind="sft")]
    flagged = out_of_band(stages, lambda s: rows[s.name], 0.1)
    assert flagged == ["grpo/calculator started outside the band GRPO learns in: 100% of its "
                       "first rollout's prompt groups had no reward variance (mean reward "
                       "0.000); 8 of its 10 steps were held without an update"]
