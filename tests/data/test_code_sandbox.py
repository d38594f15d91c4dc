"""Code with unit tests (`verifier: code` of a dataset domain, data/domains/sandbox.py): right
code passes, and each hostile or broken completion scores 0 within its limit while nothing
outside the sandbox changes: an infinite loop, a sleeping one, a fork bomb, a 100 GB
allocation, writing outside its folder, reading the trainer's files, `sys.exit`, forging the
harness's report, a network call, a subprocess. Rollouts score code samples in parallel."""

from __future__ import annotations

import json
import time

import pytest

from data.domains import get_domain, safe_verify
from data.domains.sandbox import Limits, run_tests
from tests.helpers.fixtures import train_bpe
from tests.train._rollout_support import Oracle, stub_model
from train.rollout import RolloutParams, rollout

EOS = "<｜end▁of▁sentence｜>"
LIMITS = dict(cpu_seconds=2, wall_seconds=4, memory_mb=512)


@pytest.fixture
def code_domain(tmp_path):
    rows = [{"prompt": f"Write add{i}(a, b) returning a + b + {i}.",
             "tests": [f"assert add{i}(1, 2) == {3 + i}", f"assert add{i}(0, 0) == {i}"],
             "solution": f"```python\ndef add{i}(a, b):\n    return a + b + {i}\n```"}
            for i in range(24)]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return get_domain(f"data:{path}", verifier="code", **LIMITS)


def reply(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```{EOS}"


def test_right_code_passes_and_partial_credit(code_domain, tmp_path):
    item = code_domain.sample("train", 0)
    assert safe_verify(code_domain, item, item.reference_completion()).reward == 1.0
    name = item.problem["tests"][0].split("(")[0].split()[-1]
    half = reply(f"def {name}(a, b):\n    return {item.problem['tests'][1].split()[-1]}")
    assert safe_verify(code_domain, item, half).reward == 0.0  # all-or-nothing by default
    fraction = get_domain(code_domain.name, verifier="code", reward="fraction", **LIMITS)
    assert safe_verify(fraction, item, half).reward == 0.5
    assert safe_verify(code_domain, item, "no code" + EOS).reward == 0.0


def test_hostile_code_scores_zero_within_its_limit(code_domain, tmp_path):
    secret = tmp_path / "trainer_state.txt"
    secret.write_text("weights")
    outside = tmp_path / "owned.txt"
    item = code_domain.sample("train", 0)
    hostile = {
        "infinite loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "100 GB": "x = bytearray(100 * 2**30)",
        "write outside": f"open({str(outside)!r}, 'w').write('x')",
        "delete outside": f"import os\nos.remove({str(secret)!r})",
        "read trainer": f"DATA = open({str(secret)!r}).read()",
        "sys.exit": "import sys\nsys.exit(0)",
        "forged report": "import os\nopen('report.json', 'w').write("
                         "'{\"passed\": 2, \"reason\": \"ok\"}')\nos._exit(0)",
        "network": "import socket\nsocket.create_connection(('10.0.0.1', 80), timeout=1)",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
    }
    for name, code in hostile.items():
        t0 = time.monotonic()
        score = safe_verify(code_domain, item, reply(code + "\ndef add0(a, b):\n    return a + b"))
        assert score.reward == 0.0 and score.error is None, (name, score)
        assert time.monotonic() - t0 < LIMITS["wall_seconds"] + 3, name
    assert not outside.exists() and secret.read_text() == "weights"


def test_no_tests_and_parallel_scoring_in_a_rollout(code_domain, tmp_path):
    assert run_tests("x = 1", [], Limits()).reason == "no tests"
    items = [code_domain.sample("train", i) for i in range(6)]
    text = [it.prompt_text() + it.reference_completion() for it in items]
    tok = train_bpe(text * 20, 400, tmp_path / "tok.json")
    from encoding.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok))
    result = rollout(stub_model(), tokenizer, [(code_domain, it) for it in items],
                     RolloutParams(max_new_tokens=200), generate_fn=Oracle(tokenizer, items))
    assert [s.score.reward for s in result.samples] == [1.0] * 6
