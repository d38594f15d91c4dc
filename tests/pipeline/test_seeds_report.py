"""The report over pre-training seeds (`pipeline/seeds_report.py`) from each seed's
`report.json`: mean ± sd over seeds, the gains per seed, and the goals checked per seed."""

from __future__ import annotations

import json
import statistics

from omegaconf import OmegaConf

from pipeline.seeds_report import spread, write_seeds_report


def seed_report(seed: int, grpo_calc: float, student_strings: float) -> dict:
    def row(strings, calc, fmt=1.0):
        return {"strings": {"pass@1": strings, "format_valid": fmt},
                "calculator": {"pass@1": calc, "format_valid": fmt}}
    return {"seed": seed, "scores": {
        "sft/strings": row(0.90, 0.0), "grpo/strings": row(0.92, 0.0),
        "sft_more/strings": row(0.91, 0.0), "sft/calculator": row(0.0, 0.30),
        "grpo/calculator": row(0.0, grpo_calc), "sft_more/calculator": row(0.0, 0.30),
        "sft/mixed": row(0.70, 0.10), "weight_average": row(0.20, 0.0),
        "distill": row(student_strings, 0.35)}}


def test_mean_and_spread_over_seeds_and_the_goals_per_seed(tmp_path):
    cfg = OmegaConf.create({"name": "s", "out_dir": str(tmp_path), "jobs": 2,
                            "domains": {"strings": {}, "calculator": {}}})
    dirs = []
    for seed, (calc, student) in enumerate([(0.40, 0.80), (0.20, 0.75), (0.10, 0.60)]):
        d = tmp_path / f"seed_{seed}"
        d.mkdir()
        (d / "report.json").write_text(json.dumps(seed_report(seed, calc, student)))
        dirs.append(d)
    (tmp_path / "stages.json").write_text(json.dumps({
        "seed0/sft/strings": {"status": "ran", "started": 0.0, "seconds": 1800.0},
        "seed2/distill": {"status": "ran", "started": 1800.0, "seconds": 1800.0}}))
    text = write_seeds_report(cfg, dirs).read_text()
    calc = [0.40, 0.20, 0.10]
    assert f"| grpo/calculator | 0.000 ± 0.000 | 1.000 ± 0.000 | {spread(calc)} |" in text
    assert spread(calc) == f"{statistics.mean(calc):.3f} ± {statistics.stdev(calc):.3f}"
    assert "| GRPO over its SFT expert | calculator | pass@1 | " in text and "+0.10, -0.10, -0.20" \
        in text
    goals = json.loads((tmp_path / "report.json").read_text())
    assert goals["minutes_per_seed"] == 20.0  # 60 minutes for three seeds
    met = goals["goals"]
    assert [g["calculator pass@1 ≥ 0.2"] for g in met] == [True, True, False]
    assert [g["GRPO ≥ SFT (pass@1, format)"] for g in met] == [True, False, False]
    # seed 2's student (0.60) is below the mixed SFT (0.70) on strings
    assert [g["student > both baselines"] for g in met] == [True, True, False]
    assert all(g["≤ 30 min"] for g in met)
    assert "| 2 | yes | **no** | **no** | **no** |" in text
