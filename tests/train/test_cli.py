"""`train.cli.parse_cli`, the command line of `generate.py` and `python -m train.evaluate`: typed
keys, `--help`, every bad key reported at once, free text kept as given."""

import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import parse_cli
from train.evaluate import EvalConfig

REPO = Path(__file__).resolve().parents[2]


def test_every_bad_key_is_listed_at_once():
    with pytest.raises(ValueError) as e:
        parse_cli(EvalConfig, ["n=abc", "k=-1", "colour=red", "stray", "domains=[a,b]"])
    text = str(e.value)
    for part in ("bad override n: Value 'abc'", "k=-1: must be >= 0",
                 "unknown option 'colour'", "argument 'stray': expected key=value"):
        assert part in text, text


def test_text_values_are_kept_as_given_and_lists_parsed():
    cfg = parse_cli(EvalConfig, ["ckpt=a: b # c", "domains=[x,y]", "options.arith.digits=3"])
    assert cfg.ckpt == "a: b # c" and cfg.domains == ["x", "y"]
    assert cfg.options == {"arith": {"digits": 3}}


@pytest.mark.parametrize("cmd", [["generate.py"], ["-m", "train.evaluate"]])
def test_help_lists_the_keys(cmd):
    out = subprocess.run([sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "keys (key=value):" in out.stdout and "max_new_tokens" in out.stdout
