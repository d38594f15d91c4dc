"""`init_from=PATH` and frozen models (train/init.py): every supported weights format loads to
the source model's logits (into the trainer's materialised model and as a frozen model, also
sharded over EP=2 gloo ranks, each reading only its experts); mismatched shapes, vocabularies,
configs and tokenizers are errors naming the tensor, field or files; a missing path stops
`train/pretrain.py` before any data work; the dry-run plan counts frozen models; and a real
run started from a checkpoint begins at step 0 with the checkpoint's low loss.

Logit comparisons in one process are exact: the loaded tensors are the source's (fp32 formats
round-trip bit-exactly; the quantised release is compared with `load_pretrained`'s own
dequantisation), the forward is the same deterministic CPU computation. Under EP the
all-to-all changes only where expert outputs are summed, fp32 with |logits| ~ 1: 1e-5.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from encoding.special_tokens import SPECIAL_TOKENS
from model import naming
from model import weights as mw
from model.convert import export_hf
from model.quant import quant_fp4, quant_fp8
from model.transformer import Transformer
from model.weights import load_pretrained, save_pretrained
from tests.helpers.distributed import run_distributed
from tests.helpers.reference_shards import write_reference_shards
from tests.parallel.harness import small_config
from train import init
from train.plan import make_plan

REPO = Path(__file__).resolve().parents[2]
BLOCK = (32, 32)


def source_model(seed: int = 0) -> Transformer:
    """A perturbed model: the zero-initialised sinks, ape and mHC biases matter too."""
    torch.manual_seed(seed)
    model = Transformer(small_config())
    g = torch.Generator().manual_seed(7 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def batch() -> torch.Tensor:
    return torch.randint(2, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch()).logits


def write_released(model, path: Path) -> None:
    """The release's layout: `model.` prefix, per-expert FP4 experts, FP8 attention matrices."""
    cfg = model.cfg.replace(quantization={"quant_method": "fp8", "fmt": "e4m3",
                                          "weight_block_size": list(BLOCK)}, expert_dtype="fp4")
    files = {}
    for name, t in naming.split_experts(model.state_dict()).items():
        if naming.per_expert(name):
            q, s = quant_fp4(t)
            files[name], files[name[:-len("weight")] + "scale"] = q, s
        elif ".attn.wq_" in name and name.endswith(".weight"):
            q, s = quant_fp8(t, BLOCK)
            files[name], files[name[:-len("weight")] + "scale"] = q, s
        else:
            files[name] = t
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    mw.write_tensors(path, {"model." + k: v for k, v in files.items()}, max_shard_bytes=200_000)


def write_mp(model, path: Path, world: int = 2) -> None:
    """Reference-inference shards `model{r}-mp{world}.safetensors`."""
    write_reference_shards(model, path, world)


def make_format(kind: str, model, root: Path) -> Path:
    """A directory of `model`'s weights in format `kind`; returns the path init_from takes."""
    if kind == "ours":
        save_pretrained(model, root / "ours")
        return root / "ours"
    if kind == "step_dir":  # a training checkpoint: weights under model/
        save_pretrained(model, root / "step_00000002" / "model")
        return root / "step_00000002"
    if kind == "sharded":
        save_pretrained(model, root / "sharded", max_shard_bytes=100_000)
        return root / "sharded"
    if kind == "hf_export":
        export_hf(model, root / "hf")
        return root / "hf"
    if kind == "released":
        write_released(model, root / "released")
        return root / "released"
    write_mp(model, root / "mp")
    return root / "mp"


FORMATS = ["ours", "step_dir", "sharded", "hf_export", "released", "mp"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_loads_to_the_source_logits(kind, tmp_path):
    model = source_model()
    path = make_format(kind, model, tmp_path)
    # the truth: the source model, or for the quantised release what load_pretrained reads
    ref = (load_pretrained(path, dtype=torch.float32) if kind == "released" else model)
    want = logits(ref)
    src = init.inspect(path)
    init.check_fits(src, small_config())
    # the trainer's path: a materialised model of another init, weights copied in
    trained = Transformer(small_config(seed=5))
    init.load_into(trained, src)
    torch.testing.assert_close(logits(trained), want, rtol=0, atol=0)
    # a frozen model (fp32: the release's default would be bf16 for the dequantised weights)
    frozen, cfg, tok = init.load_frozen_model(path, "cpu", dtype=torch.float32)
    torch.testing.assert_close(logits(frozen), want, rtol=0, atol=0)
    assert cfg.n_routed_experts == 8 and tok is None


def test_digest_tells_apart_checkpoints_of_one_shape(tmp_path):
    """The recorded digest identifies the weights, not just their shapes: headers alone are
    identical for two checkpoints of one architecture."""
    model = source_model()
    save_pretrained(model, tmp_path / "a")
    save_pretrained(model, tmp_path / "a_again")
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # the first tensor in the file
    save_pretrained(model, tmp_path / "b")
    a, again, b = (init.inspect(tmp_path / n).digest for n in ("a", "a_again", "b"))
    assert a == again and a != b


def test_frozen_model_is_frozen_bf16_and_carries_its_tokenizer(tmp_path):
    tok = tokenizer_file(tmp_path, seed=0)
    save_pretrained(source_model(), tmp_path / "ckpt", tokenizer_file=tok)
    frozen = init.load_frozen_model(tmp_path / "ckpt", "cpu", dtype=torch.bfloat16)
    model = frozen.model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.experts.w1.dtype == torch.bfloat16
    assert model.layers[0].attn.attn_sink.dtype == torch.float32  # fp32 by design
    assert frozen.tokenizer_file == str((tmp_path / "ckpt" / "tokenizer.json").absolute())
    assert init.init_tokenizer_file(tmp_path / "ckpt") == frozen.tokenizer_file
    out = model(batch()).logits
    assert not out.requires_grad and torch.isfinite(out).all()


def test_ep_rank_reads_only_its_experts(tmp_path, monkeypatch):
    """Per-expert formats read only the rank's expert ids (nothing else is ever read); our
    stacked format reads slices. Rank 1 of 2 holds experts 4..7."""
    model = source_model()
    full = model.state_dict()
    read = []
    real = mw.read_weights_file

    def spy(file, device="cpu", keep=None):
        out = real(file, device, keep)
        read.extend(out)
        return out

    monkeypatch.setattr(mw, "read_weights_file", spy)
    for kind in ("ours", "released", "hf_export", "mp"):
        read.clear()
        src = init.inspect(make_format(kind, model, tmp_path))
        state = init.read_local_state(src, ep_rank=1, ep_size=2, dtype=torch.float32)
        w1 = state["layers.1.ffn.experts.w1"]
        assert w1.shape[0] == 4
        if kind != "released":
            torch.testing.assert_close(w1, full["layers.1.ffn.experts.w1"][4:], rtol=0, atol=0)
        ids = {naming.per_expert(naming.released_to_ours(n))[1] for n in read
               if naming.per_expert(naming.released_to_ours(n) or "")}
        assert kind == "ours" or ids == {4, 5, 6, 7}, (kind, sorted(ids))


def _ep_rank(rank, world, paths):
    import importlib

    os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from train import expert_parallel as ep

    groups = ep.create_groups(world)
    out = {}
    for kind, path in paths.items():
        frozen = init.load_frozen_model(path, "cpu", torch.float32, ep_groups=groups)
        full = load_pretrained(path, dtype=torch.float32).state_dict()
        for name, t in frozen.model.state_dict().items():
            if ep.is_expert_param(name):
                n = t.shape[0]
                assert n == 4, (name, t.shape)
                torch.testing.assert_close(t.float(), full[name][rank * n:(rank + 1) * n].float(),
                                           rtol=0, atol=0)
        out[kind] = logits(frozen.model).numpy()
        # the trainer's path: a sharded, materialised model of another init, weights copied in
        model = Transformer(small_config(seed=5))
        ep.shard_model(model, groups)
        init.load_into(model, init.inspect(path))
        out[kind + "_trainer"] = logits(model).numpy()
    return out


def test_ep2_each_rank_loads_its_slice_and_logits_match_unsharded(tmp_path):
    model = source_model()
    paths = {k: str(make_format(k, model, tmp_path)) for k in ("ours", "hf_export", "released")}
    results = run_distributed(_ep_rank, 2, paths, timeout=300)
    for kind, path in paths.items():
        want = logits(load_pretrained(path, dtype=torch.float32))
        for rank in range(2):
            for key in (kind, kind + "_trainer"):
                torch.testing.assert_close(torch.from_numpy(results[rank][key]), want,
                                           rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- errors
def _cfg(path, overrides=None, tokenizer=None, run_dir="runs/x"):
    return SimpleNamespace(init_from=str(path), run_dir=run_dir,
                           model=SimpleNamespace(overrides=overrides or {}),
                           data=SimpleNamespace(tokenizer=tokenizer),
                           checkpoint=SimpleNamespace(resume="auto"))


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_pretrained(source_model(), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["layers.0.attn.wq_a.weight"] = torch.zeros(3, 5)
    save_file(tensors, str(file))
    with pytest.raises(init.InitFromError, match=r"layers\.0\.attn\.wq_a\.weight: checkpoint "
                                                 r"\[3, 5\] vs model"):
        init.check_init_from(_cfg(tmp_path / "ckpt"), small_config(), resuming=False)


def test_vocab_and_config_mismatches_name_the_field(tmp_path):
    save_pretrained(source_model(), tmp_path / "ckpt")
    bigger = small_config(vocab_size=512)
    # a preset that differs without an explicit override: the field is named
    with pytest.raises(init.InitFromError, match=r"vocab_size: checkpoint 256 vs this run 512"):
        init.check_init_from(_cfg(tmp_path / "ckpt"), bigger, resuming=False)
    # explicitly overridden: the tensors are checked, naming the vocabulary and embed.weight
    with pytest.raises(init.InitFromError, match=r"(?s)vocabulary: .*embed\.weight has 256 "
                                                 r"rows.*vocab_size=512.*embed\.weight"):
        init.check_init_from(_cfg(tmp_path / "ckpt", {"vocab_size": 512}), bigger,
                             resuming=False)
    # fields that do not change the weights' meaning never count
    init.check_init_from(_cfg(tmp_path / "ckpt"), small_config(seed=9, csa_mode="dense"),
                         resuming=False)


def tokenizer_file(root: Path, seed: int) -> Path:
    """A small byte-level BPE with the DSV4 special tokens; `seed` changes its merges."""
    rng = random.Random(seed)
    words = ("the a cat dog sat on mat and ran far hello world one two three".split() if seed == 0
             else "zebra quartz vivid jumps fox lazy brown over kilo yak".split())
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(100)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = root / f"tok{seed}" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_tokenizer_mismatch_names_both_files(tmp_path):
    mine, other = tokenizer_file(tmp_path, 0), tokenizer_file(tmp_path, 1)
    save_pretrained(source_model(), tmp_path / "ckpt", tokenizer_file=mine)
    ckpt_tok = tmp_path / "ckpt" / "tokenizer.json"
    with pytest.raises(init.InitFromError, match="tokenizer mismatch") as e:
        init.check_init_from(_cfg(tmp_path / "ckpt", tokenizer=str(other)), small_config(),
                             resuming=False)
    assert str(ckpt_tok) in str(e.value) and str(other) in str(e.value)
    # the same tokenizer under another path is fine
    init.check_init_from(_cfg(tmp_path / "ckpt", tokenizer=str(mine)), small_config(),
                         resuming=False)


def test_resume_wins_over_init_from(tmp_path, capsys):
    cfg = _cfg(tmp_path / "does-not-exist")
    assert init.check_init_from(cfg, small_config(), resuming=True) is None
    assert "ignored, the run resumes" in capsys.readouterr().out
    with pytest.raises(init.InitFromError, match="does-not-exist"):
        init.check_init_from(cfg, small_config(), resuming=False)


def test_missing_init_from_stops_before_data_work(tmp_path):
    cache = tmp_path / "cache"
    out = subprocess.run(
        [sys.executable, "train/pretrain.py", f"init_from={tmp_path}/nope",
         f"run_dir={tmp_path}/run", f"data.cache_dir={cache}", "logging.wandb.mode=disabled",
         "logging.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert f"init_from={tmp_path}/nope: checkpoint not found" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not cache.exists()  # no tokenizer training, no token cache


def test_plan_includes_frozen_model_bytes():
    cfg = small_config()
    base = make_plan(cfg, 2, 2, 1, 64, 8, True, "off")
    plan = make_plan(cfg, 2, 2, 1, 64, 8, True, "off",
                     frozen_models=[("reference", cfg, "bf16"), ("teacher", cfg, "fp32")])
    names = {n: (p, b) for n, p, b in plan.frozen}
    params, ref_bytes = names["reference"]
    expert = sum(p.numel() for n, p in Transformer(cfg).named_parameters()
                 if ".ffn.experts." in n)
    total = sum(p.numel() for p in Transformer(cfg).parameters())
    assert params == total - expert // 2                     # experts split over EP=2
    assert 2 * params <= ref_bytes < 4 * params              # bf16, a few fp32 tensors
    assert names["teacher"][1] == 4 * params
    assert plan.total == pytest.approx(base.total + ref_bytes + names["teacher"][1])
    text = plan.format()
    assert "  reference " in text and "  teacher " in text and text.count("(frozen:") == 2
    with pytest.raises(ValueError, match="frozen model teacher: dtype 'fp8'"):
        make_plan(cfg, 2, 2, 1, 64, 8, True, "off", frozen_models=[("teacher", cfg, "fp8")])


# ---------------------------------------------------------------------- a real run
def test_pretrain_starts_from_a_checkpoint_at_step_zero(tmp_path_factory, cache_dir):
    """`train/pretrain.py init_from=<step dir>`: the first loss is the trained model's on the
    same first batch (same seed and data position; measured ~8.1 vs ~10.0 for the fresh init, so
    a 1.0 margin cannot be noise of a deterministic CPU run), steps count from 1 with the LR
    schedule's warm-up again (a fresh optimizer and schedule), the run records where it
    started; started again, it resumes its own checkpoint and ignores init_from."""
    from tests.train.test_pretrain_e2e import losses, run

    tmp = tmp_path_factory.mktemp("init_e2e")
    cache = cache_dir
    a, b = tmp / "a", tmp / "b"
    run(["steps=2"], a, cache)
    start = a / "checkpoints" / "step_00000002"
    out = run(["steps=2", f"init_from={start}"], b, cache)
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2]
    assert lb[1] < la[1] - 1.0, (la, lb)
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lr[1] == [r["lr"] for r in map(json.loads, (a / "metrics.jsonl").read_text()
                                          .splitlines()) if r.get("step") == 1 and "lr" in r][0]
    state = torch.load(b / "checkpoints" / "step_00000002" / "trainer_rank0.pt",
                       weights_only=False)
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    record = json.loads((b / "init_from.json").read_text())
    assert record["path"] == str((start / "model").absolute()) and len(record["digest"]) == 16
    assert rows[0] == {"step": 0, "init_from": record["path"], "init_digest": record["digest"]}
    assert "resumed from" not in out.stdout + out.stderr
    # the run's tokenizer is the checkpoint's (data.tokenizer was unset)
    assert f"tokenizer: {start / 'model' / 'tokenizer.json'}" in (b / "config.yaml").read_text()
    again = run(["steps=3", f"init_from={start}"], b, cache)
    assert "init_from=" in again.stdout and "ignored, the run resumes" in again.stdout
    assert max(losses(b)) == 3


def test_empty_init_from_is_a_config_error():
    from train.config import TrainConfig, config_problems

    assert any(p.startswith("init_from=''") for p in config_problems(TrainConfig(init_from="")))
    assert not any("init_from" in p for p in config_problems(TrainConfig()))
