"""lm-evaluation-harness on a v4lab checkpoint (`train/lm_eval_adapter.py`): the adapter's
log-likelihoods equal v4lab's own forward on the same tokens (one unpadded sequence at a time
against right-padded batches: the same fp32 computation in other batch shapes, ~1e-6 on sums of
order 10-100, so 1e-3 absolute), and local lm-eval tasks (a YAML task file over a JSONL the test
writes: multiple choice and generate-until) run end to end through `train.evaluate`, with the
multiple-choice accuracy equal to the one computed from our own log-likelihoods."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from tests.train._rollout_support import micro_checkpoint, train_tokenizer  # noqa: E402
from train.evaluate import main as evaluate_main  # noqa: E402
from train.lm_eval_adapter import make_lm, run_tasks  # noqa: E402
from train.loading import load_model_and_tokenizer  # noqa: E402

QUESTIONS = [("the cat sat on the", ["mat", "dog", "far away"], 0),
             ("hello", ["world", "cat", "two three"], 1),
             ("one two", ["three", "hello world", "mat"], 2),
             ("the dog ran", ["far away", "on the mat", "hello"], 0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ckpt = micro_checkpoint(root, train_tokenizer(root / "tokenizer.json"))
    model, tok = load_model_and_tokenizer(str(ckpt), None, "cpu", "float32", None)
    return ckpt, model, tok


def own_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = [tok.bos_token_id] + tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont]), mtp=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_loglikelihoods_equal_our_forward(checkpoint):
    _, model, tok = checkpoint
    lm = make_lm(model, tok, batch_size=5)
    pairs = [(q, " " + c) for q, choices, _ in QUESTIONS for c in choices]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (context, cont), (lp, greedy) in zip(pairs, got):
        assert lp == pytest.approx(own_loglikelihood(model, tok, context, cont), abs=1e-3)
        assert isinstance(greedy, bool)
    whole = lm.loglikelihood_rolling([SimpleNamespace(args=("the cat sat on the mat",))])[0]
    ids = [tok.bos_token_id] + tok.encode("the cat sat on the mat", add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]), mtp=False).logits[0].float(), -1)
    assert whole == pytest.approx(sum(float(logp[i - 1, t]) for i, t in enumerate(ids) if i),
                                  abs=1e-3)
    texts = lm.generate_until([SimpleNamespace(args=("the cat", {"until": ["\n"],
                                                                  "max_gen_toks": 5}))])
    assert isinstance(texts[0], str) and "\n" not in texts[0]


def write_tasks(folder):
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": [" " + c for c in cs],
                                        "label": label}) + "\n" for q, cs, label in QUESTIONS))
    (folder / "mc.yaml").write_text(f"""task: v4lab_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: v4lab_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_local_tasks_end_to_end(checkpoint, tmp_path, capsys):
    ckpt, model, tok = checkpoint
    write_tasks(tmp_path)
    metrics = run_tasks(model, tok, ["v4lab_tiny_mc", "v4lab_tiny_gen"], str(tmp_path))
    want = sum(max(range(3), key=lambda j: own_loglikelihood(model, tok, q, " " + cs[j])) == label
               for q, cs, label in QUESTIONS) / len(QUESTIONS)
    assert metrics["v4lab_tiny_mc"]["acc,none"] == pytest.approx(want)
    assert 0 <= metrics["v4lab_tiny_gen"]["exact_match,none"] <= 1
    out = tmp_path / "results.json"
    assert evaluate_main([f"ckpt={ckpt}", "domains=[]", "lm_eval_tasks=[v4lab_tiny_mc]",
                          f"lm_eval_include={tmp_path}", f"out={out}", "dtype=float32"]) == 0
    assert "lm-eval v4lab_tiny_mc: sample_len 4, acc,none" in capsys.readouterr().out
    assert json.loads(out.read_text())["lm_eval"]["v4lab_tiny_mc"]["acc,none"] == \
        pytest.approx(want)
    assert evaluate_main([f"ckpt={ckpt}", "domains=[]", "lm_eval_tasks=[no_such_task]",
                          f"lm_eval_include={tmp_path}"]) == 2
    assert "unknown task(s) ['no_such_task']" in capsys.readouterr().err
