"""`train.evaluate`: the pass@k estimator against brute force, the harness on a scripted perfect
policy (every rate exactly 1) and on a broken verifier, sharding over 2 gloo ranks, and the
command line end to end on a random tiny checkpoint plus its errors for bad input."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from data.domains import get_domain
from data.domains.strings import StringsDomain
from model.weights import save_pretrained
from tests.helpers.distributed import run_distributed
from tests.helpers.fixtures import finish_step_dir
from tests.inference.conftest import build_model, micro_config
from train.evaluate import (capped_notes, evaluate_domains, flat_metrics, format_table, main,
                            pass_at_k)

from ._rollout_support import (Oracle, domain_tokenizer, domain_tokenizer_file,  # noqa: F401
                               stub_model)

REPO = Path(__file__).resolve().parents[2]


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of k-subsets of n samples (c correct) holding at least one correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force():
    # exact integer binomials and one correctly rounded division: within a few ulp of 1
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)),
                                                           abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # pass@1 = c / n
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


def _domains():
    return [get_domain("strings"), get_domain("arith"), get_domain("countdown"),
            get_domain("calculator", schema="brief")]


def test_perfect_policy_scores_one_everywhere(domain_tokenizer):
    tok = domain_tokenizer
    domains = _domains()
    items = [it for d in domains for it in d.distinct("test", 6, seed=2)]
    oracle = Oracle(tok, items)
    result = evaluate_domains(stub_model(), tok, domains, 6, seed=2, k=2, samples=3,
                              max_new_tokens=200, examples=2, generate_fn=oracle)
    # per domain: greedy (T=0, one row per item), then T=1 with 3 rows per item; calculator
    # takes a second round after its tool result
    temps = [(c["temperature"], c["rows"]) for c in oracle.calls]
    assert temps[:2] == [(0.0, 6), (1.0, 18)] and temps[-2:] == [(1.0, 18), (1.0, 18)]
    assert set(result["domains"]) == {"strings", "arith", "countdown", "calculator"}
    for name, row in result["domains"].items():
        assert row["pass@1"] == 1.0 and row["pass@2"] == 1.0, name
        assert row["format_valid"] == 1.0 and row["sampled_format_valid"] == 1.0, name
        assert (row["evaluated"], row["skipped"], row["unparsable"],
                row["verifier_errors"]) == (6, 0, 0, 0), name
        assert row["finish"] == {"eos": 6} and row["mean_response_tokens"] > 0
    assert flat_metrics(result)["eval/calculator/pass@1"] == 1.0
    # the first two greedy transcripts per domain, as a report shows them
    by_domain = {d.name: [it for it in items if it.domain == d.name][:2] for d in domains}
    for name, shown in result["examples"].items():
        assert [e["answer"] for e in shown] == [it.answer for it in by_domain[name]], name
        assert all(e["correct"] and e["completion"] and e["prompt"] for e in shown), name
    table = format_table(result)
    assert "pass@2" in table and "calculator" in table.splitlines()[-1]


class BrokenStrings(StringsDomain):
    name = "broken"

    def verify(self, item, completion_text):
        raise RuntimeError("verifier bug")


def test_items_are_distinct_and_a_small_split_caps_n_with_a_note(domain_tokenizer):
    """arith at level 1 has 23 test problems: n=500 scores each once (generate would score
    each ~22 times), the row's n says 23, and a note says the request was capped."""
    tok = domain_tokenizer
    arith = get_domain("arith", difficulty=1)
    assert len({it.key for it in arith.generate("test", 500)}) == 23  # what repeats would do
    items = arith.distinct("test", 500)
    oracle = Oracle(tok, items)
    result = evaluate_domains(stub_model(), tok, [arith], 500, max_new_tokens=200,
                              generate_fn=oracle)
    assert len(items) == 23 and len({it.key for it in items}) == 23
    assert oracle.calls[0]["rows"] == 23
    row = result["domains"]["arith"]
    assert (row["n"], row["evaluated"], row["pass@1"]) == (23, 23, 1.0)
    assert capped_notes(result) == ["note: arith (difficulty 1) has 23 distinct test items; "
                                    "all 23 are scored, not n=500"]
    strings = evaluate_domains(stub_model(), tok, [get_domain("strings")], 5,
                               max_new_tokens=200, generate_fn=Oracle(
                                   tok, get_domain("strings").distinct("test", 5)))
    assert strings["domains"]["strings"]["n"] == 5 and not capped_notes(strings)


def test_verifier_errors_and_unparsable_answers_are_counted(domain_tokenizer):
    tok = domain_tokenizer
    broken, strings = BrokenStrings(), get_domain("strings")
    items = broken.distinct("test", 4) + strings.distinct("test", 4)
    result = evaluate_domains(stub_model(), tok, [broken, strings], 4,
                              max_new_tokens=2, generate_fn=Oracle(tok, items))
    row = result["domains"]["broken"]
    assert row["verifier_errors"] == 4 and row["unparsable"] == 0 and row["pass@1"] == 0.0
    row = result["domains"]["strings"]  # 2 tokens cut every answer before its EOS
    assert row["unparsable"] == 4 and row["format_valid"] == 0.0 and row["finish"] == {"length": 4}


def test_too_long_prompts_are_skipped_and_counted(domain_tokenizer):
    tok = domain_tokenizer
    full, strings = get_domain("calculator"), get_domain("strings")
    items = full.distinct("test", 3) + strings.distinct("test", 3)
    limit = max(len(tok.encode(it.prompt_text(), add_special_tokens=False)) for it in items[3:])
    result = evaluate_domains(stub_model(limit + 30), tok, [full, strings], 3, k=1,
                              max_new_tokens=200, generate_fn=Oracle(tok, items))
    calc = result["domains"]["calculator"]
    assert (calc["n"], calc["evaluated"], calc["skipped"]) == (3, 0, 3)
    assert calc["pass@1"] is None and calc["pass@1_sampled"] is None
    assert calc["format_valid"] is None and calc["mean_response_tokens"] is None
    strings = result["domains"]["strings"]  # k=1: the sampled estimate beside the greedy one
    assert strings["pass@1"] == 1.0 and strings["pass@1_sampled"] == 1.0


def test_bad_arguments_are_errors_before_any_generation(domain_tokenizer):
    def never(*a, **k):
        raise AssertionError("generate called")

    for kwargs, match in [(dict(k=4, samples=2), "samples >= k"), (dict(split="dev"), "split"),
                          (dict(rank=2, world=2), "rank"), (dict(k=2, temperature=-1), "temper")]:
        with pytest.raises(ValueError, match=match):
            evaluate_domains(stub_model(), domain_tokenizer, ["strings"], 2, generate_fn=never,
                             **kwargs)
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        evaluate_domains(stub_model(), domain_tokenizer, ["nope"], 2, generate_fn=never)


def _sharded(rank, world, tok_file):
    from encoding.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_file)
    domain = get_domain("strings")
    items = domain.distinct("test", 5)
    oracle = Oracle(tok, items)
    kept = 2  # every rank answers its first `kept` items right, the rest wrong (cut short)

    def script(model, prompts, max_new_tokens=256, **kw):
        out = oracle(model, prompts, max_new_tokens=max_new_tokens, **kw)
        for i in range(kept, len(prompts)):
            out.tokens[i], out.finish_reasons[i] = out.tokens[i][:1], "length"
            out.logprobs[i], out.raw_logprobs[i] = out.logprobs[i][:1], out.raw_logprobs[i][:1]
        return out

    result = evaluate_domains(stub_model(), tok, [domain], 5, rank=rank, world=world,
                              max_new_tokens=50, generate_fn=script)
    return result["domains"]["strings"]


def test_sharded_over_two_ranks_sums_the_counts(domain_tokenizer_file):
    rows = run_distributed(_sharded, 2, domain_tokenizer_file, timeout=120)
    assert rows[0] == rows[1]  # every rank returns the global numbers
    row = rows[0]
    # rank 0 holds items 0, 2, 4 (2 right), rank 1 items 1, 3 (2 right)
    assert (row["n"], row["evaluated"]) == (5, 5)
    assert row["pass@1"] == pytest.approx(4 / 5) and row["unparsable"] == 1


@pytest.fixture(scope="module")
def step_ckpt(tmp_path_factory, domain_tokenizer_file):
    """A random tiny model saved like a training checkpoint: step_N/model/{config, weights,
    tokenizer.json}."""
    torch.manual_seed(0)
    model = build_model(micro_config(vocab_size=512, max_seq_len=256))
    step = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000003"
    save_pretrained(model, step / "model", domain_tokenizer_file)
    finish_step_dir(step)
    return step


def test_cli_refuses_unfinished_and_manifestless_checkpoints(step_ckpt, tmp_path, capsys):
    unfinished = step_ckpt.with_name(step_ckpt.name + ".tmp")
    shutil.copytree(step_ckpt, unfinished)
    assert main([f"ckpt={unfinished}", "domains=[strings]"]) == 2
    assert "an unfinished save (step_N.tmp becomes step_N only once complete)" in \
        capsys.readouterr().err
    bare = tmp_path / "step_00000009"
    shutil.copytree(step_ckpt, bare)
    (bare / "manifest.json").unlink()
    assert main([f"ckpt={bare}", "domains=[strings]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bare}: no manifest.json") and f"ckpt={bare / 'model'}" in err


def test_cli_end_to_end_on_a_random_tiny_checkpoint(step_ckpt, tmp_path):
    out = tmp_path / "res" / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "train.evaluate", f"ckpt={step_ckpt}",
                           "domains=[strings,calculator]", "options.calculator.schema=brief",
                           "n=3", "k=2", "max_new_tokens=4", "batch_size=4", "device=cpu",
                           f"out={out}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pass@1" in proc.stdout and "pass@2" in proc.stdout and "tok/s" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["domains"]) == {"strings", "calculator"}
    for row in result["domains"].values():
        assert 0.0 <= row["format_valid"] <= 1.0 and 0.0 <= row["pass@1"] <= 1.0
        assert 0.0 <= row["pass@2"] <= 1.0 and row["evaluated"] == 3
        assert 0 < row["mean_response_tokens"] <= 4
    assert result["settings"]["ckpt"] == str(step_ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no outputs/ in the cwd


@pytest.mark.parametrize("argv,message", [
    (["ckpt=/nonexistent", "domains=[strings,nope]"], "unknown domain 'nope'"),
    (["ckpt=/nonexistent", "domains=[strings]"], "checkpoint not found: /nonexistent"),
    (["domains=[strings]"], "ckpt=PATH is required"),
    (["ckpt=/x", "nonsense=1"], "nonsense"),
    (["ckpt=/x", "n=abc"], "bad override n: Value 'abc'"),
    (["ckpt=/x", "k=4", "samples=2"], "samples=2: must be >= k=4"),
    (["ckpt=/x", "n=0"], "n=0"),
    (["ckpt=/x", "options.arith.digits=3"], "options.arith"),
    (["ckpt=/x", "domains=[strings]", "difficulty=99"], "difficulty=99"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_cli_missing_tokenizer_is_an_error_before_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # unreadable weights, never reached
    assert main([f"ckpt={tmp_path}", "domains=[strings]"]) == 2
    assert "no tokenizer at" in capsys.readouterr().err
