"""Hugging Face interop: ours → HF directory → ours is bit-exact; transformers'
DeepseekV4ForCausalLM loads the export and its logits match ours; a directory written by
transformers' own save_pretrained loads back."""

import json
import os

import pytest
import torch

from model import convert
from model.weights import load_pretrained, save_pretrained

from .conftest import build_model, micro_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(micro_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "export"
    convert.export_hf(micro_model, path)
    return path


def test_round_trip_through_hf_is_bit_exact(micro_model, exported, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV4ForCausalLM"]
    assert "quantization_config" not in config
    assert config["compress_rates"]["heavily_compressed_attention"] == 8
    convert.import_hf(exported, tmp_path / "back")
    back = load_pretrained(tmp_path / "back")
    assert back.cfg == micro_model.cfg
    ours, theirs = micro_model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


@torch.no_grad()
def test_transformers_loads_the_export_with_matching_logits(micro_model, exported, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV4ForCausalLM"
    ids = torch.randint(0, micro_model.cfg.vocab_size, (2, 90),
                        generator=torch.Generator().manual_seed(3))
    # 90 tokens: 22 CSA entries for an index top-4, 11 HCA entries, many windows
    ours = micro_model(ids).logits
    theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4

    hf.save_pretrained(tmp_path / "hf_saved")  # transformers' own spelling, no MTP block
    with pytest.warns(UserWarning, match="without the MTP block"):
        again = load_pretrained(tmp_path / "hf_saved")
    assert again.cfg.n_mtp_layers == 0
    assert (again(ids).logits - ours).abs().max() <= 1e-6


def test_export_refuses_two_hca_ratios(tmp_path):
    cfg = micro_config(compress_ratios=(8, 4, 16, 4, 0))
    with pytest.raises(ValueError, match="one HCA ratio"):
        convert.export_hf(build_model(cfg), tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_cli_export_and_import(micro_model, tokenizer_file, tmp_path, capsys):
    save_pretrained(micro_model, tmp_path / "ours", tokenizer_file)
    assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"),
                         "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_pretrained(tmp_path / "back").state_dict()
    assert back["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert back["layers.1.attn.compressor.ape"].dtype == torch.float32
    assert torch.equal(back["embed.weight"], micro_model.embed.weight.bfloat16())
    assert convert.main(["import", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_exports_a_training_checkpoint_step_dir(micro_model, tokenizer_file, tmp_path):
    """`export runs/x/checkpoints/step_N DST`, as generate.py and evaluation take it."""
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    save_pretrained(micro_model, step / "model", tokenizer_file)
    assert convert.main(["export", str(step), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert torch.equal(load_pretrained(tmp_path / "back").state_dict()["embed.weight"],
                       micro_model.embed.weight)


def test_cli_refuses_to_replace_a_foreign_destination(micro_model, tmp_path, capsys):
    """`export CK DIR` into a directory holding other files used to delete them (rc 0). Now:
    refused before any work (even before reading SRC), rc 2, DIR untouched; a previous export
    is replaced; --overwrite replaces anything."""
    save_pretrained(micro_model, tmp_path / "ours")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002" / "model").mkdir(parents=True)
    (run / "train.log").write_text("log")
    for direction in ("export", "import"):
        assert convert.main([direction, str(tmp_path / "missing_src"), str(run)]) == 2
        err = capsys.readouterr().err
        assert f"error: {run}: destination is not empty" in err and "--overwrite" in err, err
        assert (run / "train.log").read_text() == "log" and (run / "checkpoints").is_dir()
    assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0  # again
    assert convert.main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert convert.main(["export", str(tmp_path / "ours"), str(run), "--overwrite"]) == 0
    assert not (run / "train.log").exists() and (run / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours", "run"]  # no temporaries
