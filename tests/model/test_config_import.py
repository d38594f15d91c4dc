"""Importing a config.json (model/config_import.py): a missing key is an error naming every
missing key and the file, never a preset's value; optional keys take their documented default,
logged; unused keys are warned about; `original_seq_len: 0` turns YaRN off."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, get_config
from model.rope import rope_frequencies
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(os.environ.get("V4_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
CONFIGS = CONFORMANCE / "configs"
needs_conformance = pytest.mark.skipif(
    not CONFIGS.is_dir(),
    reason=f"released configs not found at {CONFIGS} (set V4_CONFORMANCE_DIR)")

TINY = get_config("tiny")


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def _hf(cfg=TINY):
    return cfg.to_hf_dict()


def _inference(cfg=TINY):
    """Reference-inference naming as the release writes it (no fields of our own)."""
    raw = {k: v for k, v in cfg.to_dict().items()
           if k not in ("quantization", "csa_mode", "init_std", "seed", "tie_word_embeddings")}
    raw["compress_ratios"] = list(cfg.compress_ratios)
    return raw


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


@pytest.mark.parametrize("naming,drop", [
    ("hf", ["moe_intermediate_size"]),
    ("hf", ["vocab_size"]),
    ("hf", ["num_hidden_layers"]),
    ("hf", ["moe_intermediate_size", "vocab_size", "num_hidden_layers", "compress_ratios"]),
    ("inference", ["moe_inter_dim", "vocab_size", "n_layers"]),
    ("inference", ["rope_factor"]),
])
def test_missing_required_keys_are_one_error_naming_all_of_them(tmp_path, naming, drop):
    raw = _hf() if naming == "hf" else _inference()
    for key in drop:
        raw.pop(key)
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError) as info:
        get_config(str(path))
    message = str(info.value)
    assert str(path) in message and "missing required key" in message, message
    for key in drop:
        assert key in message, (key, message)
    if "compress_ratios" not in drop:
        assert "compress_ratios" not in message  # no misleading follow-up error


def test_missing_rope_scaling_fields_are_named(tmp_path):
    raw = _hf()
    del raw["rope_scaling"]["factor"], raw["rope_scaling"]["original_max_position_embeddings"]
    with pytest.raises(ValueError, match="rope_scaling.factor, "
                                         "rope_scaling.original_max_position_embeddings"):
        get_config(str(_write(tmp_path, raw)))


@pytest.mark.parametrize("naming,drop,field,value", [
    ("hf", "rms_norm_eps", "norm_eps", 1e-6),
    ("hf", "num_nextn_predict_layers", "n_mtp_layers", 1),
    ("hf", "max_position_embeddings", "max_seq_len", 1048576),
    ("inference", "hc_eps", "hc_eps", 1e-6),
    ("inference", "beta_fast", "beta_fast", 32.0),
])
def test_optional_keys_take_the_documented_default_and_log_it(tmp_path, caplog, naming, drop,
                                                              field, value):
    cfg = TINY.replace(norm_eps=1e-5, max_seq_len=2048, hc_eps=1e-5, beta_fast=16.0)
    raw = _hf(cfg) if naming == "hf" else _inference(cfg)
    raw.pop(drop)
    from model import config_import
    assert drop in (config_import.HF_OPTIONAL if naming == "hf"
                    else config_import.INFERENCE_OPTIONAL)
    with caplog.at_level(logging.WARNING, logger="v4lab.model"):
        got = get_config(str(_write(tmp_path, raw)))
    assert getattr(got, field) == value
    assert f"{drop}={value!r}" in caplog.text and "defaults taken" in caplog.text
    assert got.replace(**{field: getattr(cfg, field)}) == cfg  # nothing else changed


def test_unused_keys_are_warned_and_known_metadata_is_not(tmp_path):
    raw = _hf()
    raw.update(transformers_version="4.57.1", torch_dtype="bfloat16", use_cache=True)
    _no_warnings(get_config, str(_write(tmp_path, raw, "clean.json")))  # all used or known
    raw.update(n_routed_experts_score=128, my_new_knob=3)
    raw["rope_scaling"]["mscale"] = 1.0
    with pytest.warns(UserWarning, match="n_routed_experts_score, my_new_knob, "
                                         "rope_scaling.mscale") as record:
        get_config(str(_write(tmp_path, raw, "extra.json")))
    assert "extra.json" in str(record[0].message)
    inf = _inference()
    inf["n_routed_experts_score"] = 128
    with pytest.warns(UserWarning, match="n_routed_experts_score"):
        get_config(str(_write(tmp_path, inf, "inf.json")))


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("num_key_value_heads", 8),
                                       ("tie_word_embeddings", True)])
def test_hard_wired_architecture_keys_must_match(tmp_path, key, value):
    raw = _hf()
    raw[key] = value
    with pytest.raises(ValueError, match=f"config.json: {key}="):
        get_config(str(_write(tmp_path, raw)))


def test_own_block_must_hold_every_field(tmp_path):
    raw = _hf()
    raw["v4lab"] = TINY.to_dict()
    assert ModelConfig.from_json(_write(tmp_path, raw)) == TINY
    raw["hidden_size"] = 512  # edited beside the block
    with pytest.raises(ValueError, match=r"disagree with the 'v4lab' block: hidden_size=512 "
                                         r"\(v4lab: 256\)"):
        ModelConfig.from_json(_write(tmp_path, raw))
    del raw["v4lab"]["moe_inter_dim"]
    raw["v4lab"]["extra"] = 1
    with pytest.raises(ValueError, match="'v4lab' lacks moe_inter_dim; has unknown key.* extra"):
        ModelConfig.from_json(_write(tmp_path, raw))


def test_model_cli_reports_a_missing_key(tmp_path):
    raw = _hf()
    del raw["moe_intermediate_size"]
    path = _write(tmp_path, raw)
    out = subprocess.run([sys.executable, "-m", "model", f"conf={path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "moe_intermediate_size" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_training_on_an_incomplete_config_fails_before_any_work(tmp_path):
    """`model.preset=PATH` without moe_intermediate_size used to train Flash's 2048 (exit 0)."""
    raw = _hf()
    del raw["moe_intermediate_size"], raw["vocab_size"]
    path = _write(tmp_path, raw)
    out = subprocess.run([sys.executable, "train/pretrain.py", f"model.preset={path}",
                          "dry_run=true", f"run_dir={tmp_path / 'run'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "missing required key(s) vocab_size, moe_intermediate_size" in out.stderr, out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@needs_conformance
@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("naming", ["hf", "inference"])
def test_released_configs_import_without_missing_keys(name, naming):
    """The released files name every required key; the only unused key among them is Flash
    inference's `n_routed_experts_score` (an expert-pruning field, warned about)."""
    path = CONFIGS / f"{name}_{naming}_config.json"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = ModelConfig.from_json(path)
    unused = [str(w.message) for w in record if "not used" in str(w.message)]
    raw = json.loads(path.read_text())
    if "n_routed_experts_score" in raw:
        assert len(unused) == 1 and "n_routed_experts_score" in unused[0]
    else:
        assert unused == []
    assert cfg.original_seq_len == 65536 and cfg.rope_factor == 16


# ---------------------------------------------------------------------- YaRN off
def test_original_seq_len_zero_disables_yarn(tmp_path):
    """The reference applies YaRN only for original_seq_len > 0; 0 used to crash in log(0).
    Same frequencies as rope_factor 1 by construction, so the forwards are bit-identical."""
    off = TINY.replace(original_seq_len=0)
    plain = TINY.replace(rope_factor=1.0)
    assert torch.equal(rope_frequencies(off, compressed=True),
                       rope_frequencies(plain, compressed=True))
    assert not torch.equal(rope_frequencies(TINY, compressed=True),
                           rope_frequencies(plain, compressed=True))
    raw = _inference(off)
    imported = get_config(str(_write(tmp_path, raw, "inf.json")))
    hf = _hf(TINY)
    hf["rope_scaling"]["original_max_position_embeddings"] = 0
    imported_hf = get_config(str(_write(tmp_path, hf, "hf.json")))
    assert imported.original_seq_len == imported_hf.original_seq_len == 0
    ids = torch.randint(0, TINY.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(0)
        a = Transformer(imported).eval()
        torch.manual_seed(0)
        b = Transformer(plain).eval()
        assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(ValueError, match="original_seq_len"):
        TINY.replace(original_seq_len=-1)
