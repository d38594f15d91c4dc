"""Start-up validation of the training config: every numeric key of the Hydra schema has a declared
range, a value outside it fails in `validate_config` with the key, the value and the allowed range,
all bad keys are reported at once, and the launcher stops before any data or model work."""

import dataclasses
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model.config import get_config
from train.config import ConfigError, SeqStage, TrainConfig, config_problems, validate_config

REPO = Path(__file__).resolve().parents[2]


def _cfg(**updates):
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in updates.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _numeric_fields(schema, prefix=""):
    """(key, field) for every int/float field, also inside Optional[...] and List[...]."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{prefix}{f.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            yield from _numeric_fields(args[0], f"{prefix}{f.name}[].")
        elif kind in (int, float) or (set(args) & {int, float}):
            yield f"{prefix}{f.name}", f


def test_every_numeric_field_declares_a_range():
    fields = dict(_numeric_fields(TrainConfig))
    assert {"steps", "data.micro_batch", "optim.lr", "batch.global_batch",
            "recipe.seq_len_stages[].seq_len", "logging.every"} <= set(fields)
    undeclared = [k for k, f in fields.items() if "range" not in f.metadata]
    assert not undeclared, f"numeric config keys without an allowed range: {undeclared}"


def test_defaults_and_presets_are_valid():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register

    assert config_problems(_cfg()) == []
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for name in ("tiny", "small", "flash", "pro"):
            cfg = compose("pretrain", overrides=[f"conf={name}"])
            assert config_problems(cfg, None, get_config(cfg.model.preset)) == [], name
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("key,value,rule", [
    ("steps", 0, ">= 1"),
    ("steps", -5, ">= 1"),
    ("seed", -1, "in [0, 18446744073709551615]"),
    ("seed", 2**64, "in [0, 18446744073709551615]"),
    ("max_bad_steps", 0, ">= 1"),
    ("world_size", 0, ">= 1"),
    ("data.micro_batch", 0, ">= 1"),
    ("data.seq_len", 0, ">= 1"),
    ("data.val_fraction", 1.0, "in [0, 1)"),
    ("data.val_fraction", -0.1, "in [0, 1)"),
    ("data.vocab_size", 0, ">= 1"),
    ("data.prefetch", -1, ">= 0"),
    ("data.default_max_files", 0, ">= 1"),
    ("optim.lr", -1.0, "> 0"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", float("nan"), "> 0"),
    ("optim.lr", float("inf"), "> 0"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("optim.muon_momentum", 1.0, "in [0, 1)"),
    ("optim.adamw_betas", [0.9, 1.0], "each element must be in [0, 1)"),
    ("optim.adamw_eps", 0.0, "> 0"),
    ("optim.grad_clip", -1.0, ">= 0"),
    ("schedule.warmup_steps", -1, ">= 0"),
    ("schedule.decay_steps", -1, ">= 0"),
    ("schedule.min_ratio", 1.5, "in [0, 1]"),
    ("batch.global_batch", 0, ">= 1"),
    ("batch.ramp_start", 0, ">= 1"),
    ("batch.ramp_tokens", -1, ">= 0"),
    ("recipe.mtp_weight", -0.3, ">= 0"),
    ("recipe.mtp_weight_after_decay", -0.1, ">= 0"),
    ("recipe.balance_weight", -1e-4, ">= 0"),
    ("recipe.bias_update_speed", -1e-3, ">= 0"),
    ("recipe.indexer_weight", -1.0, ">= 0"),
    ("recipe.csa_dense_until", -1, ">= 0"),
    ("recipe.indexer_warmup_steps", -1, ">= 0"),
    ("parallel.zero_stage", 4, "in [0, 3]"),
    ("parallel.ep_size", 0, ">= 1"),
    ("checkpoint.every", -1, ">= 0"),
    ("checkpoint.keep", -1, ">= 0"),
    ("logging.every", 0, ">= 1"),
    ("logging.eval_every", -1, ">= 0"),
    ("logging.eval_batches", 0, ">= 1"),
    ("logging.sample_every", -1, ">= 0"),
    ("logging.sample_tokens", -1, ">= 0"),
    ("logging.peak_tflops", 0.0, "> 0"),
])
def test_out_of_range_value_names_key_and_range(key, value, rule):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(**{key: value}))
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    shown = f"{key}={list(value)}" if isinstance(value, list) else f"{key}={value}"
    assert any(line.startswith(f"{shown}:") and rule in line for line in lines), str(err.value)


def test_seq_len_stage_fields_are_checked_per_element():
    cfg = _cfg()
    cfg.recipe.seq_len_stages = [SeqStage(0, 128), SeqStage(-3, 0)]
    text = "\n".join(config_problems(cfg))
    assert "recipe.seq_len_stages[1].step=-3: must be >= 0" in text
    assert "recipe.seq_len_stages[1].seq_len=0: must be >= 1" in text
    assert "strictly ascending" in text


@pytest.mark.parametrize("updates,world,fragment", [
    ({"batch.global_batch": 6, "data.micro_batch": 4}, None,
     "batch.global_batch=6: must be a multiple of data.micro_batch=4"),
    ({"batch.global_batch": 8, "data.micro_batch": 4}, 3,
     "batch.global_batch=8: must be a multiple of data.micro_batch=4 x world size 3"),
    ({"batch.global_batch": 8, "batch.ramp_start": 16, "data.micro_batch": 4}, None,
     "batch.ramp_start=16: must be <= batch.global_batch=8"),
    ({"batch.ramp_start": 3, "data.micro_batch": 2}, None, "batch.ramp_start=3: must be a multiple"),
    ({"optim.adamw_betas": [0.9]}, None, "optim.adamw_betas=[0.9]: give two values"),
    ({"optim.name": "sgd"}, None, "optim.name='sgd': choose one of muon, adamw"),
    ({"schedule.decay": "step"}, None, "schedule.decay='step'"),
    ({"dtype": "fp16"}, None, "dtype='fp16'"),
    ({"device": "tpu"}, None, "device='tpu'"),
    ({"activation_checkpointing": "all"}, None, "activation_checkpointing='all'"),
    ({"optim.ns_coefficients": "nope"}, None, "optim.ns_coefficients='nope'"),
    ({"logging.wandb.mode": "cloud"}, None, "logging.wandb.mode='cloud'"),
    ({"data.seq_len": 8192}, None, "data.seq_len=8192: must be <= the model's max_seq_len=4096"),
    ({"data.vocab_size": 9000}, None, "data.vocab_size=9000: must be <= the model's vocab_size"),
])
def test_rules_between_fields(updates, world, fragment):
    problems = config_problems(_cfg(**updates), world, get_config("tiny"))
    assert any(fragment in p for p in problems), problems


def test_all_bad_keys_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(**{"steps": 0, "data.micro_batch": 0, "optim.lr": -1.0,
                                "batch.global_batch": 0}))
    text = str(err.value)
    assert "4 problems" in text
    for line in ("steps=0: must be >= 1", "data.micro_batch=0: must be >= 1",
                 "optim.lr=-1.0: must be > 0", "batch.global_batch=0: must be >= 1"):
        assert line in text


@pytest.mark.parametrize("overrides,expected", [
    (["steps=0"], ["steps=0: must be >= 1"]),
    (["data.micro_batch=0", "optim.lr=-1", "batch.global_batch=0"],
     ["data.micro_batch=0: must be >= 1", "optim.lr=-1.0: must be > 0",
      "batch.global_batch=0: must be >= 1"]),
])
def test_launcher_stops_before_any_work(overrides, expected, tmp_path):
    """Through the real entry point: the error comes before data preparation (no cache written)
    and before the process group and the model (seconds, not a data pass)."""
    cache = tmp_path / "cache"
    start = time.time()
    out = subprocess.run([sys.executable, "train/pretrain.py", *overrides,
                          f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                          "logging.wandb.mode=disabled"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    elapsed = time.time() - start
    assert out.returncode != 0
    for line in expected:
        assert line in out.stderr + out.stdout
    assert "ZeroDivisionError" not in out.stderr and "Traceback" not in out.stderr
    assert not cache.exists()
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    assert elapsed < 90, elapsed  # only interpreter and Hydra start-up (~5 s on an idle core)
