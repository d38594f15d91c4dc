"""Tokenizer side of the chat format: loading `tokenizer.json`, and SFT ids plus loss mask.

The prompt string from `encode_messages` is only useful if the tokenizer keeps every DSV4 special
string as one token (a split `<｜User｜>` is just text to the model) and never adds a BOS of its
own (the encoder already wrote it). `load_tokenizer` guarantees both for the released tokenizer
and for the ones the data pipeline trains (which reserve BOS id 0 and EOS id 1).

SFT turn policy of `tokenize_conversation` (which assistant turns get loss mask 1). A turn is
trained when its rendered text is exactly what the model produced at that point, so training
never teaches the model to write something it would not write at inference:
- chat mode: every assistant turn;
- thinking mode with reasoning kept (`drop_thinking=False`, or tools present): every turn;
- thinking mode with earlier reasoning dropped (the default without tools): only the turns after
  the last user/developer message. Earlier turns are rendered without their reasoning, which
  the model never produced that way, so they are context only. To train every turn of such a
  conversation, emit one sample per turn (the conversation cut after each assistant turn);
- a task output (the assistant turn after a message with `task`) is always trained: it never
  has reasoning.
A per-message `mask` key (carried by the released format, undocumented there) overrides this:
`mask: 0`/False excludes the turn, `mask: 1`/True trains it even if the policy would not.
Within a trained turn, mask 1 covers exactly what the assistant wrote: the reasoning and its
`</think>` when rendered, the content, the tool-call block and the EOS, never the
`<｜Assistant｜>`/`<think>` prefix in front of it nor a task token after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from encoding.chat_template import CHAT_TEMPLATE
from encoding.encode import Segment, encode_segments
from encoding.special_tokens import BOS, EOS, SPECIAL_TOKENS


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a `tokenizer.json` (or a directory holding one) with the DSV4 special tokens.

    Every string of `SPECIAL_TOKENS` is registered as a special token that is never split (a
    string the file lacks gets a new id at the end of the vocabulary); BOS/EOS are the DSV4 ones
    and pad is EOS. `chat_template` is set to the `CHAT_TEMPLATE` bridge. Encode prompts with
    `add_special_tokens=False`: the prompt string already starts with BOS.
    """
    given = Path(path)
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(file)!r} (from path {str(path)!r})")
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(file),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            clean_up_tokenization_spaces=False,
        )
    except Exception as e:  # the tokenizers library's parse errors name no file
        raise ValueError(f"{file}: unreadable tokenizer file ({type(e).__name__}: {e})") from None
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False)
                for s in SPECIAL_TOKENS
            ]
        }
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def visible_text(tokenizer, ids: Sequence[int]) -> str:
    """Decoded text with BOS/EOS removed but the other special tokens (`</think>`, tool-call
    markers) kept, so a thinking-mode reply shows where its reasoning ends (and a parser can
    still read the tool calls)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    for special in (tokenizer.bos_token, tokenizer.eos_token):
        if special:
            text = text.replace(special, "")
    return text


def _with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict]:
    """Attach `tools` to the first message, as the official test inputs do.

    Tools render only on a system/developer message, so without one an empty system message is
    put in front (its text is empty, the tools block follows BOS after a blank line).
    """
    out = list(messages)
    if not tools:
        return out
    if out and isinstance(out[0], Mapping) and out[0].get("role") in ("system", "developer"):
        out[0] = dict(out[0])
        if out[0].get("tools"):
            raise ValueError("messages[0].tools: tools given both here and as the tools argument")
        out[0]["tools"] = list(tools)
    else:
        out.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return out


def _trained(segment: Segment, messages: Sequence[Mapping[str, Any]]) -> bool:
    if not segment.generated:
        return False
    message = messages[segment.origin]
    if "mask" in message and message["mask"] is not None:
        return bool(message["mask"])
    return segment.faithful


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerFast,
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the encoded conversation and a loss mask of the same length.

    The mask is 1 exactly on the tokens the assistant produced in trained turns (see the module
    docstring for the policy). Each assistant turn is tokenized separately from the prompt text
    around it, as at inference, where generation starts a fresh token at the prompt boundary;
    boundaries are special tokens in practice, so the ids equal those of the whole string.
    """
    messages = _with_tools(messages, tools)
    segments = encode_segments(
        messages, thinking_mode, drop_thinking=drop_thinking, reasoning_effort=reasoning_effort
    )
    # Merge neighbouring segments of the same kind (prompt / one assistant turn) into chunks.
    chunks: list[tuple[str, bool]] = []
    previous_key = None
    for segment in segments:
        key = (segment.generated, segment.origin if segment.generated else None)
        if chunks and key == previous_key:
            chunks[-1] = (chunks[-1][0] + segment.text, chunks[-1][1])
        else:
            chunks.append((segment.text, _trained(segment, messages)))
        previous_key = key
    chunks = [(text, trained) for text, trained in chunks if text]
    encoded = tokenizer([text for text, _ in chunks], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for ids, (_, trained) in zip(encoded, chunks):
        input_ids.extend(ids)
        loss_mask.extend([int(trained)] * len(ids))
    return input_ids, loss_mask
