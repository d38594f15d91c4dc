"""`python generate.py`: prompt, input_file and interactive modes on a tiny checkpoint, and the
errors for bad input."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

import generate as cli
from model.weights import save_pretrained
from tests.helpers.fixtures import finish_step_dir

from .conftest import build_model, micro_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(micro_model, tokenizer_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    save_pretrained(micro_model, path, tokenizer_file)
    return path


def run(argv, read=None):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, read=read or input, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_prompt_streams_and_reports_speed(ckpt):
    code, out, err = run([f"ckpt={ckpt}", "prompt=the cat sat", "max_new_tokens=6",
                          "temperature=0", "device=cpu"])
    assert code == 0, err
    assert out.startswith("the cat sat") and "[length]" in out
    assert "prefill:" in err and "tok/s" in err and "decode: 6 tokens" in err


def test_speculative_prints_the_same_text_and_the_drafts_accepted(ckpt):
    argv = [f"ckpt={ckpt}", "prompt=the cat sat", "max_new_tokens=12", "temperature=0",
            "device=cpu"]
    code, plain, _ = run(argv)
    code_s, fast, err = run([*argv, "speculative=true"])
    assert code == code_s == 0, err
    assert fast == plain and "MTP drafts accepted:" in err


def test_input_file_is_batched(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe dog ran\nfar away\n\n\n one two three\n")
    code, out, err = run([f"ckpt={ckpt}", f"input_file={prompts}", "max_new_tokens=4",
                          "temperature=0.8", "seed=1", "top_p=0.9", "batch_size=8"])
    assert code == 0, err
    assert out.count("--- prompt") == 3 and "the dog ran\nfar away" in out
    assert err.count("prefill:") == 1  # one batch


def test_interactive_chat_with_clear_and_exit(ckpt):
    lines = iter(["hello", "one two", "/clear", "three", "/exit", "never read"])
    code, out, err = run([f"ckpt={ckpt}", "interactive=true", "max_new_tokens=3",
                          "temperature=0", "mode=thinking"], read=lambda prompt: next(lines))
    assert code == 0, err
    assert err.count("prefill:") == 3 and "(conversation cleared)" in out
    assert next(lines) == "never read"


@pytest.mark.parametrize("argv,message", [
    (["prompt=x"], "ckpt=PATH is required"),
    (["ckpt=/nonexistent/ckpt", "prompt=x"], "checkpoint not found: /nonexistent/ckpt"),
    (["ckpt={ckpt}", "prompt=x", "temperature=hot"], "temperature='hot'"),
    (["ckpt={ckpt}", "prompt=x", "colour=red"], "unknown option 'colour'"),
    (["ckpt={ckpt}", "prompt=x", "interactive=true"], "exactly one of"),
    (["ckpt={ckpt}", "prompt="], "prompt='' is empty: give the text to continue"),
    (["ckpt={ckpt}", "prompt=  "], "prompt='  ' is empty"),
    (["ckpt={ckpt}", "input_file=/nonexistent.txt"], "input_file not found"),
    (["ckpt={ckpt}", "prompt=" + "the cat " * 600], "longer than the model context"),
])
def test_bad_input_is_a_clear_error(ckpt, argv, message):
    code, out, err = run([a.format(ckpt=ckpt) for a in argv])
    assert code == 2 and message in err, err


def test_tokenizer_larger_than_the_model_vocab(tokenizer_file, tmp_path):
    small = build_model(micro_config(vocab_size=128))
    save_pretrained(small, tmp_path / "small", tokenizer_file)
    code, _, err = run([f"ckpt={tmp_path / 'small'}", "prompt=x"])
    assert code == 2 and "tokenizer/model vocab mismatch" in err and "128 rows" in err


def test_runs_as_a_script(ckpt):
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), f"ckpt={ckpt}",
                           "prompt=hello", "max_new_tokens=2", "temperature=0"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello")


@pytest.mark.parametrize("env", [{}, {"PYTHONIOENCODING": "utf-8:strict"}])
def test_interactive_survives_bytes_that_are_not_utf8(ckpt, env):
    """A stdin line with an invalid byte used to end the session (TypeError from the
    tokenizer, or UnicodeDecodeError with strict stdin): it is decoded with U+FFFD, the user
    is told, and the conversation goes on."""
    import os
    stdin = b"hello \xff world\none two\n/exit\n"
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), f"ckpt={ckpt}",
                           "interactive=true", "max_new_tokens=2", "temperature=0"],
                          input=stdin, capture_output=True, timeout=300, cwd=REPO,
                          env={**os.environ, **env})
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "not valid UTF-8" in err and err.count("prefill:") == 2, err


def test_ckpt_may_be_a_training_step_directory(micro_model, tokenizer_file, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    save_pretrained(micro_model, step / "model", tokenizer_file)
    (step / "trainer_rank0.pt").write_bytes(b"")
    code, _, err = run([f"ckpt={step}", "prompt=x"])  # no manifest.json: maybe incomplete
    assert code == 2 and f"{step}: no manifest.json" in err and f"ckpt={step / 'model'}" in err
    code, _, err = run([f"ckpt={step.with_name(step.name + '.tmp')}", "prompt=x"])
    assert code == 2 and "an unfinished save" in err, err
    finish_step_dir(step)
    code, out, err = run([f"ckpt={step}", "prompt=the cat", "max_new_tokens=2",
                          "temperature=0", "device=cpu"])
    assert code == 0, err
    assert out.startswith("the cat")
    (step / "model" / "config.json").unlink()
    code, _, err = run([f"ckpt={step}", "prompt=x"])
    assert code == 2 and f"{step}: no config.json" in err and "under model/" in err, err


def test_unreadable_weights_are_an_error_line(micro_model, tokenizer_file, tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(micro_model, path, tokenizer_file)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    code, _, err = run([f"ckpt={path}", "prompt=x", "device=cpu"])
    assert code == 2 and err.startswith(f"error: {file}: unreadable weights file"), err
    config = (path / "config.json").read_bytes()
    save_pretrained(build_model(micro_config(moe_inter_dim=32)), path, tokenizer_file)
    (path / "config.json").write_bytes(config)  # weights of other shapes than config.json's
    code, _, err = run([f"ckpt={path}", "prompt=x", "device=cpu"])
    assert code == 2 and err.startswith(f"error: {path}") and "has shape" in err, err


def test_corrupt_tokenizer_is_an_error_line(micro_model, tokenizer_file, tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(micro_model, path, tokenizer_file)
    tok = path / "tokenizer.json"
    tok.write_text(tok.read_text()[:500])  # truncated JSON
    code, _, err = run([f"ckpt={path}", "prompt=x", "device=cpu"])
    assert code == 2 and err.startswith(f"error: {tok}: unreadable tokenizer file"), err
