"""A rollout engine: continuous batching and shared prompt prefixes over the training model's
cached forward (issue #38; `generate` remains the batch-synchronous API, and under expert
parallelism the only one).

    engine = Engine(model, max_batch=32, eos_id=1, temperature=0.0)
    a = engine.add([0, 17, 4], n=8, max_new_tokens=64)   # one prompt, eight samples
    b = engine.add([0, 9], max_new_tokens=16)
    results = engine.run()          # {request id: GenerationOutput with one row per sample}
    # or drive it: `for rid in engine.step(): ...` (the requests that finished in that step),
    # adding requests between steps (a sample's next turn after a tool result, a server's
    # new client)

Slots. The cache is allocated once for `max_batch` rows (`ModelCache`, grown only when a
request needs longer rows than any before). The running rows are slots 0..k-1: a decode step
is one forward over a view of the first k slots (`ModelCache.rows`: shared storage, writes in
place), and a row that finishes is replaced by the last running row (one row copied), so the
running rows stay contiguous and no step copies the whole cache.

Admission. Before every step the engine admits queued requests while their samples fit in the
free slots (FIFO, so a large request is not starved by small ones behind it). Their prompts are
prefilled together once (`model/prefill.py`) into the next free slots, and each prompt's slot
is copied to its other n-1 samples (`ModelCache.copy_rows`): the samples share the prompt's
computation and then sample independently. A finished row (EOS, a stop sequence or string, its
length limit, `cancel`) leaves at once, so its slot is taken at the next step instead of
waiting for the longest row of a batch.

Outputs are those of `generate` (`model.generation.emit_step`): the drawn tokens, and with
`return_logprobs` their log-probs under the sampling distribution and the model's own; with
`return_routes` the routes of the prompt (from the prefill, shared by the forked samples) and
of every generated token (the last one is fed once more, as `generate` does); with
`return_sampling_mask` the kept sets (None for a request whose parameters keep the whole
vocabulary). Greedy decoding equals `generate`'s token for token.

`compile=True` runs the decode step through `torch.compile` with a dynamic batch size
(`compiled_decode_step`; CUDA graphs on a GPU through `mode="reduce-overhead"`), on a cache
view marked `static`: no host synchronisation and shapes set by the cache alone. Prefills stay
eager. Tokens equal the eager step's (tested). The batch is padded to bucket sizes
(`bucket_sizes`): on CUDA to a handful, so CUDA graphs are recorded for a handful of sizes.

Sampling parameters are the engine's unless a request gives its own (rows are grouped by
parameters each step). Draws come from the engine's generator (`seed`), so they depend on which
rows share a step (the schedule is deterministic, so a run is reproducible), unless a request
gives its own `seed`: its samples then draw from their own generators and do not depend on the
other requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .generation import GenerationOutput, _check_prompts, _finish_reason, _kept_sets, _Row, \
    _stack, emit_step
from .decode_step import bucket_sizes, compiled_decode_step, decode_step
from .prefill import DEFAULT_CHUNK, prefill
from .sampling import SamplingParams, draw, restricts, sampling_distribution


@dataclass
class _Request:
    prompt: list[int]
    n: int
    max_new_tokens: int
    params: SamplingParams
    seed: int | None
    stops: list[list[int]]
    stop_strings: list[str]
    on_token: Callable[[int, int], None] | None  # (sample index, token id)
    top_logprobs: int = 0                          # alternatives kept per generated token
    keep: bool = False                             # park finished samples for a next turn
    parent: int | None = None                      # the parked row this one continues
    rows: list[int] = field(default_factory=list)  # row ids, one per sample, once admitted
    retired: int = 0                               # samples done and out of the batch


@dataclass
class _EngineRow(_Row):
    request: int = -1
    sample: int = 0
    gen: torch.Generator | None = None
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)  # per token


def _length(row: _Row) -> int:
    """Tokens in a row's transcript: its context at admission plus what it generated."""
    return row.prompt_len + len(row.tokens)


_EngineRow.length = property(_length)


class Engine:
    def __init__(self, model, max_batch: int = 32, eos_id: int | None = None,
                 pad_id: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, return_logprobs: bool = False,
                 return_routes: bool = False, return_sampling_mask: bool = False,
                 stop_token_sequences=None, decode: Callable[[list[int]], str] | None = None,
                 max_len: int | None = None, prefill_chunk: int | None = DEFAULT_CHUNK,
                 admit_batch: int | None = None, admit_wait: int = 4,
                 compile: bool | str = False, buckets: bool | None = None):
        """`max_len`: the cache rows' initial size (default: what the first admitted requests
        need; grown when a later request needs more, up to the model context). `decode` (ids
        -> text) is needed for requests with stop strings. `admit_batch` (default max_batch
        / 8) and `admit_wait`: see `admit`. `compile`: the decode step through
        `torch.compile` (see `compiled_decode_step`; a string names the backend). `buckets`:
        decode batch sizes padded with free slots (`bucket_sizes`; the padding rows decode a
        pad token at position 0 of a free slot and are discarded)."""
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.model, self.max_batch, self.eos_id = model, max_batch, eos_id
        self.params = SamplingParams(temperature, top_p, top_k)
        self.params.validate()
        self.pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.max_len = min(max_len, model.cfg.max_seq_len) if max_len else None
        self.device = model.embed.weight.device
        self.gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None \
            else None
        self.return_logprobs, self.return_routes = return_logprobs, return_routes
        self.store_kept, self.prefill_chunk, self.decode = return_sampling_mask, prefill_chunk, \
            decode
        self.stops = [list(s) for s in (stop_token_sequences or []) if len(s)]
        self.queue: deque[int] = deque()
        self.requests: list[_Request] = []
        self.rows: list[_EngineRow] = []   # every sample's row, admitted or finished
        self.active: list[int] = []        # slot -> row id, for the running slots 0..k-1
        self.cache = None
        self.logits: torch.Tensor | None = None  # [k, vocab]: each slot's next-token logits
        self.finished: list[int] = []      # requests done since the last `step` returned
        self.parked: dict[int, object] = {}  # row id -> its one-row ModelCache (keep=True)
        self.stats = {"prefill_tokens": 0.0, "decode_tokens": 0.0, "steps": 0.0,
                      "prefills": 0.0}
        self.admit_batch = admit_batch or max(1, max_batch // 8)
        self.admit_wait, self.held = admit_wait, 0
        self.compiled = bool(compile)
        backend = compile if isinstance(compile, str) else "inductor"
        self.decode_fn = compiled_decode_step(self.device, backend) if compile else decode_step
        self.buckets = bucket_sizes(max_batch, buckets, bool(compile), self.device.type)

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], n: int = 1, max_new_tokens: int = 256,
            temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, seed: int | None = None, stop=None,
            stop_strings=None, on_token: Callable[[int, int], None] | None = None,
            top_logprobs: int = 0, keep: bool = False,
            parent: tuple[int, int] | None = None) -> int:
        """Queues a request of `n` samples of `prompt`; returns its id. Sampling parameters
        default to the engine's; with `seed` the request's samples draw from their own
        generators (seed, sample index). `stop`: token sequences ending a sample (besides the
        engine's); `stop_strings`: texts (needs the engine's `decode`); `on_token(sample,
        id)` is called for each token as it is drawn. `top_logprobs`: keep the k most likely
        tokens and their log-probs (the model's own softmax) at every generated position
        (`top_logprobs(request)`).

        Multi-turn without prefilling the transcript again: a request added with `keep=True`
        parks each finished sample's cache row; `add(tokens, parent=(request, sample))` then
        continues that sample, feeding only `tokens` (e.g. a tool result) after what its row
        holds, and `drop(request, sample)` forgets a parked row that will not continue. The
        continuation's routes cover the whole transcript (the parent's, then its own)."""
        base = self.params
        params = SamplingParams(base.temperature if temperature is None else temperature,
                                base.top_p if top_p is None else top_p,
                                base.top_k if top_k is None else top_k)
        params.validate()
        row = None
        if parent is not None:
            row = self.parked_row(*parent)
            if n != 1:
                raise ValueError(f"n={n}: a continuation has one sample")
        _check_prompts([prompt], self.model.cfg)
        if row is not None and self.rows[row].length + len(prompt) >= self.model.cfg.max_seq_len:
            raise ValueError(f"parent={parent}: {self.rows[row].length} + {len(prompt)} tokens "
                             f"leave no room in the model context "
                             f"(max_seq_len={self.model.cfg.max_seq_len})")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n}: must be in [1, max_batch={self.max_batch}]")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        if stop_strings and self.decode is None:
            raise ValueError("stop_strings: the engine needs `decode` (ids -> text)")
        if not 0 <= top_logprobs <= self.model.cfg.vocab_size:
            raise ValueError(f"top_logprobs={top_logprobs}: must be in [0, vocab size]")
        stops = self.stops + [list(s) for s in (stop or []) if len(s)]
        self.requests.append(_Request(list(prompt), n, max_new_tokens, params, seed, stops,
                                      list(stop_strings or []), on_token, top_logprobs, keep,
                                      row))
        self.queue.append(len(self.requests) - 1)
        return len(self.requests) - 1

    def cancel(self, request: int) -> None:
        """Ends a request now: queued, it never runs; running, its rows leave at the next step
        (finish "cancelled")."""
        req = self.requests[request]
        if request in self.queue:
            self.queue.remove(request)
            self.finished.append(request)
            return
        for r in req.rows:
            if self.rows[r].finish is None:
                self.rows[r].finish = "cancelled"

    def release(self, request: int) -> None:
        """Forgets a finished request's outputs and parked rows (a long-running server would
        keep every request's tokens otherwise); its id is not reused."""
        for r in self.requests[request].rows:
            self.parked.pop(r, None)
            self.rows[r] = None
        self.requests[request] = None

    def parked_row(self, request: int, sample: int) -> int:
        req = self.requests[request] if 0 <= request < len(self.requests) else None
        row = req.rows[sample] if req is not None and sample < len(req.rows) else None
        if row is None or row not in self.parked:
            raise ValueError(f"parent=({request}, {sample}): no parked sample there (add the "
                             f"request with keep=True, let it finish, continue it once)")
        return row

    def drop(self, request: int, sample: int) -> None:
        """Forgets a parked sample that will not continue."""
        self.parked.pop(self.parked_row(request, sample))

    def top_logprobs(self, request: int) -> list[list[tuple[list[int], list[float]]]]:
        """Per sample, per generated token: (the k likeliest ids, their log-probs)."""
        return [self.rows[r].top for r in self.requests[request].rows]

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active)

    def run(self) -> dict[int, GenerationOutput]:
        """Steps until every request has finished; one output per request."""
        with self.inference():
            while self.busy:
                self.step()
        return {i: self.output(i) for i in range(len(self.requests))}

    def inference(self):
        """Context for stepping by hand: eval mode and no_grad, training flag restored."""
        return _Inference(self.model)

    def output(self, request: int) -> GenerationOutput:
        req = self.requests[request]
        rows = [self.rows[r] for r in req.rows]
        out = GenerationOutput(tokens=[r.tokens for r in rows],
                               finish_reasons=[r.finish or "length" for r in rows],
                               stats=dict(self.stats))
        if self.return_logprobs:
            out.logprobs = [_stack(r.logprobs) for r in rows]
            out.raw_logprobs = [_stack(r.raw) for r in rows]
        if self.return_routes:
            out.routes = [torch.cat(r.routes) for r in rows]
        if self.store_kept:
            keeps = restricts(req.params, self.model.cfg.vocab_size)
            out.kept_sets = [_kept_sets(r.kept_ids) if keeps else None for r in rows]
        return out

    # ------------------------------------------------------------------ one step
    def step(self) -> list[int]:
        """Admits what fits, draws one token for every running row, retires finished rows and
        runs the forward that gives the remaining rows their next logits. -> the requests that
        finished (all their samples done) since the last call. Call under `inference()`."""
        self.admit()
        self.retire([i for i, r in enumerate(self.active)
                     if self.rows[r].limit == 0 or self.rows[r].finish], "length")
        if self.active:
            logp, kept, tok = self.sample(self.logits)
            emit_step(self.rows, self.active, [True] * len(self.active), tok, logp, kept,
                      self.logits, self.finish, self._on_token, self.return_logprobs,
                      self.store_kept)
            self.keep_top_logprobs(self.logits)
            self.stats["decode_tokens"] += len(self.active)
            self.stats["steps"] += 1
            done = [i for i, r in enumerate(self.active) if self.rows[r].finish is not None]
            if self.return_routes:  # the drawn tokens' routes: finished rows join once more
                self.forward(tok)
                self.retire(done, None)
            else:
                tok = tok[self.retire(done, None)]
                if self.active:
                    self.forward(tok)
        finished, self.finished = self.finished, []
        return finished

    def keep_top_logprobs(self, logits: torch.Tensor, slots: list[int] | None = None) -> None:
        """The alternatives of the tokens just drawn from `logits` `[n, vocab]` (for the
        running slots `slots`, default all), for the rows whose request asks."""
        slots = range(len(logits)) if slots is None else slots
        want = [self.requests[self.rows[self.active[i]].request].top_logprobs for i in slots]
        k = max(want, default=0)
        if not k:
            return
        at = [j for j, w in enumerate(want) if w]
        picked = logits.index_select(0, torch.as_tensor(at, device=self.device))
        values, ids = torch.log_softmax(picked.float(), -1).topk(k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
        for n, j in enumerate(at):
            row = self.rows[self.active[slots[j]]]
            if len(row.top) < len(row.tokens):  # it drew a token from these logits
                row.top.append((ids[n][:want[j]], values[n][:want[j]]))

    def forward(self, tok: torch.Tensor) -> None:
        """One token per running slot `[k]`: the next logits (and the fed tokens' routes)."""
        k = len(self.active)
        n = k if self.buckets is None else next(b for b in self.buckets if b >= k)
        view = self.cache.rows(0, n)
        view.static = self.compiled
        if n > k:  # padding rows (`buckets`): free slots, a pad token at position 0
            tok = torch.cat((tok, tok.new_full((n - k,), self.pad)))
            view.lengths[k:] = 0
        logits, lengths, routes = self.decode_fn(self.model, tok, view, self.return_routes)
        self.logits = logits[:k]
        self.cache.set_lengths(0, lengths[:k])
        if routes is not None:
            step = routes.cpu()
            for i, r in enumerate(self.active):
                self.rows[r].routes.append(step[i:i + 1])  # [1, layers, topk]

    def sample(self, logits: torch.Tensor, slots: list[int] | None = None):
        """(log-probs, kept mask, drawn tokens) `[n, vocab]`, `[n, vocab]`, `[n]` for the
        running slots `slots` (default all; `logits` `[n, vocab]` in that order), each under
        its request's parameters."""
        logp, kept, groups = self.distribution(logits, slots)
        return logp, kept, self.draw(logp, logits, groups, slots)

    def distribution(self, logits: torch.Tensor, slots: list[int] | None = None):
        """Each row's sampling distribution under its request's parameters: (log-probs
        `[n, vocab]`, kept mask `[n, vocab]`, {parameters: row indices}); rows of one
        parameter set are processed together."""
        slots = range(len(logits)) if slots is None else slots
        groups: dict[SamplingParams, list[int]] = {}
        for j, i in enumerate(slots):
            groups.setdefault(self.requests[self.rows[self.active[i]].request].params,
                              []).append(j)
        if len(groups) == 1:
            logp, kept = sampling_distribution(logits, next(iter(groups)))
            return logp, kept, groups
        logp = torch.empty_like(logits, dtype=torch.float32)
        kept = torch.empty_like(logits, dtype=torch.bool)
        for params, pos in groups.items():
            index = torch.as_tensor(pos, dtype=torch.long, device=self.device)
            logp[index], kept[index] = sampling_distribution(logits[index], params)
        return logp, kept, groups

    def draw(self, logp: torch.Tensor, logits: torch.Tensor, groups, slots=None) -> torch.Tensor:
        """One token per row `[n]`: the argmax of `logits` for greedy parameters, else a draw
        from `logp`; rows without a generator of their own share the engine's (one draw over
        them, as `generate` does)."""
        slots = range(len(logits)) if slots is None else slots
        tok = torch.empty(len(logits), dtype=torch.long, device=self.device)
        for params, pos in groups.items():
            index = torch.as_tensor(pos, dtype=torch.long, device=self.device)
            if params.greedy:
                tok[index] = logits[index].float().argmax(-1)
                continue
            gens = [self.rows[self.active[slots[j]]].gen for j in pos]
            shared = [j for j, g in zip(pos, gens) if g is None]
            if shared:
                at = torch.as_tensor(shared, dtype=torch.long, device=self.device)
                tok[at] = draw(logp[at], self.gen)
            for j, gen in zip(pos, gens):
                if gen is not None:
                    tok[j] = draw(logp[j:j + 1], gen)[0]
        return tok

    def finish(self, row: _EngineRow) -> str | None:
        req = self.requests[row.request]
        return _finish_reason(row, self.eos_id, req.stops, req.stop_strings, self.decode)

    def _on_token(self, row_id: int, token: int) -> None:
        row = self.rows[row_id]
        callback = self.requests[row.request].on_token
        if callback is not None:
            callback(row.sample, token)

    def retire(self, positions: list[int], reason: str | None) -> torch.Tensor:
        """Frees the slots at `positions` (their samples are done; `reason` for those without
        a finish reason yet): each is refilled by a running row from the end, so the running
        slots stay 0..k-1. -> the new slot order as old slot indices `[k']` (apply it to any
        per-slot tensor)."""
        k = len(self.active)
        gone = set(positions)
        new_k = k - len(gone)
        holes = [p for p in sorted(gone) if p < new_k]
        movers = [i for i in range(new_k, k) if i not in gone]
        order = list(range(new_k))
        for src, dst in zip(movers, holes):
            order[dst] = src
        for p in gone:
            row = self.rows[self.active[p]]
            row.finish = row.finish or reason or "length"
            req = self.requests[row.request]
            if req.keep and row.finish != "cancelled":  # its state waits for a next turn
                self.parked[self.active[p]] = self.park(p)
            req.retired += 1
            if req.retired == req.n:
                self.finished.append(row.request)
        index = torch.as_tensor(order, dtype=torch.long, device=self.device)
        if gone:
            self.cache.copy_rows(movers, holes)
            self.active = [self.active[i] for i in order]
            if self.logits is not None:
                self.logits = self.logits.index_select(0, index) if new_k else None
        return index

    def park(self, slot: int):
        """A finished sample's cache row, kept aside for its next turn."""
        return self.cache.take([slot])

    # ------------------------------------------------------------------ admission
    def admit(self) -> None:
        """Prefills the queued requests whose samples fit in the free slots, once per prompt,
        into the next slots, and copies each prompt's slot to its other samples.

        While rows are running, a trickle of requests (fewer queued samples than
        `admit_batch` and than the free slots) waits up to `admit_wait` steps for company:
        a prefill forward costs about the same for one prompt as for several, so multi-turn
        rollouts, whose next turns arrive one by one, would otherwise pay a forward each."""
        free = self.max_batch - len(self.active)
        waiting = sum(self.requests[i].n for i in self.queue)
        if self.active and waiting < min(free, self.admit_batch) and \
                self.held < self.admit_wait:
            self.held += bool(waiting)
            return
        self.held = 0
        taken = []
        while self.queue and self.requests[self.queue[0]].n <= free:
            taken.append(self.queue.popleft())
            free -= self.requests[taken[-1]].n
        if not taken:
            return
        feeds, context = self.feeds(taken)
        limit = self.model.cfg.max_seq_len
        budget = [min(self.requests[i].max_new_tokens, limit - c) for i, c in zip(taken, context)]
        self.reserve(max(c + b + 1 for c, b in zip(context, budget)))
        k, m = len(self.active), len(taken)
        parents = [self.requests[i].parent for i in taken]
        for j, row in enumerate(parents):  # a continuation resumes its parked state
            if row is not None:
                self.cache.put([k + j], self.parked.pop(row))
        logits, routes = self.prefill(k, feeds, [row is None for row in parents])
        forks, sources = [], []
        for j, i in enumerate(taken):
            for _ in range(1, self.requests[i].n):
                forks.append(k + m + len(forks))
                sources.append(k + j)
        self.cache.copy_rows(sources, forks)
        prompt_of = list(range(m)) + [s - k for s in sources]  # new slot -> prefilled prompt
        for j in prompt_of:
            self.new_row(taken[j], context[j], budget[j], parents[j],
                         None if routes is None else routes[j, :len(feeds[j])])
        self.admitted(k, logits.index_select(0, torch.as_tensor(prompt_of, device=self.device)),
                      prompt_of)

    def admitted(self, k: int, logits: torch.Tensor, prompt_of: list[int]) -> None:
        """The new slots k.. are filled: `logits` `[new, vocab]` are their next-token logits,
        `prompt_of` the prefilled prompt each slot was copied from."""
        self.logits = logits if k == 0 else torch.cat((self.logits, logits))

    def feeds(self, taken: list[int]) -> tuple[list[list[int]], list[int]]:
        """Per request: the tokens its prefill feeds (the prompt; for a continuation also
        the parent's last token when its row has not been fed it) and the transcript length
        after them."""
        feeds, context = [], []
        for i in taken:
            req = self.requests[i]
            if req.parent is None:
                feeds.append(req.prompt)
                context.append(len(req.prompt))
                continue
            parent = self.rows[req.parent]
            held = int(self.parked[req.parent].lengths[0])
            feeds.append(parent.tokens[held - parent.length:] + req.prompt
                         if held < parent.length else list(req.prompt))
            context.append(parent.length + len(req.prompt))
        return feeds, context

    def new_row(self, request: int, context: int, budget: int, parent: int | None,
                routes: torch.Tensor | None) -> None:
        """The bookkeeping of a newly admitted sample (its slot: the next running one)."""
        req = self.requests[request]
        sample = len(req.rows)
        row = _EngineRow(context, budget, request=request, sample=sample, gen=None if
                         req.seed is None else torch.Generator(device=self.device)
                         .manual_seed(req.seed * 1_000_003 + sample))
        if routes is not None:  # a continuation's routes start with its parent's, up to the
            # tokens its row held (a speculative row re-feeds the ones it had to forget)
            held = context - routes.shape[0]
            row.routes = ([] if parent is None else
                          [torch.cat(self.rows[parent].routes)[:held]]) + [routes]
        req.rows.append(len(self.rows))
        self.rows.append(row)
        self.active.append(len(self.rows) - 1)

    def reserve(self, need: int) -> None:
        """A cache whose rows hold `need` tokens: allocated at the first admission (sized to
        everything queued then), doubled when a later request needs more."""
        limit = self.model.cfg.max_seq_len
        if self.cache is None:
            queued = [len(r.prompt) + r.max_new_tokens + 1
                      for r in map(self.requests.__getitem__, self.queue)]
            size = min(max([need, self.max_len or 0, *queued]), limit)
            self.cache = self.new_slot_cache(size)
        elif need > self.cache.max_len:
            self.cache.grow(min(max(need, 2 * self.cache.max_len), limit))
        self.max_len = self.cache.max_len

    def new_slot_cache(self, size: int):
        return self.model.new_cache(self.max_batch, size)

    def prefill(self, start: int, prompts: list[list[int]], fresh: list[bool]):
        """Right-padded prompts into slots start.. (the `fresh` ones from position 0, the
        others after what their rows hold): (last logits `[m, vocab]`, the prompts' routes
        `[m, width, layers, topk]` or None)."""
        ids, mask, lens = self.padded(prompts)
        for j, new in enumerate(fresh):
            if new:
                self.cache.lengths[start + j] = 0
        view = self.cache.rows(start, start + len(prompts))
        logits, routes = prefill(self.model, ids, mask, lens, view, self.prefill_chunk,
                                 self.return_routes)
        self.cache.set_lengths(start, view.lengths)
        self.stats["prefill_tokens"] += float(lens.sum())
        self.stats["prefills"] += 1
        return logits, routes

    def padded(self, prompts: list[list[int]]):
        """Right-padded ids `[m, width]`, their mask and lengths `[m]`."""
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        width = int(lens.max())
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        return ids, torch.arange(width, device=self.device)[None] < lens[:, None], lens


class _Inference:
    """Eval mode and no_grad for a stretch of engine steps; restores the training flag."""

    def __init__(self, model):
        self.model, self.grad = model, torch.no_grad()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.model.train(self.was_training)
