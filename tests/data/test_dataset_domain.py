"""Dataset-backed domains (`data:<source>`, data/domains/dataset.py): rows parsed and split
deterministically from JSONL, Parquet and `save_to_disk` alike; the exact and math verifiers on
hand-made right, wrong, malformed and adversarial replies; SFT records carry the solution; bad
input is one error naming file, line or field, or a counted skip."""

from __future__ import annotations

import json

import pytest

from data.domains import get_domain, safe_verify
from data.domains.dataset import code_block, final_answer
from data.domains.spec import build_domains

EOS = "<｜end▁of▁sentence｜>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_rows(n=60):
    return [{"question": f"Reduce {2 * i}/{2 * i + 4}.", "answer": f"\\frac{{{i}}}{{{i + 2}}}",
             "solution": f"Divide by 2: \\boxed{{\\frac{{{i}}}{{{i + 2}}}}}"}
            for i in range(1, n + 1)]


@pytest.fixture
def math_file(tmp_path):
    return write_jsonl(tmp_path / "math.jsonl", math_rows())


def items(domain, split, n=100):
    return [(it.key, it.answer) for it in domain.distinct(split, n)]


def test_splits_are_deterministic_disjoint_and_the_same_from_every_format(math_file, tmp_path):
    import datasets

    a = get_domain(f"data:{math_file}")
    b = get_domain(f"data:{math_file}")
    assert items(a, "train") == items(b, "train") and items(a, "test") == items(b, "test")
    assert {k for k, _ in items(a, "train")}.isdisjoint(k for k, _ in items(a, "test"))
    assert len(items(a, "train")) + len(items(a, "test")) == 60
    assert a.sample("train", 3, seed=1).key == b.sample("train", 3, seed=1).key
    table = datasets.Dataset.from_list(math_rows())
    table.to_parquet(str(tmp_path / "math.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "math.parquet", tmp_path / "saved"):
        other = get_domain(f"data:{source}")
        assert sorted(items(other, "test")) == sorted(items(a, "test"))
    # a split of its own for the test items
    datasets.DatasetDict({"train": table.select(range(40)), "test": table.select(range(40, 60))}
                         ).save_to_disk(str(tmp_path / "dd"))
    own = get_domain(f"data:{tmp_path / 'dd'}", test_split="test")
    assert len(own.rows["test"]) == 20 and len(own.rows["train"]) == 40


def test_exact_verifier_and_sft_record(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"prompt": f"Capital of country {i}?", "answer": f"City {i}",
         "solution": f"It is City {i}."} for i in range(30)])
    d = get_domain(f"data:{path}", system="Answer briefly.")
    item = d.sample("train", 0)
    assert item.prompt_messages[0] == {"role": "system", "content": "Answer briefly."}
    assert item.to_sft_record()["messages"][-1]["content"].startswith("It is City")
    city = item.answer
    cases = {f"{city}{EOS}": 1.0, f"  {city.lower()}.{EOS}": 1.0,
             f"Let me think.\nThe answer:\n{city}{EOS}": 1.0,   # the last line
             f"\\boxed{{{city}}} no wait \\boxed{{City 999}}{EOS}": 0.0,  # the last box counts
             f"City 999{EOS}": 0.0}
    for reply, reward in cases.items():
        assert safe_verify(d, item, reply).reward == reward, reply
    malformed = safe_verify(d, item, city)  # no EOS: cut off
    assert malformed.reward == 0 and not malformed.format_valid


def test_math_verifier_reads_answers_as_mathematicians_do(tmp_path):
    pytest.importorskip("math_verify")
    rows = [{"problem": "p1", "answer": "\\frac{3}{4}"}, {"problem": "p2", "answer": "0.5"},
            {"problem": "p3", "answer": "[1, 2)"}, {"problem": "p4", "answer": "x^2 + 2x + 1"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows * 5)
    d = get_domain(f"data:{path}", verifier="math", test_fraction=0.5)
    by_prompt = {it.problem["prompt"]: it for s in ("train", "test")
                 for it in d.distinct(s, 10)}
    assert len(by_prompt) == 4
    right = {"p1": "so \\boxed{0.75}", "p2": "The answer is $\\frac{1}{2}$",
             "p3": "\\boxed{[1,2)}", "p4": "\\boxed{(x+1)^2}"}
    wrong = {"p1": "\\boxed{3/5}", "p2": "\\boxed{0.55}", "p3": "\\boxed{(1, 2]}",
             "p4": "\\boxed{(x-1)^2}"}
    for p, item in by_prompt.items():
        assert safe_verify(d, item, right[p] + EOS).reward == 1.0, p
        assert safe_verify(d, item, wrong[p] + EOS).reward == 0.0, p
        assert safe_verify(d, item, "I don't know" + EOS).reward == 0.0
        assert safe_verify(d, item, right[p]).format_valid is False  # no EOS


def test_bad_input_is_one_clear_error_or_a_counted_skip(tmp_path, math_file, capsys):
    with pytest.raises(ValueError, match=r"no answer column 'final'.*\['answer', 'question'"):
        get_domain(f"data:{math_file}", answer="final")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(math_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        get_domain(f"data:{broken}")
    with pytest.raises(ValueError, match="no such file"):
        get_domain(f"data:{tmp_path / 'missing.jsonl'}")
    rows = math_rows(30) + [{"question": "q", "answer": ""}, {"question": "", "answer": "1"}]
    if pytest.importorskip("math_verify"):
        rows.append({"question": "odd", "answer": "\\frac{"})
    d = get_domain(f"data:{write_jsonl(tmp_path / 'some.jsonl', rows)}", verifier="math")
    assert len(d.skipped) == 3 and "line 31: field 'answer' is empty" in d.skipped[0]
    assert "line 32: field 'question' is empty" in d.skipped[1]
    assert "line 33: field 'answer': math_verify cannot read" in d.skipped[2]
    assert "skipped 3 row(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'test' split has no usable rows"):
        get_domain(f"data:{write_jsonl(tmp_path / 'one.jsonl', math_rows(1))}")
    with pytest.raises(ValueError, match="grpo.domains: data:.*no such file"):
        build_domains([f"data:{tmp_path / 'nope.jsonl'}"], {}, "chat", "grpo")


def test_options_inline_in_the_entry(math_file):
    (domain, weight), = build_domains([f"data:{math_file}?verifier=exact&test_fraction=0.5"
                                       f"&system=Be%20brief:3"], {}, "chat", "grpo")
    assert weight == 3 and domain.verifier == "exact" and domain.test_fraction == 0.5
    assert domain.sample("train", 0).prompt_messages[0]["content"] == "Be brief"
    with pytest.raises(ValueError, match="verifier='magic'"):
        build_domains([f"data:{math_file}?verifier=magic"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="bad options"):
        build_domains([f"data:{math_file}?colour=red"], {}, "chat", "grpo")


def test_unreachable_dataset_name_is_an_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/problems' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="someone/problems: cannot load it.*offline"):
        get_domain("data:someone/problems")


def test_answer_and_code_extraction():
    assert final_answer("x \\boxed{\\frac{1}{2}} and \\boxed{a{b}c}") == "a{b}c"
    assert final_answer("one\n\n two \n") == "two"
    assert code_block("text\n```python\nx = 1\n```\nmore\n```\ny = 2\n```") == "y = 2\n"
    assert code_block("def f(): pass") == "def f(): pass"
