"""`python generate.py`: prompt, input_file and interactive modes on a tiny checkpoint, and the
errors for bad input."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

import generate as cli
from model.weights import save_pretrained

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
