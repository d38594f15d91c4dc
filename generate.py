"""Sample from a checkpoint with the training model (`model.generation.generate`).

    python generate.py ckpt=PATH prompt="Once upon a time" [max_new_tokens=256 temperature=0.6
                       top_p=1.0 top_k=0 seed=0]
    python generate.py ckpt=PATH input_file=prompts.txt     # prompts separated by blank lines
    python generate.py ckpt=PATH interactive=true [mode=thinking reasoning_effort=max]
    python generate.py ckpt=PATH serve=true [port=8000 host=127.0.0.1 max_batch=32
                       served_model_name=NAME]    # OpenAI-compatible server (serve/)

PATH is a weights directory (config.json + *.safetensors: `save_pretrained`, an export, a
release) or a training checkpoint `runs/x/checkpoints/step_N`, whose `model/` is used.

Other overrides: tokenizer=PATH (default: the checkpoint's tokenizer.json), device=cpu|cuda,
dtype=bfloat16|float32, chat=true (wrap prompt/input_file prompts as one user message with the
chat encoding; default: raw text after BOS), bos=false, stop="text" (an extra stop string),
batch_size=N (input_file), csa_mode=dense|sparse, speculative=true (the MTP block drafts each
next token and the following forward verifies it: the same output distribution, greedy output
unchanged; the drafts accepted are reported with the speeds; with serve=true the server's engine
drafts with it, `model/speculative_engine.py`).

Interactive mode is a multi-turn chat encoded with `encoding/` (`mode=chat` or `thinking`);
`/clear` starts a new conversation and `/exit` quits. Tokens are printed as they come (one
prompt at a time); prefill and decode tokens/s go to stderr. Bad input (no checkpoint, an
unreadable, truncated or mismatched weights file, a tokenizer larger than the model's
vocabulary, a prompt longer than the context) is an `error: ...` line naming the file or value
and exit status 2. Input bytes that are not UTF-8 (stdin, prompt, input_file) are replaced by
U+FFFD, with a warning on stderr, instead of ending the session.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, TextIO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train.config import _num  # noqa: E402


@dataclass
class GenerateConfig:
    ckpt: Optional[str] = None
    prompt: Optional[str] = None
    input_file: Optional[str] = None
    interactive: bool = False
    max_new_tokens: int = _num(256, ">= 1")
    temperature: float = _num(0.6, ">= 0")
    top_p: float = _num(1.0, "(0, 1]")
    top_k: int = _num(0, ">= 0")
    seed: Optional[int] = None
    tokenizer: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    chat: bool = False
    bos: bool = True
    mode: str = "chat"
    reasoning_effort: Optional[str] = None
    stop: Optional[str] = None
    batch_size: int = _num(16, ">= 1")
    csa_mode: Optional[str] = None
    speculative: bool = False
    serve: bool = False
    host: str = "127.0.0.1"
    port: int = _num(8000, "[0, 65535]")
    max_batch: int = _num(32, ">= 1")
    served_model_name: Optional[str] = None


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Typed `key=value` overrides over GenerateConfig (`train.cli.parse_cli`: every bad key at
    once, `--help`), then the rules between keys; ValueError naming them."""
    from train.cli import parse_cli

    opts = asdict(parse_cli(GenerateConfig, argv, __doc__))
    problems = []
    if opts["ckpt"] is None:
        problems.append("ckpt=PATH is required")
    modes = ((opts["prompt"] is not None) + bool(opts["input_file"]) + bool(opts["interactive"])
             + bool(opts["serve"]))
    if modes != 1:
        problems.append("give exactly one of prompt=..., input_file=PATH, interactive=true, "
                        "serve=true")
    if opts["prompt"] is not None and not opts["prompt"].strip():
        problems.append(f"prompt={opts['prompt']!r} is empty: give the text to continue, e.g. "
                        f"prompt=\"Once upon a time\"")
    if opts["mode"] not in ("chat", "thinking"):
        problems.append(f"mode={opts['mode']!r}: choose chat or thinking")
    if problems:
        raise ValueError("\n  ".join(problems))
    return opts


def load(opts: dict[str, Any]):
    """(model, tokenizer), checked against each other (`train/loading.py`, shared with the
    evaluation harness)."""
    from train.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(opts["ckpt"], opts["tokenizer"], opts["device"],
                                    opts["dtype"], opts["csa_mode"])


def clean_text(text: str, what: str, err: TextIO) -> str:
    """`text` with bytes that are not UTF-8 (kept as lone surrogates by Python's
    surrogateescape decoding of stdin and argv) replaced by U+FFFD, telling the user; the
    tokenizer cannot encode surrogates and would end the session."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are no escaped bytes
        raw = text.encode("utf-8", "replace")
    err.write(f"warning: {what} had bytes that are not valid UTF-8; replaced them with "
              f"U+FFFD\n")
    return raw.decode("utf-8", "replace")


def encode_prompt(tokenizer, text: str, opts: dict[str, Any]) -> list[int]:
    if opts["chat"]:
        from encoding import encode_messages
        text = encode_messages([{"role": "user", "content": text}], thinking_mode=opts["mode"],
                               reasoning_effort=opts["reasoning_effort"])
        return tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if opts["bos"] and tokenizer.bos_token_id is not None
            else []) + ids


def check_context(ids: list[int], max_seq_len: int, what: str) -> None:
    if len(ids) >= max_seq_len:
        raise ValueError(f"{what} is {len(ids)} tokens, longer than the model context "
                         f"(max_seq_len={max_seq_len}, one token needed for the reply)")


class Streamer:
    """Prints one row's text as tokens arrive (decoding the whole reply each time, so bytes
    that only form a character together are printed once complete)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        from encoding.tokenizer import visible_text

        text = visible_text(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):] if text.startswith(self.shown) else text)
        self.out.flush()
        self.shown = text


def sample(model, tokenizer, prompts: list[list[int]], opts: dict[str, Any],
           on_token: Callable | None, err: TextIO):
    from model.generation import generate

    out = generate(model, prompts, max_new_tokens=opts["max_new_tokens"],
                   temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"],
                   seed=opts["seed"], eos_id=tokenizer.eos_token_id,
                   stop_strings=[opts["stop"]] if opts["stop"] else None,
                   decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                   on_token=on_token, speculative=opts["speculative"])
    s = out.stats
    err.write(f"prefill: {s['prefill_tokens']:.0f} tokens, {s['prefill_s']:.2f}s, "
              f"{s['prefill_tokens'] / max(s['prefill_s'], 1e-9):.1f} tok/s | decode: "
              f"{s['decode_tokens']:.0f} tokens, {s['decode_s']:.2f}s, "
              f"{s['decode_tokens'] / max(s['decode_s'], 1e-9):.1f} tok/s"
              + (f" | MTP drafts accepted: {s['accepted']:.0f}/{s['drafted']:.0f}"
                 if "drafted" in s else "") + "\n")
    return out


def run_prompts(model, tokenizer, texts: list[str], opts, out: TextIO, err: TextIO) -> None:
    from encoding.tokenizer import visible_text

    texts = [clean_text(t, f"prompt {i + 1}", err) for i, t in enumerate(texts)]
    ids = [encode_prompt(tokenizer, t, opts) for t in texts]
    for i, p in enumerate(ids):
        check_context(p, model.cfg.max_seq_len, f"prompt {i + 1}")
    size = max(1, opts["batch_size"])
    for b0 in range(0, len(ids), size):
        batch = ids[b0:b0 + size]
        stream = Streamer(tokenizer, out) if len(batch) == 1 else None
        if stream:
            out.write(texts[b0])
        result = sample(model, tokenizer, batch, opts, stream, err)
        for i, toks in enumerate(result.tokens):
            if stream is None:
                out.write(f"--- prompt {b0 + i + 1} ---\n{texts[b0 + i]}")
                out.write(visible_text(tokenizer, toks))
            out.write(f"\n[{result.finish_reasons[i]}]\n")


def run_interactive(model, tokenizer, opts, read: Callable[[str], str], out: TextIO,
                    err: TextIO) -> None:
    from encoding import encode_messages, parse_message_from_completion_text

    messages: list[dict[str, Any]] = []
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            return
        line = clean_text(line, "the input line", err)
        if line.strip() == "/exit":
            return
        if line.strip() == "/clear":
            messages = []
            out.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(encode_messages(messages, thinking_mode=opts["mode"],
                                               reasoning_effort=opts["reasoning_effort"]),
                               add_special_tokens=False)
        try:
            check_context(ids, model.cfg.max_seq_len, "the conversation")
        except ValueError as e:
            messages.pop()
            err.write(f"error: {e}; /clear to start over\n")
            continue
        result = sample(model, tokenizer, [ids], opts, Streamer(tokenizer, out), err)
        out.write("\n")
        text = tokenizer.decode(result.tokens[0], skip_special_tokens=False)
        reply = parse_message_from_completion_text(text, opts["mode"], strict=False)
        reply.pop("parse_issues", None)
        if not reply.get("tool_calls"):
            reply.pop("tool_calls", None)
        messages.append(reply)


def main(argv: list[str] | None = None, read: Callable[[str], str] = input,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        opts = parse_overrides(sys.argv[1:] if argv is None else argv)
        model, tokenizer = load(opts)
        if opts["interactive"] and read is input and hasattr(sys.stdin, "reconfigure"):
            # keep undecodable bytes (as surrogates, which clean_text replaces) instead of a
            # UnicodeDecodeError that ends the conversation
            sys.stdin.reconfigure(errors="surrogateescape")
        if opts["serve"]:
            from serve import run_server

            name = opts["served_model_name"] or opts["ckpt"]  # as vLLM: the path given
            run_server(model, tokenizer, name, opts["host"], opts["port"], opts["max_batch"],
                       speculative=opts["speculative"])
        elif opts["interactive"]:
            run_interactive(model, tokenizer, opts, read, out, err)
        elif opts["prompt"] is not None:
            run_prompts(model, tokenizer, [opts["prompt"]], opts, out, err)
        else:
            if not os.path.isfile(opts["input_file"]):
                raise FileNotFoundError(f"input_file not found: {opts['input_file']}")
            with open(opts["input_file"], encoding="utf-8", errors="surrogateescape") as f:
                texts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
            if not texts:
                raise ValueError(f"input_file {opts['input_file']}: no prompts (they are "
                                 f"separated by blank lines)")
            run_prompts(model, tokenizer, texts, opts, out, err)
    except (FileNotFoundError, ValueError) as e:
        err.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
