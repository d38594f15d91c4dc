"""load_tokenizer and tokenize_conversation: special tokens, ids, and the SFT loss mask."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from encoding import encode_messages, load_tokenizer, tokenize_conversation
from encoding.special_tokens import BOS, EOS, SPECIAL_TOKENS, THINK_END, THINK_START
from tests.encoding._support import CONFORMANCE_MODES, load_case, masked_runs, train_tokenizer_json

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def two_turns():
    return [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1 the weather"},
        {"role": "assistant", "reasoning_content": "R1 think", "content": "A1 sunny"},
        {"role": "user", "content": "Q2 Paris"},
        {"role": "assistant", "reasoning_content": "R2 reason", "content": "A2 capital"},
    ]


def check(tokenizer, messages, mode, expected_runs, **kw):
    ids, mask = tokenize_conversation(tokenizer, messages, mode, **kw)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert masked_runs(tokenizer, ids, mask) == expected_runs
    return ids, mask


# ---- load_tokenizer -------------------------------------------------------------------------


def test_bos_eos_pad_ids(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, EOS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)


def test_special_strings_are_never_split(tokenizer):
    for text in SPECIAL_TOKENS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, text
        assert text in tokenizer.all_special_tokens
    ids = tokenizer('x<｜DSML｜invoke name="f">', add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("｜DSML｜") in ids


def test_no_bos_is_added(tokenizer):
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id


def test_tokenizer_without_reserved_specials_gets_them_added(tmp_path):
    path = train_tokenizer_json(tmp_path / "tokenizer.json", reserve_special=False)
    base_size = len(json.loads(path.read_text())["model"]["vocab"])
    tokenizer = load_tokenizer(str(tmp_path))  # a directory works too
    for text in SPECIAL_TOKENS:
        (token_id,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert token_id >= base_size
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json


# ---- tokenize_conversation: ids -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_ids_equal_tokenizing_the_prompt(tokenizer, mode):
    ids, _ = tokenize_conversation(tokenizer, two_turns(), mode)
    text = encode_messages(two_turns(), mode)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[0] == 0


# ---- tokenize_conversation: the turn policy and mask alignment -------------------------------


def test_chat_mode_trains_every_turn(tokenizer):
    ids, mask = check(tokenizer, two_turns(), "chat", ["A1 sunny" + EOS, "A2 capital" + EOS])
    # The `</think>` of the generation prompt is prompt, not trained.
    think_end = tokenizer.convert_tokens_to_ids(THINK_END)
    assert all(bit == 0 for token, bit in zip(ids, mask) if token == think_end)


def test_thinking_mode_with_dropping_trains_the_last_turn(tokenizer):
    ids, mask = check(tokenizer, two_turns(), "thinking", ["R2 reason" + THINK_END + "A2 capital" + EOS])
    think_start = tokenizer.convert_tokens_to_ids(THINK_START)
    assert mask[ids.index(think_start)] == 0  # `<think>` opens the prompt's generation slot


def test_thinking_mode_without_dropping_trains_every_turn(tokenizer):
    check(
        tokenizer, two_turns(), "thinking",
        ["R1 think" + THINK_END + "A1 sunny" + EOS, "R2 reason" + THINK_END + "A2 capital" + EOS],
        drop_thinking=False,
    )


def test_tools_keep_reasoning_so_every_turn_is_trained(tokenizer):
    ids, _ = check(
        tokenizer, two_turns(), "thinking",
        ["R1 think" + THINK_END + "A1 sunny" + EOS, "R2 reason" + THINK_END + "A2 capital" + EOS],
        tools=TOOLS,
    )
    assert tokenizer.decode(ids).startswith(BOS + "S\n\n## Tools")


def test_tools_without_a_system_message_get_an_empty_one(tokenizer):
    ids, _ = tokenize_conversation(tokenizer, two_turns()[1:], "chat", tools=TOOLS)
    assert tokenizer.decode(ids).startswith(BOS + "\n\n## Tools\n")
    with pytest.raises(ValueError, match="tools given both"):
        messages = two_turns()
        messages[0]["tools"] = TOOLS
        tokenize_conversation(tokenizer, messages, "chat", tools=TOOLS)


def test_mask_key_overrides_the_policy(tokenizer):
    messages = two_turns()
    messages[2]["mask"] = 1  # force the earlier (reasoning-dropped) turn in
    messages[4]["mask"] = 0  # and exclude the last one
    check(tokenizer, messages, "thinking", ["A1 sunny" + EOS])


def test_tool_call_turn_mask_covers_the_dsml_block(tokenizer):
    call = {"type": "function", "function": {"name": "f", "arguments": '{"q": "Paris", "n": 2}'}}
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "reasoning_content": "R", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "result"},
        {"role": "assistant", "reasoning_content": "R2", "content": "done"},
    ]
    full = encode_messages(messages, "thinking", drop_thinking=False)
    block_start = full.index(THINK_START) + len(THINK_START)
    first_turn = full[block_start : full.index(EOS) + len(EOS)]
    assert "｜DSML｜tool_calls" in first_turn
    check(tokenizer, messages, "thinking", [first_turn, "R2" + THINK_END + "done" + EOS], drop_thinking=False)


def test_task_output_is_trained_and_task_token_is_not(tokenizer):
    messages = [
        {"role": "user", "content": "Q", "task": "action"},
        {"role": "assistant", "content": "Search"},
    ]
    ids, mask = check(tokenizer, messages, "thinking", ["Search" + EOS])
    action = tokenizer.convert_tokens_to_ids("<｜action｜>")
    assert mask[ids.index(action)] == 0


def test_wo_eos_turn_has_no_eos(tokenizer):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "partial", "wo_eos": True}]
    ids, _ = check(tokenizer, messages, "chat", ["partial"])
    assert ids[-1] != tokenizer.eos_token_id


def test_assistant_right_after_a_reminder_starts_a_fresh_token(tokenizer):
    """No special token separates reminder text from the reply; the mask still starts exactly."""
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "latest_reminder", "content": "the weather"},
        {"role": "assistant", "content": " weather sunny"},
    ]
    check(tokenizer, messages, "chat", [" weather sunny" + EOS])


@pytest.mark.parametrize("case", sorted(CONFORMANCE_MODES))
def test_official_cases_tokenize_to_the_expected_text(tokenizer, conformance_encoding_dir, case):
    messages, expected = load_case(conformance_encoding_dir, case)
    ids, mask = tokenize_conversation(tokenizer, messages, CONFORMANCE_MODES[case])
    assert tokenizer.decode(ids) == expected
    assert sum(mask) > 0
    for run in masked_runs(tokenizer, ids, mask):
        assert run in expected and run.endswith(EOS)
