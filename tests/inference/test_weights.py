"""Checkpoint directories: our format round-trips bit-exactly (single file and shards) and is
written atomically; released (FP8/FP4, per-expert, `model.` prefix, MTP copies) and
reference-inference (model-parallel shards) layouts load to the expected tensors; broken
checkpoints name the file and tensor."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from model import naming, weights
from model.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from model.weights import load_pretrained, save_pretrained
from tests.helpers.reference_shards import write_reference_shards

# FP8 in the release (spec §7); compressor projections, norms, router, embedding stay as they are
FP8_LINEARS = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight",
               ".attn.wo_b.weight", ".indexer.wq_b.weight", "shared_experts.w1.weight",
               "shared_experts.w2.weight", "shared_experts.w3.weight")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:5]}"


@pytest.mark.parametrize("shard_bytes", [weights.DEFAULT_SHARD_BYTES, 200_000])
def test_our_format_round_trips_bit_exactly(micro_model, tokenizer_file, tmp_path, shard_bytes):
    micro_model.set_csa_mode("dense")
    try:
        save_pretrained(micro_model, tmp_path / "ckpt", tokenizer_file, max_shard_bytes=shard_bytes)
    finally:
        micro_model.set_csa_mode("sparse")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard_bytes == weights.DEFAULT_SHARD_BYTES:
        assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    else:
        assert "model.safetensors.index.json" in files and len(files) > 4
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["hidden_size"] == micro_model.cfg.dim  # Hugging Face naming
    loaded = load_pretrained(tmp_path / "ckpt")
    # the model's current CSA phase is saved with the config
    assert loaded.cfg == micro_model.cfg.replace(csa_mode="dense") and loaded.csa_mode == "dense"
    _assert_same(loaded.state_dict(), micro_model.state_dict())
    half = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    sd = half.state_dict()
    assert sd["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert sd["layers.1.attn.compressor.ape"].dtype == torch.float32  # fp32 by design
    assert sd["layers.0.hc_attn_fn"].dtype == torch.float32
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_save_replaces_atomically(micro_model, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_pretrained(micro_model, path)
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights, "write_tensors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(micro_model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    save_pretrained(micro_model, path)  # over an existing checkpoint
    assert os.listdir(tmp_path) == ["ckpt"]
    with pytest.raises(FileNotFoundError, match="tokenizer_file"):
        save_pretrained(micro_model, path, tokenizer_file=tmp_path / "nope.json")


def test_broken_checkpoints_name_the_file_and_tensor(micro_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty")
    path = tmp_path / "ckpt"
    save_pretrained(micro_model, path)
    state = dict(micro_model.state_dict())
    state.pop("layers.2.attn.compressor.ape")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing from model.safetensors.*layers.2.attn.compressor.ape"):
        load_pretrained(path)
    state = dict(micro_model.state_dict())
    state["layers.0.attn.wkv.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor layers.0.attn.wkv.weight has shape \(3, 3\)"):
        load_pretrained(path)
    index = {"weight_map": {"embed.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_pretrained(path)


def _released(model, block):
    """Our state as the release ships it, and what it must dequantise to."""
    expected, files = {}, {}
    for name, t in naming.split_experts(model.state_dict()).items():
        t = t.clone()
        if name.endswith(FP8_LINEARS):
            q, s = quant_fp8(t, block)
            files[name], files[name[:-len("weight")] + "scale"] = q, s
            t = dequant_fp8(q, s, block)
        elif ".experts." in name and "shared" not in name:
            q, s = quant_fp4(t)
            files[name], files[name[:-len("weight")] + "scale"] = q, s
            t = dequant_fp4(q, s)
        else:
            files[name] = t
        expected[name] = t
    return files, expected


def test_released_fp8_fp4_checkpoint_loads_dequantised(micro_model, tmp_path):
    cfg = micro_model.cfg.replace(quantization={"quant_method": "fp8", "fmt": "e4m3",
                                                "weight_block_size": [32, 32]},
                                  expert_dtype="fp4")
    files, expected = _released(micro_model, (32, 32))
    # released spellings: `model.` prefix, V3 names here and there, MTP embedding/head copies
    renamed = {}
    for name, t in files.items():
        name = "model." + name.replace(".attn.wq_a.", ".self_attn.wq_a.")
        if name.endswith("wq_b.scale"):
            name = name[:-len("scale")] + "weight_scale_inv"
        if name.endswith("tid2eid"):
            t = t.int()  # int32 in the release
        renamed[name.replace("gate.bias", "gate.e_score_correction_bias")] = t
    renamed["model.mtp.0.emb.tok_emb.weight"] = files["embed.weight"]
    renamed["model.mtp.0.head.weight"] = files["head.weight"]
    path = tmp_path / "released"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    weights.write_tensors(path, renamed, max_shard_bytes=300_000)
    assert (path / "model.safetensors.index.json").is_file()
    assert any(t.dtype == torch.float8_e4m3fn for t in files.values())

    model = load_pretrained(path, dtype=torch.float32)
    got = naming.split_experts(model.state_dict())
    _assert_same(got, {k: v.float() if v.is_floating_point() else v for k, v in expected.items()})
    assert model.cfg.quantization["weight_block_size"] == [32, 32]
    default = load_pretrained(path).state_dict()  # dequantised weights in bfloat16
    assert default["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert default["layers.1.ffn.experts.w1"].dtype == torch.bfloat16
    assert default["layers.1.attn.compressor.wkv.weight"].dtype == torch.float32  # stored fp32

    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (path / first).unlink()
    with pytest.raises(FileNotFoundError, match=first):
        load_pretrained(path)


def test_fp8_weight_without_scale_is_an_error(micro_model, tmp_path):
    files, _ = _released(micro_model, (128, 128))
    files.pop("layers.0.attn.wq_a.scale")
    path = tmp_path / "released"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(micro_model.cfg.to_hf_dict()))
    weights.write_tensors(path, files)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor layers.0.attn.wq_a.weight: float8"):
        load_pretrained(path)


def test_reference_inference_model_parallel_shards_merge(micro_model, tmp_path):
    path = tmp_path / "inference"
    # the reference stores no MTP head of its own (it shares the main head)
    write_reference_shards(micro_model, path, 2, skip=lambda name: name.startswith("mtp.")
                           and name.endswith("head.weight"))
    model = load_pretrained(path)
    _assert_same(model.state_dict(), micro_model.state_dict())
    (path / "model1-mp2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_pretrained(path)


def test_save_never_replaces_a_foreign_directory(micro_model, tmp_path):
    """Replacing `path` deletes what was there: only an empty directory or a previous
    checkpoint of ours is replaced unless overwrite=True (a run directory once lost its
    checkpoints this way)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(weights.DestinationError, match=r"run: destination is not empty.*"
                                                       r"checkpoints, notes.txt.*overwrite"):
        save_pretrained(micro_model, run)
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # refused before any temporary was made
    (tmp_path / "file").write_text("x")
    with pytest.raises(weights.DestinationError, match="not a directory"):
        save_pretrained(micro_model, tmp_path / "file")
    # a previous checkpoint plus a stranger is foreign too
    save_pretrained(micro_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(weights.DestinationError, match="optimizer.pt"):
        save_pretrained(micro_model, tmp_path / "ckpt")
    save_pretrained(micro_model, run, overwrite=True)  # explicitly asked
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    save_pretrained(micro_model, tmp_path / "empty")


def test_unreadable_weights_files_name_the_file(micro_model, tmp_path):
    """Truncated / corrupt safetensors and index files: a ValueError subclass whose message
    names the file (safetensors' own error names none)."""
    path = tmp_path / "ckpt"
    save_pretrained(micro_model, path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    for cut in (len(data) // 2, 6):
        file.write_bytes(data[:cut])
        with pytest.raises(weights.WeightsFileError, match=f"^{file}: unreadable weights file"):
            load_pretrained(path)
    file.write_bytes(data)
    save_pretrained(micro_model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = tmp_path / "sharded" / weights.INDEX_FILE
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=f"^{index}: not a readable safetensors index"):
        load_pretrained(tmp_path / "sharded")
    assert issubclass(weights.WeightsFileError, ValueError)
