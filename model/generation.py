"""Batched generation with the training model and its KV cache; the API RL rollouts call.

    out = generate(model, prompts=[[0, 17, 4], [0, 9]], max_new_tokens=64, temperature=0.7,
                   top_p=0.95, seed=1, eos_id=1, return_logprobs=True, return_routes=True)
    out.tokens[i]           # generated ids of prompt i (EOS / stop sequence included)
    out.finish_reasons[i]   # "eos" | "stop" | "length"

One prefill of the right-padded prompts (in `prefill_chunk`-token forwards for long prompts,
`model/prefill.py`), then one token per row per step (`ModelCache`); rows
that finish are dropped from the batch. Optional per-token outputs, for GRPO:
- `logprobs[i]` `[n]`: log-prob of each drawn token under the distribution it was drawn from
  (temperature, top-k, top-p applied, renormalised; 0 for greedy); `raw_logprobs[i]` `[n]`:
  under the model's own softmax (temperature 1, full vocabulary);
- `routes[i]` `[len(prompt) + n, n_layers, topk]`: the expert ids every main layer used for
  every prompt and generated token ("keep routing"; the last generated token is fed once more
  so it has routes too). Replay with `model(ids, routes=[*per_layer, None])` (MTP: None);
- `kept_sets[i]`: the kept set at each step ("keep sampling mask") as a `KeptSets` of n rows
  (token-id lists, on CPU; renormalise a training forward over them with
  `sampling.logprobs_over_kept`), or None when the sampling parameters cannot drop a token
  (`sampling.restricts` is False: plain temperature sampling keeps the whole vocabulary, and
  nothing is stored). A dense `[n, vocab]` mask would be ~2 GB per 16K tokens at the released
  vocabulary.

Expert parallelism. Every MoE forward is then a collective over the EP group (the model's
dispatcher), so each rank calls `generate` with its own prompts (any number, zero included) and
all ranks run the same number of forwards: one prefill, then one decode forward per step while
*any* rank still has rows, agreed by `dispatcher.any_active` once per step (one one-int
all-reduce; nothing at all with local dispatch). A rank without rows feeds a throw-away
one-token row and discards its output. Each rank samples only for its own rows with its own
`seed`, so its draws are those of a single process given the same prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .dispatcher import LocalDispatcher, TokenDispatcher
from .prefill import DEFAULT_CHUNK, prefill
from .sampling import KeptSets, SamplingParams, draw, restricts, sampling_distribution
from .transformer import Transformer


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[torch.Tensor] | None = None        # per row [n] fp32
    raw_logprobs: list[torch.Tensor] | None = None    # per row [n] fp32
    routes: list[torch.Tensor] | None = None          # per row [prompt + n, n_layers, topk]
    kept_sets: list[KeptSets | None] | None = None    # per row n rows; None: whole vocab
    stats: dict[str, float] = field(default_factory=dict)  # token counts and seconds


@dataclass
class _Row:
    """Per-prompt bookkeeping while the row is in the batch."""

    prompt_len: int
    limit: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    raw: list[torch.Tensor] = field(default_factory=list)
    kept_ids: list[torch.Tensor] = field(default_factory=list)  # per step, int32 ids
    routes: list[torch.Tensor] = field(default_factory=list)  # [t, n_layers, topk] chunks
    finish: str | None = None


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, eos_id: int | None = None,
             stop_token_sequences: Sequence[Sequence[int]] | None = None,
             return_logprobs: bool = False, return_routes: bool = False,
             return_sampling_mask: bool = False, stop_strings: Sequence[str] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             pad_id: int | None = None, speculative: bool = False,
             prefill_chunk: int | None = DEFAULT_CHUNK) -> GenerationOutput:
    """Samples up to `max_new_tokens` per prompt (token id lists, BOS included if wanted).

    Stops a row on `eos_id`, on any of `stop_token_sequences` (matched on generated ids), on any
    of `stop_strings` (matched on `decode(generated ids)`; `decode` required), or at the length
    limit (`max_new_tokens`, or the model context `cfg.max_seq_len`). `on_token(row, id)` is
    called for every generated token as it is drawn (streaming). Sampling as in `sampling.py`;
    `seed` makes the draws reproducible for the same batch. Runs under `no_grad` in eval mode
    and restores the model's training flag; the returned tensors are ordinary (not inference
    tensors), so routes can be replayed in a training forward. `speculative=True` drafts each
    next token with the MTP block and verifies it in the following forward
    (`model/speculative.py`): the same outputs, distributed exactly as without it.
    `prefill_chunk`: the prompts go into the cache this many tokens per forward
    (`model/prefill.py`), so a long prompt's peak memory is the chunk's; None: one forward."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _generate(model, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                             eos_id, stop_token_sequences, return_logprobs, return_routes,
                             return_sampling_mask, stop_strings, decode, on_token, pad_id,
                             speculative, prefill_chunk)
    finally:
        model.train(was_training)


def _generate(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, eos_id,
              stop_token_sequences, return_logprobs, return_routes, return_sampling_mask,
              stop_strings, decode, on_token, pad_id, speculative,
              prefill_chunk) -> GenerationOutput:
    cfg = model.cfg
    device = model.embed.weight.device
    peer = token_dispatcher(model)
    try:  # every check before any collective; under EP all ranks then agree to go on or stop
        params = SamplingParams(temperature, top_p, top_k)
        params.validate()
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        if stop_strings and decode is None:
            raise ValueError("stop_strings: needs `decode` (token ids -> text) to match them")
        if not prompts and not peer.collective:
            raise ValueError("prompts: empty batch")
        _check_prompts(prompts, cfg)
        if speculative and not cfg.n_mtp_layers:
            raise ValueError("speculative=True: the model has no MTP block to draft with "
                             "(n_mtp_layers=0)")
        if speculative and peer.collective:
            raise ValueError("speculative=True: not supported under expert parallelism or "
                             "zero_stage=3 yet (forwards are collectives)")
        pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        if not 0 <= pad < cfg.vocab_size:  # padding is embedded like any token
            raise ValueError(f"{'pad_id' if pad_id is not None else 'eos_id'}={pad}: outside "
                             f"the model vocabulary [0, {cfg.vocab_size}) (used as padding)")
        error = None
    except ValueError as e:
        error = e
    if peer.collective and peer.any_active(error is not None, device):
        # a rank that raised alone would strand the others in their prefill all-to-all
        raise error or ValueError("generate: arguments rejected on another rank of the "
                                  "expert-parallel group (see its error)")
    if error is not None:
        raise error
    rows = [_Row(len(p), min(max_new_tokens, cfg.max_seq_len - len(p))) for p in prompts]
    stops = [list(s) for s in (stop_token_sequences or []) if len(s)]
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    n_layers = cfg.n_layers
    store_kept = return_sampling_mask and restricts(params, cfg.vocab_size)

    def finish(row: _Row) -> str | None:
        return _finish_reason(row, eos_id, stops, stop_strings, decode)

    if speculative:
        from .speculative import speculative_decode  # it builds on this module's rows

        stats = speculative_decode(model, prompts, rows, params, gen, pad, finish, on_token,
                                   return_logprobs, return_routes, store_kept)
        _sync(device)
        stats["prefill_tokens"] = float(sum(len(p) for p in prompts))
        return _output(rows, return_logprobs, return_routes, return_sampling_mask, store_kept,
                       stats)

    # prefill: right-padded prompts, logits at each row's last prompt token
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    cache, logits = None, None
    if rows:
        width = int(lens.max())
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask = torch.arange(width, device=device)[None] < lens[:, None]
        cache = model.new_cache(len(prompts), width + max(r.limit for r in rows) + 1)
        chunk = None if peer.collective else prefill_chunk  # model/prefill.py: EP is one shot
        logits, prompt_routes = prefill(model, ids, mask, lens, cache, chunk, return_routes)
        if return_routes:  # prompt_routes: [b, w, layers, k]
            for i, r in enumerate(rows):
                r.routes.append(prompt_routes[i, :r.prompt_len])
    else:  # an EP rank without prompts still joins the group's prefill
        _idle_forward(model, device)
    _sync(device)
    t1 = time.perf_counter()
    active = list(range(len(rows)))  # batch index -> row
    decode_tokens = 0
    while True:  # ends when no row (on any rank of an EP group) needs another forward
        finished_now = [i for i, row in enumerate(active) if rows[row].limit == 0]
        for i in finished_now:
            rows[active[i]].finish = "length"
        keep = [i for i in range(len(active)) if i not in finished_now]
        if finished_now:
            active, logits = _shrink(cache, active, logits, keep)
        done: list[int] = []
        if active:
            logp, kept = sampling_distribution(logits, params)
            tok = logits.float().argmax(-1) if params.greedy else draw(logp, gen)  # [batch]
            emit_step(rows, active, [True] * len(active), tok, logp, kept, logits, finish,
                      on_token, return_logprobs, store_kept)
            done = [i for i, row_id in enumerate(active) if rows[row_id].finish]
            decode_tokens += len(active)
            keep = [i for i in range(len(active)) if i not in done]
            if done and not return_routes:  # finished rows need no more forwards
                active, _ = _shrink(cache, active, None, keep)
                tok = tok[torch.as_tensor(keep, dtype=torch.long, device=device)]
        if not peer.any_active(bool(active), device):  # under EP: one all-reduce per step
            break
        if not active:  # this rank is done but another is not: join its all-to-alls
            _idle_forward(model, device)
            continue
        out = model(tok[:, None], cache=cache)  # one token per row at cache.lengths
        logits = out.logits[:, 0]
        if return_routes:  # the fed token's routes; finished rows leave after this forward
            step_routes = torch.stack(out.routes[:n_layers], dim=2)[:, 0].cpu()  # [b, layers, k]
            for i, row_id in enumerate(active):
                rows[row_id].routes.append(step_routes[i:i + 1])
            if done:
                active, logits = _shrink(cache, active, logits, keep)
    _sync(device)
    t2 = time.perf_counter()

    return _output(rows, return_logprobs, return_routes, return_sampling_mask, store_kept,
                   {"prefill_tokens": float(lens.sum()), "prefill_s": t1 - t0,
                    "decode_tokens": float(decode_tokens), "decode_s": t2 - t1})


def _output(rows: list[_Row], return_logprobs, return_routes, return_sampling_mask, store_kept,
            stats: dict[str, float]) -> GenerationOutput:
    result = GenerationOutput(tokens=[r.tokens for r in rows],
                              finish_reasons=[r.finish or "length" for r in rows], stats=stats)
    if return_logprobs:
        result.logprobs = [_stack(r.logprobs) for r in rows]
        result.raw_logprobs = [_stack(r.raw) for r in rows]
    if return_routes:
        result.routes = [torch.cat(r.routes) for r in rows]
    if return_sampling_mask:
        result.kept_sets = [_kept_sets(r.kept_ids) if store_kept else None for r in rows]
    return result


def emit_step(rows: list[_Row], active: list[int], which: list[bool], tokens: torch.Tensor,
              logp: torch.Tensor, kept: torch.Tensor, logits: torch.Tensor, finish_reason,
              on_token, return_logprobs: bool, store_kept: bool) -> None:
    """Appends `tokens[i]` `[batch]` to row `active[i]` where `which[i]` and the row still runs,
    with its per-token outputs (log-prob under `logp`, raw log-prob under `logits`' softmax, the
    kept set of `kept`), and sets the row's finish reason. One host copy per output per step,
    split per row on the host, never one per row."""
    tok = tokens.tolist()
    if return_logprobs:
        picked = tokens[:, None]
        step_logp = logp.gather(1, picked)[:, 0].cpu()
        step_raw = torch.log_softmax(logits.float(), -1).gather(1, picked)[:, 0].cpu()
    if store_kept:
        step_kept = KeptSets.from_mask(kept).to("cpu")
        kept_rows = step_kept.ids.split(step_kept.counts.tolist())
    for i, row_id in enumerate(active):
        row = rows[row_id]
        if not which[i] or row.finish is not None:
            continue
        row.tokens.append(tok[i])
        if return_logprobs:
            row.logprobs.append(step_logp[i])
            row.raw.append(step_raw[i])
        if store_kept:
            row.kept_ids.append(kept_rows[i])
        if on_token is not None:
            on_token(row_id, tok[i])
        row.finish = finish_reason(row)


def _check_prompts(prompts, cfg) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(p) >= cfg.max_seq_len:
            raise ValueError(f"prompts[{i}]: {len(p)} tokens leave no room in the model "
                             f"context (max_seq_len={cfg.max_seq_len})")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} outside the model vocabulary "
                             f"[0, {cfg.vocab_size})")


def token_dispatcher(model) -> TokenDispatcher:
    """The MoE token dispatcher: it knows whether forwards are collectives and over which ranks
    (the model never sees a process group itself). All MoE layers share one EP group. A loop
    around `generate` whose iterations differ between ranks (rollout rounds and chunks) asks
    its `any_active` too. Anything without modules (a test's stand-in) dispatches locally. A
    model whose forwards are collectives for another reason (ZeRO-3's per-block weight gathers
    over all data-parallel ranks) carries a `forward_peer` with the same two members, asked
    first."""
    peer = getattr(model, "forward_peer", None)
    if peer is not None:
        return peer
    for m in getattr(model, "modules", lambda: [])():
        d = getattr(m, "dispatcher", None)
        if isinstance(d, TokenDispatcher):
            return d
    return LocalDispatcher(1)


def _idle_forward(model, device) -> None:
    """A forward whose output is discarded, run by an EP rank without rows of its own so that
    its MoE layers join the others' all-to-alls: one token in a fresh one-row cache (a cache,
    so that the MTP blocks are skipped as in every generation forward, and the collective
    sequence matches the other ranks' layer for layer)."""
    model(torch.zeros((1, 1), dtype=torch.long, device=device), cache=model.new_cache(1, 1))


def _finish_reason(row: _Row, eos_id, stops, stop_strings, decode) -> str | None:
    gen = row.tokens
    if eos_id is not None and gen[-1] == eos_id:
        return "eos"
    if any(len(s) <= len(gen) and gen[-len(s):] == s for s in stops):
        return "stop"
    if stop_strings:
        longest = max(len(s) for s in stop_strings)
        text = decode(gen[-(longest + 8):])  # a token is at least a byte of some character
        if any(s in text for s in stop_strings):
            return "stop"
    if len(gen) >= row.limit:
        return "length"
    return None


def _shrink(cache, active: list[int], logits: torch.Tensor | None, keep: list[int]):
    """Drops the batch rows not in `keep` from the cache (and logits)."""
    if len(keep) == len(active):
        return active, logits
    index = torch.as_tensor(keep, dtype=torch.long, device=cache.lengths.device)
    if keep:
        cache.select(index)
    return [active[i] for i in keep], (None if logits is None else logits.index_select(0, index))


def _kept_sets(steps: list[torch.Tensor]) -> KeptSets:
    """One row per generated token from the per-step id lists."""
    counts = torch.tensor([len(ids) for ids in steps], dtype=torch.int32)
    ids = torch.cat(steps) if steps else torch.zeros(0, dtype=torch.int32)
    return KeptSets(ids, counts)


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values) if values else torch.zeros(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
