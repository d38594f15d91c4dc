"""A rollout engine: continuous batching and shared prompt prefixes over the training model's
cached forward (issue #38, first part; `generate` remains the batch-synchronous API).

    engine = Engine(model, max_batch=32, eos_id=1, temperature=0.0)
    a = engine.add([0, 17, 4], n=8, max_new_tokens=64)   # one prompt, eight samples
    b = engine.add([0, 9], max_new_tokens=16)
    results = engine.run()          # {request id: GenerationOutput with one row per sample}

Requests wait in a queue. Before every decode step the engine admits queued requests while
their samples fit in the free rows (`max_batch` rows in all; FIFO, so a large request is not
starved by small ones behind it): their prompts are prefilled together once
(`model/prefill.py`), and each prompt's cache row is forked to its n samples
(`ModelCache.select` with the row repeated: the samples share the prompt's computation and then
sample independently). The new rows join the running batch (`ModelCache.extend`); a row that
finishes (EOS, a stop sequence, its length limit) leaves at once, so its place is taken at the
next step instead of waiting for the longest row of a batch.

Cache rows are `max_len` tokens: given, or at the first admission what the queued requests
need (prompt + max_new_tokens); a request added later that needs more is cut at `max_len`
(finish "length").

Per-token outputs are those of `generate` (`model.generation.emit_step`): the drawn tokens and,
with `return_logprobs`, their log-probs under the sampling distribution and the model's own.
Sampling parameters are the engine's unless a request gives its own (rows are grouped by
parameters each step). Draws come from the engine's generator (`seed`), so they depend on which
rows share a step, unless a request gives its own `seed`: its samples then draw from their own
generators and do not depend on the other requests. Greedy decoding equals `generate`'s token
for token. Not yet here (the rest of #38): routes and kept sets, tool turns, a static-shape
compiled decode step, the server.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .generation import GenerationOutput, _check_prompts, _finish_reason, _Row, _stack, emit_step
from .prefill import DEFAULT_CHUNK, prefill
from .sampling import SamplingParams, draw, sampling_distribution


@dataclass
class _Request:
    prompt: list[int]
    n: int
    max_new_tokens: int
    params: tuple[float, float, int]   # (temperature, top_p, top_k)
    seed: int | None
    rows: list[_Row] = field(default_factory=list)  # one per sample, once admitted


class Engine:
    def __init__(self, model, max_batch: int = 32, eos_id: int | None = None,
                 pad_id: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, return_logprobs: bool = False,
                 stop_token_sequences=None, max_len: int | None = None,
                 prefill_chunk: int | None = DEFAULT_CHUNK):
        self.model, self.max_batch, self.eos_id = model, max_batch, eos_id
        self.params = SamplingParams(temperature, top_p, top_k)
        self.params.validate()
        cfg = model.cfg
        self.pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        # the cache rows' size: given, or set at the first admission to what the queued
        # requests need (a cache sized to the model context would make every row fork and
        # retirement copy mostly empty slots)
        self.max_len = min(max_len, cfg.max_seq_len) if max_len else None
        self.device = model.embed.weight.device
        self.gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None \
            else None
        self.return_logprobs, self.prefill_chunk = return_logprobs, prefill_chunk
        self.stops = [list(s) for s in (stop_token_sequences or []) if len(s)]
        self.queue: deque[int] = deque()
        self.requests: list[_Request] = []
        self.rows: list[_Row] = []        # every sample's row, admitted or finished
        self.row_params: list[tuple] = []  # per row: (temperature, top_p, top_k)
        self.row_gen: list[torch.Generator | None] = []  # per row: its own draws (seeded)
        self.active: list[int] = []       # cache row -> index into self.rows
        self.cache = None
        self.logits: torch.Tensor | None = None  # [active, vocab]: each row's next-token logits
        self.stats = {"prefill_tokens": 0.0, "decode_tokens": 0.0, "steps": 0.0}

    def add(self, prompt: list[int], n: int = 1, max_new_tokens: int = 256,
            temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, seed: int | None = None) -> int:
        """Queues a request of `n` samples of `prompt`; returns its id. Sampling parameters
        default to the engine's; with `seed` the request's samples draw from their own
        generators (seed, sample index), so they do not depend on the other requests."""
        base = self.params
        params = SamplingParams(base.temperature if temperature is None else temperature,
                                base.top_p if top_p is None else top_p,
                                base.top_k if top_k is None else top_k)
        params.validate()
        _check_prompts([prompt], self.model.cfg)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n}: must be in [1, max_batch={self.max_batch}]")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        if self.max_len is not None and len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens: no room in max_len={self.max_len}")
        self.requests.append(_Request(list(prompt), n, max_new_tokens,
                                      (params.temperature, params.top_p, params.top_k), seed))
        self.queue.append(len(self.requests) - 1)
        return len(self.requests) - 1

    def run(self) -> dict[int, GenerationOutput]:
        """Steps until every request has finished; one output per request."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                while self.queue or self.active:
                    self.step()
        finally:
            self.model.train(was_training)
        return {i: self.output(i) for i in range(len(self.requests))}

    def output(self, request: int) -> GenerationOutput:
        rows = self.requests[request].rows
        out = GenerationOutput(tokens=[r.tokens for r in rows],
                               finish_reasons=[r.finish or "length" for r in rows],
                               stats=dict(self.stats))
        if self.return_logprobs:
            out.logprobs = [_stack(r.logprobs) for r in rows]
            out.raw_logprobs = [_stack(r.raw) for r in rows]
        return out

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """Admits what fits, draws one token for every running row, retires finished rows,
        and runs the forward that gives the remaining rows their next logits."""
        self.admit()
        if not self.active:
            return
        self.retire([i for i, r in enumerate(self.active) if self.rows[r].limit == 0], "length")
        if not self.active:
            return
        logp, kept, tok = self.sample()
        emit_step(self.rows, self.active, [True] * len(self.active), tok, logp, kept,
                  self.logits, self.finish, None, self.return_logprobs, False)
        self.stats["decode_tokens"] += len(self.active)
        self.stats["steps"] += 1
        keep = [i for i, r in enumerate(self.active) if self.rows[r].finish is None]
        self.retire([i for i in range(len(self.active)) if i not in keep], None)
        if self.active:
            tok = tok[torch.as_tensor(keep, dtype=torch.long, device=self.device)]
            self.logits = self.model(tok[:, None], cache=self.cache).logits[:, 0]

    def sample(self):
        """(log-probs, kept mask, drawn tokens) `[active, vocab]`, `[active, vocab]`, `[active]`
        for the running rows, each under its request's parameters; rows of one parameter set
        are processed together, and rows without a generator of their own share the engine's
        (one draw over them, as `generate` does)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.active):
            groups.setdefault(self.row_params[r], []).append(i)
        logits = self.logits
        if len(groups) == 1:
            (key, pos), = groups.items()
            logp, kept = sampling_distribution(logits, SamplingParams(*key))
        else:
            logp = torch.empty_like(logits, dtype=torch.float32)
            kept = torch.empty_like(logits, dtype=torch.bool)
        tok = torch.empty(len(self.active), dtype=torch.long, device=self.device)
        for key, pos in groups.items():
            index = torch.as_tensor(pos, dtype=torch.long, device=self.device)
            params = SamplingParams(*key)
            if len(groups) > 1:
                logp[index], kept[index] = sampling_distribution(logits[index], params)
            if params.greedy:
                tok[index] = logits[index].float().argmax(-1)
                continue
            own = [i for i in pos if self.row_gen[self.active[i]] is not None]
            shared = [i for i in pos if self.row_gen[self.active[i]] is None]
            if shared:
                at = torch.as_tensor(shared, dtype=torch.long, device=self.device)
                tok[at] = draw(logp[at], self.gen)
            for i in own:
                tok[i] = draw(logp[i:i + 1], self.row_gen[self.active[i]])[0]
        return logp, kept, tok

    def finish(self, row: _Row) -> str | None:
        return _finish_reason(row, self.eos_id, self.stops, None, None)

    def retire(self, positions: list[int], reason: str | None) -> None:
        """Removes the cache rows at `positions` (their samples are done)."""
        if not positions:
            return
        for i in positions:
            if reason is not None:
                self.rows[self.active[i]].finish = reason
        keep = [i for i in range(len(self.active)) if i not in set(positions)]
        self.active = [self.active[i] for i in keep]
        if keep:
            index = torch.as_tensor(keep, dtype=torch.long, device=self.device)
            self.cache.select(index)
            self.logits = self.logits.index_select(0, index)
        else:
            self.cache, self.logits = None, None

    def admit(self) -> None:
        """Prefills the queued requests whose samples fit in the free rows, once per prompt,
        forks each prompt's row to its samples and appends them to the running batch."""
        if self.max_len is None:
            need = max(len(r.prompt) + r.max_new_tokens for r in map(self.requests.__getitem__,
                                                                       self.queue))
            self.max_len = min(need + 1, self.model.cfg.max_seq_len)
        taken, free = [], self.max_batch - len(self.active)
        while self.queue and self.requests[self.queue[0]].n <= free:
            taken.append(self.queue.popleft())
            free -= self.requests[taken[-1]].n
        if not taken:
            return
        prompts = [self.requests[i].prompt for i in taken]
        cache, logits = self.prefill(prompts)
        fork = [k for k, i in enumerate(taken) for _ in range(self.requests[i].n)]
        index = torch.as_tensor(fork, dtype=torch.long, device=self.device)
        cache.select(index)
        logits = logits.index_select(0, index)
        limit = self.model.cfg.max_seq_len
        for i in taken:
            req = self.requests[i]
            for j in range(req.n):
                req.rows.append(_Row(len(req.prompt), min(req.max_new_tokens,
                                                          limit - len(req.prompt),
                                                          self.max_len - len(req.prompt))))
                self.rows.append(req.rows[-1])
                self.row_params.append(req.params)
                self.row_gen.append(None if req.seed is None else torch.Generator(
                    device=self.device).manual_seed(req.seed * 1_000_003 + j))
                self.active.append(len(self.rows) - 1)
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.extend(cache)
            self.logits = torch.cat((self.logits, logits))

    def prefill(self, prompts: list[list[int]]):
        """Right-padded prompts into a new cache of `max_len` rows: (cache, last logits)."""
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        width = int(lens.max())
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        mask = torch.arange(width, device=self.device)[None] < lens[:, None]
        cache = self.model.new_cache(len(prompts), self.max_len)
        logits, _ = prefill(self.model, ids, mask, lens, cache, self.prefill_chunk, False)
        self.stats["prefill_tokens"] += float(lens.sum())
        return cache, logits
