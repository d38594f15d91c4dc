"""`vf:` domains: an environment written for `verifiers` (tests/helpers/vf_adder.py) as a v4lab
domain. Items split deterministically with the environment's tools on the system message; its
toolset answers DSML tool calls; its own rubric scores hand-made transcripts (right, wrong,
malformed, forged); the rollout loop runs the tool turn through it; unsupported environments
and SFT are refused before any work. The GRPO run over it is in tests/rl/test_grpo_e2e.py."""

from __future__ import annotations

import pytest

pytest.importorskip("verifiers.v1")

from data.domains import get_domain, safe_verify  # noqa: E402
from data.domains.spec import build_domains  # noqa: E402
from encoding import encode_messages  # noqa: E402
from tests.train._rollout_support import domain_tokenizer, domain_tokenizer_file  # noqa: E402,F401

ADDER = "vf:tests.helpers.vf_adder"


@pytest.fixture(scope="module")
def adder():
    return get_domain(ADDER)


def transcript(item, calls=(("2", "3"),), results=None, answer="5") -> str:
    """The completion after `item`'s prompt: one assistant turn per tool call (with its result
    inserted as the environment does), then the final answer."""
    conversation = list(item.prompt_messages)
    for k, (a, b) in enumerate(calls):
        conversation.append({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add",
                                              "arguments": f'{{"a": {a}, "b": {b}}}'}}]})
        result = str(int(a) + int(b)) if results is None else results[k]
        conversation.append({"role": "tool", "content": result})
    conversation.append({"role": "assistant", "content": answer})
    full = encode_messages(conversation, item.thinking_mode)
    return full[len(item.prompt_text()):]


def test_items_split_deterministically_with_the_environment_tools(adder):
    again = get_domain(ADDER)
    assert [r["key"] for r in adder.rows["test"]] == [r["key"] for r in again.rows["test"]]
    keys = {s: {r["key"] for r in adder.rows[s]} for s in ("train", "test")}
    assert keys["train"] and keys["test"] and not keys["train"] & keys["test"]
    assert len(keys["train"]) + len(keys["test"]) == 24
    item = adder.sample("test", 3, seed=1)
    assert item == again.sample("test", 3, seed=1)
    assert [d.problem["key"] for d in adder.distinct("test", 99)] == \
        [again.sample("test", i).problem["key"] for i in range(len(keys["test"]))]
    system, user = item.prompt_messages
    assert [t["function"]["name"] for t in system["tools"]] == ["hint", "add"]
    assert system["tools"][1]["function"]["parameters"]["required"] == ["a", "b"]
    assert user == {"role": "user", "content": adder.tasks[item.problem["key"]].data.prompt}
    assert "## Tools" in item.prompt_text()


def test_the_toolset_answers_calls_and_errors_are_results(adder):
    item = adder.sample("train", 0)
    calls = [{"function": {"name": "add", "arguments": '{"a": 2, "b": 40}'}, "id": "c1"},
             {"function": {"name": "mul", "arguments": "{}"}},
             {"function": {"name": "add", "arguments": '{"a": "x"}'}},
             {"function": {"name": "add", "arguments": "not json"}}]
    from tests.helpers.vf_adder import HintTools

    setups = HintTools.setups
    out = adder.run_tool_calls({"tool_calls": calls}, item=item)
    assert out[0] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    hint = {"tool_calls": [{"function": {"name": "hint", "arguments": "{}"}}]}
    for other in adder.generate("test", 3):  # the shared toolset answers every task...
        assert adder.run_tool_calls(hint, item=other)[0]["content"] == "add the two numbers"
    assert HintTools.setups == setups  # ...set up once, when the domain was built
    assert [m["content"].split(":")[0] for m in out[1:]] == ["error"] * 3
    assert "Unknown tool: mul" in out[1]["content"]


def test_the_environment_rubric_scores_transcripts(adder):
    item = adder.sample("test", 0)
    task = adder.tasks[item.problem["key"]]
    a, b = task.data.prompt.split("What is ")[1].split("?")[0].split(" + ")
    right = str(task.data.answer)
    cases = {
        "right": (transcript(item, [(a, b)], answer=right), 1.0, True),
        "wrong answer": (transcript(item, [(a, b)], answer="7"), 0.5, False),
        "no tool call": (transcript(item, [], answer=right), 0.5, False),
        "two tool calls": (transcript(item, [(a, b), (b, a)], answer=right), 1.0, True),
    }
    for name, (text, reward, correct) in cases.items():
        score = safe_verify(adder, item, text)
        assert (score.reward, score.correct, score.error) == (reward, correct, None), name
    invalid = {
        "cut off": transcript(item, [(a, b)], answer=right)[:-5],
        "ends on a tool call": transcript(item, [(a, b)])[: transcript(item, [(a, b)]).rfind(
            "<｜Assistant｜>")],
        "not text": None,
        "garbage": "<｜User｜><tool_result>5</tool_result>",
        "result missing": transcript(item, [(a, b)], results=[""]).replace(
            "<tool_result></tool_result>", ""),
    }
    for name, text in invalid.items():
        score = safe_verify(adder, item, text)
        assert score.reward == 0 and not score.format_valid and score.error is None, name


def test_rollout_runs_the_tool_turn_through_the_environment(adder, domain_tokenizer):  # noqa: F811
    """The rollout loop with a scripted policy that writes the right transcript: the tool
    result it inserts is the environment's, masked out of the loss, and the rubric pays 1."""
    from tests.train._rollout_support import Oracle, stub_model
    from train.rollout import RolloutParams, rollout

    items = adder.generate("test", 2, seed=0)
    refs = []
    for it in items:
        task = adder.tasks[it.problem["key"]]
        a, b = task.data.prompt.split("What is ")[1].split("?")[0].split(" + ")
        refs.append(_Reference(it, transcript(it, [(a, b)], answer=str(task.data.answer))))
    result = rollout(stub_model(), domain_tokenizer, [(adder, it) for it in items],
                     RolloutParams(temperature=0.0, max_new_tokens=200, n=2, batch_size=4),
                     generate_fn=Oracle(domain_tokenizer, refs))
    assert len(result.samples) == 4
    for s in result.samples:
        assert s.finish == "eos" and s.tool_turns == 1 and s.error is None
        assert s.score.reward == 1.0 and s.score.correct
        assert s.text == refs[s.request].completion
        assert 0 in s.loss_mask


class _Reference:
    """An item with a scripted reference completion, for `Oracle`."""

    def __init__(self, item, completion):
        self.item, self.completion = item, completion

    def prompt_text(self):
        return self.item.prompt_text()

    def reference_completion(self):
        return self.completion


def test_unsupported_environments_and_sft_are_refused():
    with pytest.raises(ValueError, match="vf:tests.helpers.vf_judged: task 0 .*needs a "
                                         "container"):
        build_domains(["vf:tests.helpers.vf_judged"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="grpo.domains: vf:no_such_env: cannot load"):
        build_domains(["vf:no_such_env"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="limit=0"):
        build_domains([f"{ADDER}?limit=0"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="test_fraction=1.5: out of range"):
        build_domains([f"{ADDER}?test_fraction=1.5"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="bad options"):
        build_domains([f"{ADDER}?colour=red"], {}, "chat", "grpo")
    with pytest.raises(ValueError, match="'test' split has no tasks"):
        build_domains([f"{ADDER}?limit=1"], {}, "chat", "grpo")
    from train.config import SFTSection
    from train.sft_task import build_domains as sft_domains

    with pytest.raises(ValueError, match="sft.domains: 'vf:tests.helpers.vf_adder' has no "
                                         "reference answers"):
        sft_domains(SFTSection(domains=[ADDER]))
