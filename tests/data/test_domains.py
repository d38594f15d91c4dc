"""Verifiable domains (data/domains): determinism, disjoint splits, verifiers, tool turns, CLI.

Everything is exact (integers, strings, Fractions), so equality assertions hold by
construction. Token counts use the session tokenizer of tests/data/conftest.py: a 512-entry
byte-level BPE, coarser than the 8192-entry default, so a count below a bound here is also
below it with the default tokenizer (fewer merges can only mean more tokens).
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.domains import (DOMAINS, AnswerDomain, Score, get_domain, mixture, safe_verify,
                          summarize, write_sft_jsonl)
from data.domains.__main__ import main as cli_main
from data.domains.base import split_of
from data.domains.calculator import CalculatorDomain
from data.domains.expr import ExprMathError, ExprSyntaxError, evaluate, parse_number
from encoding import encode_messages, parse_message_from_completion_text
from encoding.special_tokens import ASSISTANT, EOS, THINK_END, THINK_START, USER
from encoding.tokenizer import tokenize_conversation

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ("strings", "arith", "countdown", "calculator")


def configs(thinking=("chat", "thinking")):
    """(name, options) for every built-in domain, level and supported mode."""
    out = []
    for name in BUILTIN:
        for level in get_domain(name).levels:
            for mode in thinking:
                out.append((name, {"difficulty": level, "thinking_mode": mode}))
    out += [("calculator", {"difficulty": lv, "schema": "brief"}) for lv in (1, 4)]
    out += [("arith", {"difficulty": 3, "ops": ("+", "-", "*")})]
    return out


def cut(text: str, n: int = 1) -> str:
    return text[: len(text) - n]


# ---- registry -----------------------------------------------------------------------------

def test_registry_lists_builtins_and_rejects_unknown_names():
    assert set(BUILTIN) <= set(DOMAINS)
    with pytest.raises(ValueError, match="unknown domain 'nope'.*strings.*calculator"):
        get_domain("nope")
    with pytest.raises(ValueError, match=r"difficulty=9.*\[1, 2, 3, 4\]"):
        get_domain("strings", difficulty=9)
    with pytest.raises(ValueError, match="bad options.*colour"):
        get_domain("arith", colour="red")
    with pytest.raises(ValueError, match="ops="):
        get_domain("arith", ops=("^",))
    with pytest.raises(ValueError, match="brief.*chat"):
        get_domain("calculator", schema="brief", thinking_mode="thinking")



def test_plugin_domains_come_from_the_environment(monkeypatch, capsys):
    """$V4LAB_DOMAINS names modules whose import registers domains; every entry point's
    `get_domain` (and `python -m data.domains list`) then knows them; a module that does not
    import is an error naming the variable and the module."""
    from data.domains import registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    monkeypatch.setenv("V4LAB_DOMAINS", "tests.rl.first_char_domain")
    sys.modules.pop("tests.rl.first_char_domain", None)
    domain = get_domain("first_char")
    item = domain.sample("test", 0)
    assert safe_verify(domain, item, item.reference_completion()).format_valid
    assert get_domain("first_char_odd").name == "first_char_odd"
    assert cli_main(["list"]) == 0 and "first_char" in capsys.readouterr().out
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    monkeypatch.setenv("V4LAB_DOMAINS", "tests.rl.first_char_domain, no_such_module_xyz")
    with pytest.raises(ImportError, match="V4LAB_DOMAINS=.*cannot import 'no_such_module_xyz'"):
        get_domain("strings")
    with pytest.raises(ValueError, match="not a named Domain subclass"):
        registry.register_domain(int)

# ---- determinism and splits ---------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN)
def test_generation_is_deterministic_by_seed(name):
    d = get_domain(name, difficulty=2)
    a, b = d.generate("train", 8, seed=3), get_domain(name, difficulty=2).generate("train", 8, seed=3)
    assert a == b
    assert d.sample("train", 5, seed=3) == a[5]
    assert [i.key for i in d.generate("train", 8, seed=4)] != [i.key for i in a]


@pytest.mark.parametrize("name", BUILTIN)
def test_train_and_test_are_disjoint_at_every_difficulty(name):
    d0 = get_domain(name)
    keys = {"train": set(), "test": set()}
    for level in d0.levels:
        d = get_domain(name, difficulty=level)
        for split in keys:
            for item in d.generate(split, 40, seed=level):
                assert item.split == split
                assert split_of(name, item.key, d.test_fraction) == split
                keys[split].add(item.key)
    assert keys["train"] and keys["test"]
    assert not keys["train"] & keys["test"]


# ---- verifiers ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", configs())
def test_reference_answer_verifies(name, options):
    d = get_domain(name, **options)
    for split in ("train", "test"):
        for item in d.generate(split, 6, seed=1):
            full = encode_messages(item.conversation, item.thinking_mode)
            assert full == item.prompt_text() + item.reference_completion()
            score = d.verify(item, item.reference_completion())
            assert score == Score(1.0, True, True, "correct"), (item.id, score)
            json.dumps(item.to_sft_record())  # what data.sft reads must be JSON


def _answer_turn(item, content: str) -> str:
    """A single assistant turn in the item's mode, with `content` as the answer."""
    return (THINK_END if item.thinking_mode == "thinking" else "") + content + EOS


WRONG = {  # a readable but wrong answer per domain
    "strings": "z z z z z z z z z z z z z z",
    "arith": "9 9 9 9 9 9 9 9 9",
    "countdown": "1 + 1",
    "rg": "definitely wrong",
}


@pytest.mark.parametrize("name", ["strings", "arith", "countdown"])
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_wrong_garbled_and_empty_answers_score_zero(name, mode):
    d = get_domain(name, difficulty=2, thinking_mode=mode)
    item = d.sample("test", 0)
    reference = item.reference_completion()
    readable_wrong = d.verify(item, _answer_turn(item, WRONG[name]))
    assert (readable_wrong.reward, readable_wrong.format_valid) == (0.0, True)
    unreadable = ["", EOS, _answer_turn(item, ""), _answer_turn(item, "hello, world!"),
                  cut(reference, len(EOS)),  # generation cut off before EOS
                  _answer_turn(item, "a" + THINK_START + "b")]
    if mode == "thinking":
        unreadable.append(item.answer + EOS)  # no </think>
    for text in unreadable:
        score = d.verify(item, text)
        assert (score.reward, score.correct, score.format_valid) == (0.0, False, False), (text, score)
    # Text after EOS is not part of the turn (a sampler may pad with EOS).
    assert d.verify(item, reference + EOS + "junk").reward == 1.0


def test_answer_readers_are_lenient_about_whitespace_only():
    s = get_domain("strings")
    item = s.sample("train", 0)
    assert s.verify(item, _answer_turn(item, item.answer.replace(" ", ""))).reward == 1.0
    assert s.verify(item, _answer_turn(item, "  " + item.answer + "\n")).reward == 1.0
    a = get_domain("arith", difficulty=3, ops=("-",))
    for item in a.generate("train", 20):
        assert item.problem["result"] >= 0
        assert a.verify(item, _answer_turn(item, item.answer + " 0")).reward == 1.0  # 0-padded
        assert not a.verify(item, _answer_turn(item, item.answer[::-1] + " 1")).correct
    huge = a.verify(item, _answer_turn(item, "7" * 5000))  # beyond int()'s digit limit
    assert (huge.correct, huge.format_valid) == (False, True)


def test_countdown_checks_numbers_operators_and_exact_division():
    d = get_domain("countdown", difficulty=1)
    item = replace(d.sample("train", 0), problem={"numbers": [6, 2, 3], "target": 5})

    def score(expr):
        return d.verify(item, _answer_turn(item, expr))

    assert score("2 + 3").reward == 1.0  # a number may stay unused
    assert score("6 - (3 - 2)").reward == 1.0
    assert not score("3 + 2 + 0").correct and score("3 + 2 + 0").format_valid  # 0 not given
    assert "not available" in score("2 + 2 + 1").reason  # 2 used twice
    assert "not allowed" in score("6 / 3 + 2").reason  # no / at difficulty 1
    assert not score("-1 + 6").format_valid  # unary minus is not a Countdown operation
    d4 = get_domain("countdown", difficulty=4)
    item4 = replace(item, difficulty=4, problem={"numbers": [6, 2, 4], "target": 5})
    assert d4.verify(item4, _answer_turn(item4, "(6 + 4) / 2")).reward == 1.0
    assert d4.verify(item4, _answer_turn(item4, "6 / 4 + 2")).reason == "inexact division"
    by_zero = d4.verify(item4, _answer_turn(item4, "6 / (4 - 4)"))
    assert by_zero.format_valid and not by_zero.correct


_PIECES = [EOS, THINK_END, THINK_START, USER, ASSISTANT, "<｜DSML｜tool_calls>", "\n\n",
           '<｜DSML｜invoke name="calculator">\n', "</｜DSML｜invoke>", "</｜DSML｜tool_calls>",
           '<｜DSML｜parameter name="expression" string="true">', "</｜DSML｜parameter>\n",
           "<tool_result>", "</tool_result>", "1 2 3", "(", ")", "*", "/ 0", " ", "9" * 40,
           "__import__('os')", "\ud800", "é"]
_garbage = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=12)), max_size=12).map("".join)


@pytest.mark.parametrize("name,options", [("strings", {}), ("arith", {"difficulty": 2}),
                                          ("countdown", {"difficulty": 4}),
                                          ("calculator", {}),
                                          ("calculator", {"thinking_mode": "thinking"})])
def test_no_verifier_raises_on_arbitrary_text(name, options):
    d = get_domain(name, **options)
    item = d.sample("train", 0)
    reference = item.reference_completion()

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_garbage, st.integers(0, len(reference)), st.integers(0, 3))
    def check(noise, at, mode):
        # pure noise; noise spliced into the reference; the reference truncated at `at`
        for text in (noise, reference[:at] + noise + reference[at:], reference[:at]):
            score = d.verify(item, text) if mode else safe_verify(d, item, text)
            assert score.error is None
            assert score.reward == (1.0 if score.correct and score.format_valid else 0.0)
            assert not (score.correct and not score.format_valid)

    check()
    assert not d.verify(item, None).format_valid  # not even a string


def test_safe_verify_scores_a_crashing_verifier_zero_and_summarize_counts():
    class Broken(AnswerDomain):
        name = "broken"
        draw = user_text = answer_text = None

        def grade(self, item, content):
            raise KeyError("bug")

    strings = get_domain("strings")
    item = strings.sample("train", 0)
    broken = Broken()
    crashed = safe_verify(broken, item, item.reference_completion())
    assert (crashed.reward, crashed.format_valid) == (0.0, False) and "KeyError" in crashed.error
    scores = [crashed, strings.verify(item, item.reference_completion()), strings.verify(item, "")]
    summary = summarize(scores)
    assert (summary.n, summary.correct, summary.format_invalid, summary.errors) == (3, 1, 2, 1)
    assert summary.mean_reward == pytest.approx(1 / 3)  # exact sum / 3, float rounding only


# ---- the tool domain ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_calculator_conversation_round_trips_through_encode_and_parse(mode):
    d = get_domain("calculator", difficulty=4, thinking_mode=mode)
    item = d.sample("test", 3)
    assert item.prompt_messages[0]["tools"] == d.tools and item.prompt_messages[-1]["role"] == "user"
    call_turn, tool_msg, answer_turn = item.conversation[-3:]
    turns = item.reference_completion().split(EOS)
    parsed = parse_message_from_completion_text(turns[0] + EOS, mode, strict=True)
    assert [c["function"] for c in parsed["tool_calls"]] == [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in call_turn["tool_calls"]]
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {
        "expression": item.problem["expression"]}
    assert tool_msg["content"] == str(evaluate(item.problem["expression"]).value)
    environment = encode_messages([tool_msg], mode, context=item.conversation[:-2])
    final_text = turns[1][len(environment):] + EOS
    assert parse_message_from_completion_text(final_text, mode)["content"] == answer_turn["content"]
    assert answer_turn["content"] == item.answer


def _transcript(d, item, calls_args, answer):
    """A rollout transcript: tool-call turns (each a list of argument dicts), then `answer`."""
    history, text = list(item.prompt_messages), ""
    for args in calls_args:
        calls = [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                 for n, a in args]
        msg = {"role": "assistant", "content": "", "tool_calls": calls}
        text += encode_messages([msg], item.thinking_mode, context=history)
        history.append(msg)
        results = [d.execute(c) for c in calls]
        text += encode_messages(results, item.thinking_mode, context=history)
        history += results
    return text + answer + EOS


def test_calculator_verifier_gates_on_the_tool_protocol():
    d = get_domain("calculator", difficulty=2)
    item = d.sample("train", 0)
    expr, value = item.problem["expression"], item.answer
    ok = _transcript(d, item, [[("calculator", {"expression": expr})]], value)
    assert ok == item.reference_completion() and d.verify(item, ok).reward == 1.0
    two = _transcript(d, item, [[("calculator", {"expression": "1 + 1"})],
                                [("calculator", {"expression": expr})]], value)
    assert d.verify(item, two).reward == 1.0  # a second try within max_tool_turns
    wrong = _transcript(d, item, [[("calculator", {"expression": expr})]], value + "1")
    assert (d.verify(item, wrong).format_valid, d.verify(item, wrong).correct) == (True, False)
    bad = {
        "no tool call": value + EOS,
        "unknown tool": _transcript(d, item, [[("python", {"expression": expr})]], value),
        "extra parameter": _transcript(d, item, [[("calculator", {"expression": expr, "x": 1})]],
                                       value),
        "forged result": ok.replace(f"<tool_result>{value}<", "<tool_result>7<").replace(
            f"</think>{value}{EOS}", f"</think>7{EOS}"),
        "ends on a call": ok[: ok.index(EOS) + len(EOS)],
        "cut off": cut(ok),
        "non-number answer": _transcript(d, item, [[("calculator", {"expression": expr})]], "x"),
        "too many turns": _transcript(d, item, [[("calculator", {"expression": expr})]] * 3, value),
    }
    for why, text in bad.items():
        score = d.verify(item, text)
        assert (score.reward, score.format_valid) == (0.0, False), (why, score)
    lenient = get_domain("calculator", difficulty=2, require_tool_call=False)
    assert lenient.verify(item, value + EOS).reward == 1.0


def test_calculator_executor_never_evaluates_code(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec/compile called")

    for fn in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, fn, forbidden)

    def run(expression, name="calculator", raw=None):
        args = raw if raw is not None else json.dumps({"expression": expression})
        return CalculatorDomain.execute({"id": "c1", "function": {"name": name, "arguments": args}})

    assert run("2 * (3 + 4)") == {"role": "tool", "content": "14", "tool_call_id": "c1"}
    assert run("7 / 2")["content"] == "7/2" and run("-3 - 4")["content"] == "-7"
    for hostile in ("__import__('os').system('true')", "2 ** 10", "1 / 0", "9" * 31, "(" * 40 + "1",
                    "x", "1 +", "", "1" + " + 1" * 100, "lambda: 0", "1 .real"):
        assert run(hostile)["content"].startswith("error:"), hostile
    assert run("1", name="os")["content"].startswith("error: unknown tool")
    assert run(None, raw="{not json")["content"].startswith("error:")
    assert run(None, raw='["1 + 1"]')["content"].startswith("error:")
    for junk in (None, 3, {"function": 5}, {"function": {"name": "calculator", "arguments": 5}}):
        assert CalculatorDomain.execute(junk)["content"].startswith("error:")
    # error text never echoes the model's text (it would land inside the prompt)
    assert "os" not in run("os")["content"] and EOS not in run("1", name=EOS)["content"]


def test_expression_evaluator():
    assert evaluate("1 + 2 * 3 - 4 / 2").value == 5
    ev = evaluate("(7 - 3) * 5")
    assert (ev.numbers, ev.operators, ev.inexact_division) == ((7, 3, 5), ("-", "*"), False)
    assert evaluate("7 / 2").inexact_division and evaluate("3 × 4 ÷ 6").value == 2
    with pytest.raises(ExprSyntaxError, match="unary minus"):
        evaluate("-1", allow_unary_minus=False)
    with pytest.raises(ExprSyntaxError, match="'²'"):
        evaluate("2²")
    with pytest.raises(ExprMathError):
        evaluate("1 / (2 - 2)")
    with pytest.raises(ExprMathError, match="beyond"):
        evaluate(" * ".join(["9" * 30] * 3))
    assert [parse_number(s) for s in ("12", " -3 ", "7/2", "2.5", "1/0", "1e3", "", "½")] == [
        12, -3, evaluate("7/2").value, evaluate("5/2").value, None, None, None, None]


# ---- lengths, SFT, CLI, reasoning-gym -----------------------------------------------------

def test_prompts_fit_a_small_context(tok):
    """Tiny preset: every prompt < 200 tokens and every conversation < 128 tokens (< 256 for the
    calculator with schema="brief": its DSML call markup costs about 130 tokens with this
    coarse tokenizer); the full V4 tools block is a constant prefix added to that."""
    for name, options in configs(thinking=("chat",)):
        d = get_domain(name, **options)
        if name == "calculator" and options.get("schema") != "brief":
            continue
        for item in d.generate("train", 10, seed=2):
            prompt = tok(item.prompt_text(), add_special_tokens=False)["input_ids"]
            ids, mask = tokenize_conversation(tok, item.conversation, item.thinking_mode)
            limit = 256 if name == "calculator" else 128
            assert len(prompt) < 200 and len(ids) < limit, (item.id, len(prompt), len(ids))
            assert sum(mask) > 0
    full, brief = (get_domain("calculator", difficulty=4, schema=s).sample("train", 0)
                   for s in ("full", "brief"))
    system = encode_messages(full.prompt_messages[:1], "chat")
    rest = full.prompt_text()[len(system):]
    assert len(tok(rest, add_special_tokens=False)["input_ids"]) < 200
    assert full.key == brief.key


def test_mixture_feeds_data_sft(tmp_path, tok):
    from data.config import SFTConfig, SourceConfig
    from data.sft import tokenize_sft_source

    spec = [("strings", 1.0), ("arith", 2.0, {"difficulty": 2}),
            ("calculator", 1.0, {"schema": "brief"})]
    records = mixture(spec, 20, seed=5)
    assert records == mixture(spec, 20, seed=5) and records != mixture(spec, 20, seed=6)
    counts = {n: sum(r["domain"] == n for r in records) for n in ("strings", "arith", "calculator")}
    assert counts == {"strings": 5, "arith": 10, "calculator": 5}
    with pytest.raises(ValueError, match="weight"):
        mixture([("strings", -1)], 4)
    with pytest.raises(ValueError, match="unknown domain"):
        mixture([("strings", 1.0), ("nope", 1.0)], 4)
    path = tmp_path / "mix.jsonl"
    write_sft_jsonl(records, path)
    cfg = SFTConfig(sources=[SourceConfig(str(path))], progress=False)
    shard = tokenize_sft_source(cfg.sources[0], tok, cfg, tmp_path / "cache")
    assert shard.n_docs == 20 and shard.meta["domains"] == counts
    assert 0 < int(shard.mask.sum()) < len(shard.mask)


def test_cli_list_and_show(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTIN) and "rg:<task>" in out
    assert cli_main(["show", "nope"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "data.domains", "show", "calculator", "--n", "3", "--difficulty",
         "2", "--split", "test"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("=== calculator/d2/test") == 3
    assert done.stdout.count("reward=1.0 correct=True format_valid=True") == 3
    assert "<｜DSML｜invoke name=\"calculator\">" in done.stdout


def test_reasoning_gym_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import` fail
    with pytest.raises(ImportError, match=r"pip install 'v4lab\[domains\]'"):
        get_domain("rg:spell_backward")
    with pytest.raises(ValueError, match="give a reasoning-gym task"):
        get_domain("rg:")


def test_reasoning_gym_adapter():
    pytest.importorskip("reasoning_gym")
    d = get_domain("rg:spell_backward")
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        get_domain("rg:no_such_task")
    with pytest.raises(ValueError, match="bad options"):
        get_domain("rg:spell_backward", min_word_len=0, max_word_len=-5)
    train, test = d.generate("train", 10, seed=1), d.generate("test", 10, seed=1)
    assert {i.key for i in train}.isdisjoint(i.key for i in test)
    assert d.generate("test", 10, seed=1) == test
    for item in train + test:
        assert d.verify(item, item.reference_completion()).reward == 1.0
        assert d.verify(item, _answer_turn(item, f"<answer>{item.answer}</answer>")).reward == 1.0
        wrong = d.verify(item, _answer_turn(item, WRONG["rg"]))
        assert (wrong.reward, wrong.format_valid) == (0.0, True)
        assert not d.verify(item, "").format_valid
    leveled = get_domain("rg:spell_backward", difficulty=2)
    assert leveled.verify(leveled.sample("train", 0), leveled.sample("train", 0)
                          .reference_completion()).reward == 1.0
