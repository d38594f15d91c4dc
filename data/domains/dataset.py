"""Dataset-backed domains: your own problems as a verifiable domain, `data:<source>`.

    grpo.domains=[data:problems.jsonl]        # or .json / .parquet / .csv, a `save_to_disk`
                                              # folder, or a name `datasets.load_dataset` takes
    "grpo.domains=['data:problems.jsonl?prompt=question&verifier=math']"   # options inline
    grpo.domain_options: {"data:problems.jsonl": {verifier: math}}       # or in a YAML file

The same entry works for SFT (the reference reply is the `solution` column where a row has
one, else the answer), GRPO, distillation, evaluation and the recipe. Options:

- `prompt`, `answer`, `solution`, `tests`, `setup`: column names (defaults: `prompt` or
  `question` or `problem`; `answer`; `solution`; `tests`; `setup`);
- `split`: the dataset split to read (default `train`); `test_split`: a split holding the test
  items (default: none, and each row's split is a hash of its prompt, `test_fraction` = 0.1 of
  them test, disjoint by construction like every domain's);
- `verifier`: `exact` (the answer after `</think>`, or its last `\\boxed{}`, or its last line,
  compared after normalising spaces and case; the default), `math` (`math_verify`: fractions,
  decimals, expressions, intervals; the optional extra `pip install 'v4lab[math]'`) or `code`
  (the reply's last fenced code block, or the whole reply, run against the row's `tests` in
  `data.domains.sandbox`; `reward` = `all` (1 only if every test passes) or `fraction`);
- `instruction`: the user turn, a format string over the row's columns (default
  `"{prompt}"`); `system`: an optional system message; `cpu_seconds`, `wall_seconds`,
  `memory_mb`: sandbox limits for `code`.

Rows are checked when the domain is built, before any training step: a missing column (the
error names the file and lists the columns there), an empty split, or a source that cannot be
read is one error; a row with an empty prompt or answer, or (`code`) without tests, or
(`math`) with an answer `math_verify` cannot read, is skipped and counted (`skipped`, the
first few named by file, line and field, printed once to stderr).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Mapping

from data.domains.base import SPLITS, AnswerDomain, IndexedRows, Item, Score, split_of
from data.optional import require

PREFIX = "data:"
VERIFIERS = ("exact", "math", "code")
PROMPT_COLUMNS = ("prompt", "question", "problem")


def inline_options(spec: str) -> tuple[str, dict[str, Any]]:
    """"problems.jsonl?verifier=math&test_fraction=0.2" -> ("problems.jsonl", {"verifier":
    "math", "test_fraction": 0.2}): options in the domain entry itself, since a Hydra override
    cannot name a `domain_options` key that holds a path. Numbers, true/false and none are
    typed."""
    from urllib.parse import parse_qsl

    source, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        lowered = value.lower()
        if lowered in ("true", "false", "none", "null"):
            options[key] = {"true": True, "false": False}.get(lowered)
            continue
        for kind in (int, float):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return source, options


def load_table(source: str, split: str) -> list[dict[str, Any]]:
    """The rows of `split` of `source` through `datasets` (file, folder or hub name)."""
    import datasets

    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if os.path.isdir(source):
            table = datasets.load_from_disk(source)
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise ValueError(f"no split {split!r} (it has {sorted(table)})")
                table = table[split]
        elif os.path.splitext(source)[1] in kinds:
            if not os.path.isfile(source):
                raise ValueError("no such file")
            _check_json_lines(source)
            table = datasets.load_dataset(kinds[os.path.splitext(source)[1]],
                                          data_files=source, split="train")
        else:
            table = datasets.load_dataset(source, split=split)
    except ValueError as error:
        raise ValueError(f"{PREFIX}{source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - offline hub, a broken file: one clear line
        raise ValueError(f"{PREFIX}{source}: cannot load it ({type(error).__name__}: "
                         f"{str(error)[:300]}); offline, give a local .jsonl/.parquet file or "
                         f"a save_to_disk folder") from None
    return table.to_list()


def _check_json_lines(path: str) -> None:
    """A malformed JSON Lines file is named by line before `datasets` reports it obscurely."""
    if not path.endswith(".jsonl"):
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        raise ValueError("not an object")
                except ValueError as error:
                    raise ValueError(f"line {number}: not a JSON object ({error})") from None


class DatasetDomain(IndexedRows, AnswerDomain):
    """Rows of a table as items (see the module docstring)."""

    levels = (None,)
    parallel_verify = False  # True with verifier=code: rollouts score its samples in parallel

    def __init__(self, source: str, difficulty: int | None = None, thinking_mode: str = "chat",
                 prompt: str | None = None, answer: str = "answer", solution: str = "solution",
                 tests: str = "tests", setup: str = "setup", split: str = "train",
                 test_split: str | None = None, test_fraction: float = 0.1,
                 verifier: str = "exact", reward: str = "all", instruction: str = "{prompt}",
                 system: str | None = None, cpu_seconds: float = 5.0,
                 wall_seconds: float = 10.0, memory_mb: int = 1024) -> None:
        self.name = f"{PREFIX}{source}"
        super().__init__(difficulty, thinking_mode)
        if verifier not in VERIFIERS:
            raise ValueError(f"{self.name}: verifier={verifier!r}: choose one of {VERIFIERS}")
        if reward not in ("all", "fraction"):
            raise ValueError(f"{self.name}: reward={reward!r}: choose all or fraction")
        self.source, self.verifier, self.reward = source, verifier, reward
        self.parallel_verify = verifier == "code"  # each sample runs in its own process
        self.instruction, self.system, self.test_fraction = instruction, system, test_fraction
        from data.domains.sandbox import Limits

        self.limits = Limits(cpu_seconds, wall_seconds, memory_mb)
        if verifier == "math":
            _math_verify()
        rows = load_table(source, split)
        self.columns = self._columns(rows, prompt, answer, solution, tests, setup)
        self.skipped: list[str] = []
        self.rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for number, row in enumerate(rows, 1):  # without a test split: hashed into two
            self._add(row, number, "hash" if test_split is None else "train")
        if test_split is not None:
            for number, row in enumerate(load_table(source, test_split), 1):
                self._add(row, number, "test", test_split)
        self._report_skips()
        for s in SPLITS:
            if not self.rows[s]:
                raise ValueError(f"{self.name}: the {s!r} split has no usable rows "
                                 f"({len(self.skipped)} skipped)")

    def _columns(self, rows, prompt, answer, solution, tests, setup) -> dict[str, str | None]:
        have = set(rows[0]) if rows else set()
        if not rows:
            raise ValueError(f"{self.name}: no rows")
        picked = prompt or next((c for c in PROMPT_COLUMNS if c in have), PROMPT_COLUMNS[0])
        need = {"prompt": picked}
        if self.verifier == "code":
            need["tests"] = tests
        else:
            need["answer"] = answer
        for role, column in need.items():
            if column not in have:
                raise ValueError(f"{self.name}: no {role} column {column!r} (columns: "
                                 f"{sorted(have)}); name it with the `{role}` option")
        return {"prompt": picked, "answer": answer if answer in have else None,
                "solution": solution if solution in have else None,
                "tests": tests if tests in have else None,
                "setup": setup if setup in have else None}

    def _add(self, row: Mapping[str, Any], number: int, split: str, table: str = "") -> None:
        where = f"{self.source}{':' + table if table else ''} line {number}"
        c = self.columns
        text = row.get(c["prompt"])
        if not isinstance(text, str) or not text.strip():
            self.skipped.append(f"{where}: field {c['prompt']!r} is empty")
            return
        problem = {"prompt": text, "answer": _text(row.get(c["answer"])) if c["answer"] else "",
                   "solution": _text(row.get(c["solution"])) if c["solution"] else "",
                   "tests": _tests(row.get(c["tests"])) if c["tests"] else [],
                   "setup": _text(row.get(c["setup"])) if c["setup"] else "",
                   "row": {k: v for k, v in row.items() if isinstance(v, (str, int, float))}}
        problem["line"] = where
        why = self._unusable(problem)
        if why:
            self.skipped.append(f"{where}: {why}")
            return
        # the split hashes the prompt alone (not the path): a file and its Parquet copy agree
        if split == "hash":
            split = split_of(PREFIX, text, self.test_fraction)
        self.rows[split].append(problem)

    def _unusable(self, problem: dict[str, Any]) -> str:
        if self.verifier == "code":
            return "" if problem["tests"] else f"field {self.columns['tests']!r}: no tests"
        if not problem["answer"].strip():
            return f"field {self.columns['answer']!r} is empty"
        if self.verifier == "math" and not _gold(problem["answer"]):
            return f"field {self.columns['answer']!r}: math_verify cannot read " \
                   f"{problem['answer'][:60]!r}"
        return ""

    def _report_skips(self) -> None:
        if self.skipped:
            shown = "; ".join(self.skipped[:3])
            sys.stderr.write(f"warning: {self.name}: skipped {len(self.skipped)} row(s): "
                             f"{shown}{' ...' if len(self.skipped) > 3 else ''}\n")

    # ---- items ---------------------------------------------------------------------------
    def item_key(self, problem: Mapping[str, Any]) -> str:
        return problem["prompt"]

    def user_text(self, problem: Mapping[str, Any]) -> str:
        try:
            return self.instruction.format(**{**problem["row"], "prompt": problem["prompt"]})
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{self.name}: instruction={self.instruction!r}: {error}") from None

    def render(self, problem: Mapping[str, Any]):
        messages = self.user_messages(self.user_text(problem), self.system)
        reply = problem["solution"] or problem["answer"]
        return messages, [self.assistant(reply)], problem["answer"]

    def answer_text(self, problem: Mapping[str, Any]) -> str:
        return problem["answer"]

    # ---- verification --------------------------------------------------------------------
    def grade(self, item: Item, content: str) -> Score:
        if self.verifier == "code":
            return self._grade_code(item, content)
        if self.verifier == "math":
            return _grade_math(item.answer, content)
        got = final_answer(content)
        return Score.graded(_normal(got) == _normal(final_answer(item.answer)),
                            f"answer {got[:60]!r}")

    def _grade_code(self, item: Item, content: str) -> Score:
        from data.domains.sandbox import run_tests

        code = code_block(content)
        if not code.strip():
            return Score.invalid("no code in the reply")
        result = run_tests(code, item.problem["tests"], self.limits, item.problem["setup"])
        if self.reward == "fraction":
            return Score.partial(result.passed / result.total, result.reason)
        return Score.graded(result.all_passed, f"{result.passed}/{result.total}: "
                                               f"{result.reason}")


def final_answer(text: str) -> str:
    """The last `\\boxed{...}` (balanced braces) in `text`, else its last non-empty line."""
    start = text.rfind("\\boxed{")
    if start != -1:
        depth, i = 0, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth < 0:
                return text[i:j].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def code_block(text: str) -> str:
    """The last fenced code block of a reply (```python ... ``` or ``` ... ```), else all of it."""
    blocks = re.findall(r"```[a-zA-Z0-9_+-]*\n(.*?)```", text, flags=re.S)
    return blocks[-1] if blocks else text


def _normal(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _tests(value: Any) -> list[str]:
    """A list of test snippets, or one test program (a string) as a single test."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(t) for t in value if str(t).strip()]
    return []


def _math_verify():
    math_verify = require("math_verify", "verifier=math", "math", "math-verify>=0.7")
    import logging  # it warns on every call that its own timeout is off (ours applies)

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _math_parse(text: str) -> list:
    # math_verify's own timeouts use SIGALRM, which `train.verify.time_limit` owns: off here
    return _math_verify().parse(text, parsing_timeout=None)


def _gold(answer: str) -> list:
    """A reference answer as math_verify reads it (bare text read as one LaTeX expression);
    [] when it finds no mathematical object (only its text fallback)."""
    parsed = _math_parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    return parsed if any(not isinstance(x, str) for x in parsed) else []


def _grade_math(answer: str, content: str) -> Score:
    mv = _math_verify()
    gold = _gold(answer)
    got = _math_parse(content)
    if not got:
        return Score.invalid("no answer math_verify can read")
    return Score.graded(bool(mv.verify(gold, got, timeout_seconds=None)),
                        f"answer {str(got[-1])[:60]!r}")
