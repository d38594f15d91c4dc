"""Domain-expert SFT (`train/sft.py`, `train/sft_task.py`) on the shared trainer core.

- The loss covers exactly the assistant's tokens: in a packed SFT batch, the labelled targets of
  every conversation decode to that conversation's reference answer (answer + EOS), and the
  task's count is their number. With the mask ignored, prompts would be labelled too and the
  decoded targets would not be answers: the test fails.
- End to end (real `python train/sft.py` from a random micro checkpoint via `init_from`): the
  training loss falls and the domain's format-valid rate rises above the base model's (0: a
  random model never ends a well-formed answer within 16 tokens), the checkpoint is what
  `python -m train.evaluate` reads, and resume continues the run.
- Bad input: unknown domain, bad weights, no data, a missing file, a missing `init_from`: clear
  errors before any data or model work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.inference.conftest import micro_config
from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)
from tests.train._rollout_support import micro_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def sft_config(run_dir, **updates):
    from train.config import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    base = {"run_dir": str(run_dir), "data.seq_len": 128, "data.micro_batch": 4,
            "sft.domains": ["strings"], "sft.examples": 64, "sft.val_examples": 8,
            "data.cache_dir": str(Path(run_dir) / "cache"), "logging.progress": False}
    for key, value in {**base, **updates}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_domain_specs_and_errors(tmp_path):
    from data.domains.spec import parse_domain_spec
    from train.sft_task import build_domains

    assert parse_domain_spec("strings") == ("strings", 1.0)
    assert parse_domain_spec("arith:2") == ("arith", 2.0)
    assert parse_domain_spec("rg:spell_backward") == ("rg:spell_backward", 1.0)
    assert parse_domain_spec("rg:spell_backward:0.5") == ("rg:spell_backward", 0.5)
    cases = [({"domains": ["nope"]}, "unknown domain 'nope'"),
             ({"domains": ["strings", "strings"]}, "at most once"),
             ({"domains": ["strings:-1"]}, "weight must be a number >= 0"),
             ({"domains": []}, "give domains"),
             ({"domains": ["strings"], "files": [str(tmp_path / "missing.jsonl")]},
              "missing.jsonl: no such file"),
             ({"domains": ["arith"], "domain_options": {"arith": {"difficulty": 99}}},
              "difficulty=99"),
             ({"domains": ["arith"], "domain_options": {"strings": {}}}, "not in sft.domains")]
    for changes, message in cases:
        cfg = sft_config(tmp_path, **{f"sft.{k}": v for k, v in changes.items()})
        with pytest.raises(ValueError, match=message):
            build_domains(cfg.sft)


def test_loss_covers_exactly_the_assistant_answers(tmp_path, domain_tokenizer_file):  # noqa: F811
    from data.domains import get_domain
    from train.dist import DistInfo
    from train.recipe import Phase
    from train.sft_task import SFTTask

    cfg = sft_config(tmp_path, **{"sft.domains": ["strings", "arith:2"]})
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    task = SFTTask(cfg, info, micro_config(vocab_size=512), domain_tokenizer_file)
    answers = {item.reference_completion() for name in ("strings", "arith")
               for item in get_domain(name).generate("train", 64, cfg.seed)}
    task.enter_phase(Phase("sparse", True, False, 0.3, 128))
    seen = 0
    for batch in task.batches(0, 3, None):
        labels, docs = batch["labels"], batch["doc_ids"]
        assert task.count(batch) == float((labels != -100).sum()) > 0
        for row in range(labels.shape[0]):
            for doc in docs[row].unique().tolist():
                targets = labels[row][(docs[row] == doc) & (labels[row] != -100)].tolist()
                if not targets:
                    continue  # padding
                text = task.tokenizer.decode(targets, skip_special_tokens=False)
                assert text in answers, f"labelled text is not an assistant answer: {text!r}"
                seen += 1
    assert seen >= 10
    task.close()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, domain_tokenizer_file):  # noqa: F811
    return micro_checkpoint(tmp_path_factory.mktemp("base"), domain_tokenizer_file)


def run_sft(base, run_dir, *extra, timeout=600, launcher=()):
    args = [f"init_from={base}", f"model.preset={base}/model/config.json",
            "sft.domains=[strings]", f"run_dir={run_dir}", f"data.cache_dir={run_dir}/cache",
            "logging.progress=false", "logging.wandb.mode=disabled", "data.seq_len=128",
            "data.micro_batch=8", "batch.global_batch=8", "sft.examples=400",
            "sft.val_examples=32", "sft.eval_n=16", "sft.eval_max_new_tokens=16",
            "optim.lr=3e-3", *extra]
    cmd = list(launcher) or [sys.executable]
    return subprocess.run([*cmd, "train/sft.py", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_sft_learns_the_format_and_resumes(base_ckpt, tmp_path):
    run = tmp_path / "sft"
    out = run_sft(base_ckpt, run, "steps=40", "logging.eval_every=0", "checkpoint.every=20")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    final = [r for r in rows if "eval/strings/format_valid" in r][-1]
    assert final["eval/strings/format_valid"] >= 0.1, final  # the random base model: 0
    assert final["val_loss"] < losses[0]
    assert rows[0]["init_from"].endswith("step_00000001/model")
    # the checkpoint is what the evaluation harness reads
    ev = subprocess.run([sys.executable, "-m", "train.evaluate",
                         f"ckpt={run}/checkpoints/step_00000040", "domains=[strings]", "n=16",
                         "k=0", "max_new_tokens=16", "device=cpu", f"out={tmp_path}/ev.json"],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    harness = json.loads((tmp_path / "ev.json").read_text())["domains"]["strings"]
    assert harness["format_valid"] == pytest.approx(final["eval/strings/format_valid"])
    # resume: a longer run continues from step 40 (the init checkpoint is then ignored)
    more = run_sft(base_ckpt, run, "steps=42", "logging.eval_every=0", "sft.eval_n=0")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "resumed from" in more.stdout and "init_from=" in more.stdout


def test_two_processes_under_the_deepspeed_launcher(base_ckpt, tmp_path):
    """`deepspeed --num_gpus 2 train/sft.py`: both ranks train on their shards of the data,
    evaluate (items sharded, counts summed) and write one checkpoint."""
    from tests.helpers.distributed import free_port

    launcher = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    run = tmp_path / "sft2"
    out = run_sft(base_ckpt, run, "steps=3", "sft.eval_n=4", "logging.eval_every=0",
                  "data.micro_batch=4", launcher=launcher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    final = [r for r in rows if "eval/strings/evaluated" in r][-1]
    assert final["eval/strings/evaluated"] == 4  # 2 items per rank, summed
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "trainer_rank0.pt").exists() and (ckpt / "trainer_rank1.pt").exists()


def test_torchrun_launcher(base_ckpt, tmp_path):
    """`torchrun --nproc_per_node 2 train/sft.py`: the same entry point under torch's launcher."""
    from tests.helpers.distributed import free_port

    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()))
    run = tmp_path / "sft_torchrun"
    out = run_sft(base_ckpt, run, "steps=2", "sft.eval_n=0", "logging.eval_every=0",
                  "data.micro_batch=4", "sft.examples=64", launcher=launcher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (run / "checkpoints" / "step_00000002" / "trainer_rank1.pt").exists()


def test_context_parallel_is_refused_with_one_line(base_ckpt, tmp_path):
    """SFT rows are not cut into chunks: `parallel.cp_size=2` stops before the model is built."""
    from tests.helpers.distributed import free_port

    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()))
    out = run_sft(base_ckpt, tmp_path / "cp", "steps=1", "sft.eval_n=0", "data.micro_batch=4",
                  "sft.examples=64", "parallel.cp_size=2", launcher=launcher, timeout=300)
    assert out.returncode != 0
    assert ("error: parallel.cp_size=2: context parallelism is for pre-training; this stage "
            "needs parallel.cp_size=1") in out.stdout + out.stderr
    assert "sft_task.py\", line" not in out.stderr and "trainer.py\", line" not in out.stderr


def test_bad_input_fails_before_any_work(tmp_path):
    for extra, message in [(["init_from=/nonexistent/ckpt"], "/nonexistent/ckpt"),
                           (["init_from=/x", "sft.domains=[nope]"], "unknown domain 'nope'")]:
        out = subprocess.run([sys.executable, "train/sft.py", f"run_dir={tmp_path}/r",
                              f"data.cache_dir={tmp_path}/cache", *extra], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and message in out.stderr + out.stdout, out.stderr[-2000:]
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "cache").exists()


def _jsonl_with_a_latin1_byte(path, good_lines: int):
    line = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    with open(path, "wb") as f:
        for _ in range(good_lines):
            f.write(line.encode() + b"\n")
        f.write(line.replace("hello", "caf\\u00e9").encode().replace(b"\\u00e9", b"\xe9") + b"\n")


@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_a_non_utf8_line_is_one_error_line_naming_file_and_line(base_ckpt, tmp_path, stage):
    """One Latin-1 byte on line 6: the run stops with `error: <file>:6: not UTF-8 (byte 0xe9
    at column N)` as its only stderr line of substance, no traceback, exit 1."""
    bad = tmp_path / "chats.jsonl"
    _jsonl_with_a_latin1_byte(bad, 5)
    if stage == "sft":
        out = run_sft(base_ckpt, tmp_path / "run", f"sft.files=[{bad}]", "steps=1")
    else:
        # a pre-training corpus: {"text": ...} per line
        rows = [json.dumps({"text": f"document {i} " * 30}).encode() for i in range(5)]
        bad.write_bytes(b"\n".join(rows) + b'\n{"text": "caf\xe9 au lait"}\n')
        out = subprocess.run([sys.executable, "train/pretrain.py", f"run_dir={tmp_path}/run",
                              f"data.cache_dir={tmp_path}/cache", f"data.sources=[{{path:{bad}}}]",
                              "data.seq_len=64", "data.micro_batch=2", "batch.global_batch=2",
                              "steps=1", "logging.progress=false", "optim.name=adamw"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:6: not UTF-8 (byte 0xe9 at column "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
