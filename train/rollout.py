"""Domain-aware batched rollouts: the one sampling path of evaluation, GRPO and distillation.

    params = RolloutParams(temperature=1.0, max_new_tokens=64, n=8, seed=0)
    result = rollout(model, tokenizer, [(domain, item), ...], params)
    s = result.samples[0]
    s.prompt_ids, s.response_ids, s.loss_mask, s.logprobs, s.score.reward, s.finish

Each request is rendered in its prompt-only form (`item.prompt_text()`, i.e. `encode_messages`
of `item.prompt_messages`; it starts with BOS, so it is tokenised with
`add_special_tokens=False`) and sampled `n` times. By default every turn of every sample goes
through one continuous batch of `batch_size` rows (`model.engine.Engine`): the n samples of a
request share one prefill, finished rows are refilled at once, and a sample's next turn joins
as soon as its tool results are in; with `speculative` the MTP block drafts inside it
(`model.speculative_engine`). Under expert parallelism (forwards are collectives), with
`engine=False` or a scripted `generate_fn`, the rows of a round go through
`model.generation.generate` together instead, in chunks of `batch_size` rows, a round of
turns at a time. Both draw from `seed`, reproducibly, but not the same draws.

Multi-turn (tool domains, those with `run_tool_calls`, e.g. `calculator`). Every DeepSeek-V4
assistant turn ends with EOS, a tool-call turn too (`...</｜DSML｜tool_calls>` + EOS, spec §9.4),
so generation stops at EOS and the turn is parsed (`parse_message_from_completion_text`,
lenient). A turn with tool calls is answered by the domain's executor; its `tool` messages are
rendered by `encode_messages(results, mode, context=history)` (in chat mode
`<｜User｜><tool_result>…</tool_result><｜Assistant｜></think>`), tokenised and appended, and the
next round prefills the whole transcript afresh (prompt ids + response ids so far: the model's
own token ids are kept, never re-tokenised). This is exactly what the calculator verifier
replays, so a transcript it accepts is one this loop can produce. At most `max_tool_turns` tool
turns (default: the domain's own `max_tool_turns`, else 2); a further tool call ends the sample
with finish "tool-limit".

Per sample (`Sample`): `response_ids` is everything after the prompt (tool-result tokens
included); `loss_mask` is 1 on model-generated tokens and 0 on inserted tool-result tokens;
`logprobs` / `raw_logprobs` `[len(response)]` fp32 are generate's per-token log-probs (the
sampled distribution / the model's own softmax) on generated tokens and 0 on inserted ones;
`routes` `[len(prompt) + len(response), n_layers, topk]` come from the last round's forward over
the whole transcript; `kept` (with `return_sampling_mask`) is a `model.sampling.KeptSets` of the
generated tokens' kept sets, concatenated over the sample's turns in order (one row per position
where `loss_mask == 1`), or None when the sampling parameters keep the whole vocabulary
(`model.sampling.restricts`). `finish`: "eos" (the answer turn ended), "length" (a turn hit
`max_new_tokens` or the model context), "tool-limit", "tool-error" (the environment could not
render a result; `error` says why). `score` is `verify_fn(domain, item, text)` of the decoded
response (default `safe_verify`; GRPO passes one with a time limit), timed in
`stats["verify_seconds"]`.

Bad input never crashes a run: a prompt that does not fit the context (`>= max_seq_len` tokens,
no room for one reply token) is skipped and listed in `RolloutResult.skipped` with its reason.

Under expert parallelism every rank of an EP group must make the same number of `generate`
calls (each is a collective). Ranks have their own requests, tool turns and chunk counts, so
`rollout` agrees on every round and every chunk through the model's token dispatcher
(`any_active`, one one-int all-reduce; nothing without EP): a rank with nothing left in a round
calls `generate` with no prompts, which joins the others' forwards (`model/generation.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from data.domains.base import Domain, Item, Score, safe_verify
from encoding import encode_messages, parse_message_from_completion_text
from model.engine import Engine
from model.speculative_engine import SpeculativeEngine
from model.generation import generate, token_dispatcher
from model.sampling import KeptSets, SamplingParams

FINISH_REASONS = ("eos", "length", "tool-limit", "tool-error")
DEFAULT_MAX_TOOL_TURNS = 2


@dataclass(frozen=True)
class RolloutParams:
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    max_new_tokens: int = 64   # per assistant turn (the context limit also applies)
    n: int = 1                 # samples per request
    seed: int | None = 0       # None: unseeded draws
    batch_size: int = 64       # rows per generate call
    max_tool_turns: int | None = None  # None: the domain's own, else DEFAULT_MAX_TOOL_TURNS
    return_routes: bool = False
    return_sampling_mask: bool = False
    speculative: bool = False  # MTP drafts + one verifying forward (model/speculative.py)
    engine: bool = True        # continuous batching (model/engine.py) where it can run
    compile: bool = False      # the engine's decode step through torch.compile (minutes once)

    def validate(self) -> None:
        SamplingParams(self.temperature, self.top_p, self.top_k).validate()
        for name, low in (("max_new_tokens", 0), ("n", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"rollout: {name}={value!r}: expected an int >= {low}")
        if self.max_tool_turns is not None and (not isinstance(self.max_tool_turns, int)
                                                or self.max_tool_turns < 0):
            raise ValueError(f"rollout: max_tool_turns={self.max_tool_turns!r}: expected an "
                             f"int >= 0 or None")


@dataclass
class Sample:
    request: int  # index into the requests given to `rollout`
    sample: int  # 0..n-1
    domain: str
    item_id: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: torch.Tensor | None = None      # [len(response)] fp32, 0 on inserted tokens
    raw_logprobs: torch.Tensor | None = None  # [len(response)] fp32, 0 on inserted tokens
    routes: torch.Tensor | None = None        # [len(prompt) + len(response), layers, topk]
    kept: KeptSets | None = None              # generated_tokens rows (loss_mask == 1)
    text: str = ""
    finish: str = ""
    tool_turns: int = 0
    score: Score | None = None
    error: str | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Skipped:
    request: int
    domain: str
    item_id: str
    reason: str


@dataclass
class RolloutResult:
    samples: list[Sample]
    skipped: list[Skipped]
    stats: dict[str, float]  # generated/prefill tokens, generate calls, seconds
    stopped: bool = False    # `should_stop` cut it short: samples unfinished and unscored


@dataclass
class _Live:
    """A sample in flight: the transcript so far and where its current turn began."""

    out: Sample
    domain: Domain
    item: Item
    max_tool_turns: int
    history: list[dict[str, Any]]
    turn_start: int = 0
    logprobs: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    kept: list[KeptSets] = field(default_factory=list)  # one per generated turn


def is_tool_domain(domain: Domain) -> bool:
    return callable(getattr(domain, "run_tool_calls", None))


def _round_seed(seed: int | None, round_: int, chunk: int) -> int | None:
    # distinct, reproducible draws per (round, chunk): generate's seed fixes one batch's draws
    return None if seed is None else (seed * 1_000_003 + round_ * 10_007 + chunk) % 2**63


def rollout(model, tokenizer, requests: Sequence[tuple[Domain, Item]], params: RolloutParams,
            *, generate_fn: Callable = generate, verify_fn: Callable = safe_verify,
            should_stop: Callable[[], bool] = lambda: False) -> RolloutResult:
    """Samples `params.n` completions per (domain, item) and scores them (module docstring).

    `generate_fn` has `model.generation.generate`'s signature (tests pass a scripted one).
    `should_stop` is polled before each generate chunk: once it says so, this rank generates
    no more rows (under EP it still joins the chunks other ranks run, with no prompts), and the
    result comes back `stopped`, unscored, as soon as every rank is done."""
    params.validate()
    start = time.perf_counter()
    live, skipped = _start_samples(tokenizer, requests, params, model.cfg.max_seq_len)
    stats = {"generated_tokens": 0.0, "inserted_tokens": 0.0, "prefill_tokens": 0.0,
             "generate_calls": 0.0, "generate_seconds": 0.0, "rounds": 0.0}
    stopped = _generate_turns(model, tokenizer, live, params, stats, generate_fn, should_stop)
    if stopped:
        stats["seconds"] = time.perf_counter() - start
        return RolloutResult([x.out for x in live], skipped, stats, stopped=True)
    t0 = time.perf_counter()
    samples = _finalise_all(live, tokenizer, verify_fn)
    stats["verify_seconds"] = time.perf_counter() - t0
    stats["seconds"] = time.perf_counter() - start
    return RolloutResult(samples, skipped, stats)


def _start_samples(tokenizer, requests: Sequence[tuple[Domain, Item]], params: RolloutParams,
                   max_len: int) -> tuple[list[_Live], list[Skipped]]:
    """`params.n` samples in flight per request; requests whose prompt leaves no room skipped."""
    live: list[_Live] = []
    skipped: list[Skipped] = []
    for r, (domain, item) in enumerate(requests):
        ids = tokenizer.encode(item.prompt_text(), add_special_tokens=False)
        if len(ids) >= max_len:
            skipped.append(Skipped(r, domain.name, item.id,
                                   f"prompt_too_long: {len(ids)} tokens >= max_seq_len "
                                   f"{max_len} (no room for a reply)"))
            continue
        turns = params.max_tool_turns
        if turns is None:
            turns = getattr(domain, "max_tool_turns", DEFAULT_MAX_TOOL_TURNS)
        for s in range(params.n):
            live.append(_Live(Sample(r, s, domain.name, item.id, list(ids)), domain, item,
                              turns, list(item.prompt_messages)))
    return live, skipped


def _generate_turns(model, tokenizer, live: list[_Live], params: RolloutParams, stats: dict,
                    generate_fn: Callable, should_stop: Callable[[], bool]) -> bool:
    """Generates every sample's turns, a round of turns at a time in chunks of
    `params.batch_size` rows. -> whether `should_stop` cut it short.

    Under expert parallelism every generate call is a collective of the EP group, so the
    ranks agree on each round and each chunk (`any_active`; no communication without EP): a
    rank with fewer rows or turns left, or told to stop, calls generate with no prompts until
    all are done."""
    max_len, eos = model.cfg.max_seq_len, tokenizer.eos_token_id
    peer = token_dispatcher(model)
    if params.engine and generate_fn is generate and not peer.collective:
        return _engine_turns(model, tokenizer, live, params, stats, should_stop)
    device = _device(model)
    round_ = 0
    stopped = False
    while True:
        stopped = stopped or should_stop()
        active = [] if stopped else [x for x in live if not x.out.finish]
        if not peer.any_active(bool(active), device):
            return stopped
        stats["rounds"] += bool(active)
        c = 0
        while peer.any_active(c < len(active) and not (stopped := stopped or should_stop()),
                              device):
            chunk = [] if stopped else active[c:c + params.batch_size]
            c += params.batch_size
            t0 = time.perf_counter()
            out = generate_fn(model, [x.out.prompt_ids + x.out.response_ids for x in chunk],
                              max_new_tokens=params.max_new_tokens,
                              temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k,
                              seed=_round_seed(params.seed, round_,
                                               c // params.batch_size - 1),
                              eos_id=eos, return_logprobs=True,
                              return_routes=params.return_routes,
                              return_sampling_mask=params.return_sampling_mask,
                              speculative=params.speculative)
            stats["generate_seconds"] += time.perf_counter() - t0
            stats["generate_calls"] += 1
            stats["prefill_tokens"] += sum(len(x.out.prompt_ids) + len(x.out.response_ids)
                                           for x in chunk)
            for i, x in enumerate(chunk):
                tokens = list(out.tokens[i])
                stats["generated_tokens"] += len(tokens)
                _append_generated(x, tokens, out, i)
                x.out.finish = _after_turn(x, out.finish_reasons[i], tokenizer, max_len, stats)
        round_ += 1


def _engine_turns(model, tokenizer, live: list[_Live], params: RolloutParams, stats: dict,
                  should_stop: Callable[[], bool]) -> bool:
    """Every sample's turns through one continuous batch (`model.engine.Engine`, at most
    `params.batch_size` rows): a request's n samples share one prefill of its prompt, a row
    that ends is replaced at once, and a sample's next turn joins the batch as soon as its
    tool results are in, without waiting for a round to finish, continuing its own parked
    cache row (only the tool-result tokens are prefilled, not the transcript again).
    -> whether `should_stop` cut it short (polled before every step)."""
    engine_class = SpeculativeEngine if params.speculative else Engine
    engine = engine_class(model, max_batch=params.batch_size, eos_id=tokenizer.eos_token_id,
                    temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    seed=params.seed, return_logprobs=True, return_routes=params.return_routes,
                    return_sampling_mask=params.return_sampling_mask, compile=params.compile)
    owners: dict[int, list[_Live]] = {}  # engine request -> its samples, in sample order

    def add(prompt: list[int], samples: list[_Live], parent=None) -> None:
        keep = is_tool_domain(samples[0].domain)  # its samples may get a next turn
        owners[engine.add(prompt, n=len(samples), max_new_tokens=params.max_new_tokens,
                          keep=keep, parent=parent)] = samples
        stats["generate_calls"] += 1

    first: dict[int, list[_Live]] = {}
    for x in live:
        first.setdefault(x.out.request, []).append(x)
    for group in first.values():  # the n samples of a request start from one prompt
        for c in range(0, len(group), params.batch_size):
            add(group[c].out.prompt_ids, group[c:c + params.batch_size])
    t0 = time.perf_counter()
    stopped = False
    with engine.inference():
        while engine.busy and not (stopped := should_stop()):
            for request in engine.step():
                out = engine.output(request)
                for i, x in enumerate(owners.pop(request)):
                    tokens = list(out.tokens[i])
                    stats["generated_tokens"] += len(tokens)
                    _append_generated(x, tokens, out, i)
                    before = len(x.out.response_ids)
                    x.out.finish = _after_turn(x, out.finish_reasons[i], tokenizer,
                                               model.cfg.max_seq_len, stats)
                    if not x.out.finish:  # the tool results continue the sample's own row
                        add(x.out.response_ids[before:], [x], parent=(request, i))
                    elif is_tool_domain(x.domain):
                        engine.drop(request, i)
    stats["prefill_tokens"] = engine.stats["prefill_tokens"]
    stats["generate_seconds"] += time.perf_counter() - t0
    stats["rounds"] = 1.0 + max((x.out.tool_turns for x in live), default=0)
    stats["engine_steps"] = engine.stats["steps"]
    for key in ("drafted", "accepted"):  # speculative: the MTP drafts and how many held
        if key in engine.stats:
            stats[key] = engine.stats[key]
    return stopped


def _device(model) -> torch.device:
    """Where a collective's buffer lives: the model's device (CPU for a test's stand-in)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _append_generated(x: _Live, tokens: list[int], out, i: int) -> None:
    x.out.response_ids.extend(tokens)
    x.out.loss_mask.extend([1] * len(tokens))
    lp = out.logprobs[i].tolist() if out.logprobs is not None else [0.0] * len(tokens)
    raw = out.raw_logprobs[i].tolist() if out.raw_logprobs is not None else [0.0] * len(tokens)
    x.logprobs.extend(lp)
    x.raw.extend(raw)
    if out.kept_sets is not None and out.kept_sets[i] is not None:
        x.kept.append(out.kept_sets[i])
    if out.routes is not None:  # the whole transcript was prefilled: the latest covers it all
        x.out.routes = out.routes[i]


def _after_turn(x: _Live, reason: str, tokenizer, max_len: int, stats: dict) -> str:
    """'' to continue (tool results appended), else the sample's finish reason."""
    if reason != "eos":
        return "length"  # "length" (turn budget or context); generate gets no stop sequences
    if not is_tool_domain(x.domain):
        return "eos"
    turn = tokenizer.decode(x.out.response_ids[x.turn_start:], skip_special_tokens=False)
    message = parse_message_from_completion_text(turn, x.item.thinking_mode, strict=False)
    message.pop("parse_issues", None)
    if not message["tool_calls"]:
        return "eos"
    if x.out.tool_turns >= x.max_tool_turns:
        return "tool-limit"
    try:
        results = x.domain.run_tool_calls(message, item=x.item)
        environment = encode_messages(results, x.item.thinking_mode,
                                      context=x.history + [message])
    except Exception as error:  # noqa: BLE001 - a broken environment ends one sample only
        x.out.error = f"{type(error).__name__}: {error}"[:300]
        return "tool-error"
    env_ids = tokenizer.encode(environment, add_special_tokens=False)
    if len(x.out.prompt_ids) + len(x.out.response_ids) + len(env_ids) >= max_len:
        return "length"  # the tool result would leave no room for the next turn
    x.history += [message, *results]
    x.out.response_ids.extend(env_ids)
    x.out.loss_mask.extend([0] * len(env_ids))
    x.logprobs.extend([0.0] * len(env_ids))
    x.raw.extend([0.0] * len(env_ids))
    x.out.tool_turns += 1
    x.turn_start = len(x.out.response_ids)
    stats["inserted_tokens"] += len(env_ids)
    return ""


def _finalise_all(live: list[_Live], tokenizer, verify_fn: Callable) -> list[Sample]:
    """Every sample decoded and scored. Domains whose verification runs in a process of its
    own (`parallel_verify`, e.g. code against unit tests in the sandbox, which enforces its
    own time limit) are scored by a pool of threads, one child process each, so a batch is
    not verified one sample at a time; the rest in order, through `verify_fn`."""
    parallel = [i for i, x in enumerate(live) if getattr(x.domain, "parallel_verify", False)]
    scores: dict[int, Score] = {}
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        texts = {i: tokenizer.decode(live[i].out.response_ids, skip_special_tokens=False)
                 for i in parallel}
        with ThreadPoolExecutor(max(1, min(len(parallel), os.cpu_count() or 1))) as pool:
            done = pool.map(lambda i: safe_verify(live[i].domain, live[i].item, texts[i]),
                            parallel)
            scores = dict(zip(parallel, done))
    return [_finalise(x, tokenizer, verify_fn, scores.get(i)) for i, x in enumerate(live)]


def _finalise(x: _Live, tokenizer, verify_fn: Callable, score: Score | None = None) -> Sample:
    s = x.out
    s.logprobs = torch.tensor(x.logprobs, dtype=torch.float32)
    s.raw_logprobs = torch.tensor(x.raw, dtype=torch.float32)
    if x.kept:
        s.kept = KeptSets.cat(x.kept)
    s.text = tokenizer.decode(s.response_ids, skip_special_tokens=False)
    s.score = score if score is not None else verify_fn(x.domain, x.item, s.text)
    return s
