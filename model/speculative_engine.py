"""MTP speculative decoding inside the rollout engine: continuous batching, shared prompt
prefixes and multi-turn continuation (`model/engine.py`) with the MTP block drafting one token
per row per step and the main model verifying it (`model/speculative.py` is the same rule over
`generate`'s batch-synchronous loop).

    engine = SpeculativeEngine(model, max_batch=32, eos_id=1, temperature=1.0)
    a = engine.add(prompt, n=8, max_new_tokens=64)     # the Engine API, unchanged
    out = engine.run()[a]
    engine.stats["accepted"] / engine.stats["drafted"]   # acceptance rate

Each running slot holds one emitted token its row has not fed yet (`last`) and the main
model's streams at the positions the MTP block has not read yet (`pending`, one or two). A step
(`round`) reads the pending positions with the MTP block (its own slot cache), which gives the
draft distribution q of the token after `last`; draws a draft d from q; feeds `[last, d]` to the
main model in one forward, which gives p at d's position (to check d) and after it; accepts d
with probability min(1, p(d)/q(d)), else draws from the residual max(0, p - q) (greedy: accepts
iff d is p's argmax, else emits that argmax); and, when d was accepted, emits a bonus token
drawn from the second distribution. So a step emits one or two tokens per row, every one
distributed exactly as under plain decoding, and everything returned per token (log-probs, raw
log-probs, kept sets, routes of the fed tokens) is the main model's at the step that emitted it.
A rejected draft has been written to the main cache and is forgotten by `rewind`.

Admission: a prompt is prefilled once (the MTP block reads each chunk's streams as the chunk
is done: position i reads prompt token i + 1), then forked to its samples, and each sample
draws its first token from the prefill's logits; the MTP position of the last prompt token,
which reads that token, is the sample's first pending position.

Routes: a row that finishes on a token it has not fed stays one more step to feed it alone (no
draft), as `generate` does. Parking (`keep=True`): the pending positions of a finished row are
read into its parked MTP row, and its main row is rewound to the MTP row's length (at most the
one token whose successor is not known yet); the continuation feeds that token again with the
next turn's tokens (its routes are not counted twice).

Speculative steps run eager (`compile` is refused: the verify chunk's accept/reject makes
lengths data-dependent per row); expert parallelism stays with `generate`'s loop, which
refuses speculation there too.
"""

from __future__ import annotations

import torch

from .engine import Engine
from .generation import emit_step
from .prefill import prefill


class PairedCache:
    """The main model's slot cache and the MTP block's, moved together by the engine's slot
    bookkeeping (forks, refills, parking, growth). `lengths` is the main cache's."""

    def __init__(self, main, mtp):
        self.main, self.mtp = main, mtp

    @property
    def lengths(self) -> torch.Tensor:
        return self.main.lengths

    @property
    def max_len(self) -> int:
        return self.main.max_len

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        self.main.copy_rows(src, dst)
        self.mtp.copy_rows(src, dst)

    def take(self, rows: list[int]) -> "PairedCache":
        return PairedCache(self.main.take(rows), self.mtp.take(rows))

    def put(self, slots: list[int], other: "PairedCache") -> None:
        self.main.put(slots, other.main)
        self.mtp.put(slots, other.mtp)

    def grow(self, max_len: int) -> None:
        self.main.grow(max_len)
        self.mtp.grow(max_len)


class SpeculativeEngine(Engine):
    def __init__(self, model, *args, **kwargs):
        if kwargs.get("compile"):
            raise ValueError("speculative engine: compile is not supported (its steps run "
                             "eager; see model/speculative_engine.py)")
        if not model.cfg.n_mtp_layers:
            raise ValueError("speculative=True: the model has no MTP block to draft with "
                             "(n_mtp_layers=0)")
        super().__init__(model, *args, **kwargs)
        self.stats.update(drafted=0.0, accepted=0.0)
        cfg, dev = model.cfg, self.device
        self.last = torch.zeros(0, dtype=torch.long, device=dev)     # [k] emitted, not fed
        self.unfed = torch.zeros(0, dtype=torch.bool, device=dev)    # [k] `last` not fed yet
        self.flush = torch.zeros(0, dtype=torch.bool, device=dev)    # [k] feed `last` alone
        self.pend_streams = torch.zeros(0, 2, cfg.hc_mult, cfg.dim, device=dev,
                                        dtype=model.embed.weight.dtype)  # [k, 2, hc, dim]
        self.pend_ids = torch.zeros(0, 2, dtype=torch.long, device=dev)   # [k, 2]
        self.pend_valid = torch.zeros(0, 2, dtype=torch.bool, device=dev)  # [k, 2]
        self.tail = None  # [m, hc, dim]: the streams at each prefilled prompt's last token

    # ------------------------------------------------------------------ slots
    def new_slot_cache(self, size: int) -> PairedCache:
        return PairedCache(self.model.new_cache(self.max_batch, size),
                           self.model.new_cache(self.max_batch, size, mtp=True))

    def reserve(self, need: int) -> None:
        super().reserve(need + 1)  # a step writes the draft one past the row's last token

    def _slot_state(self) -> list[str]:
        return ["last", "unfed", "flush", "pend_streams", "pend_ids", "pend_valid"]

    def retire(self, positions: list[int], reason: str | None) -> torch.Tensor:
        index = super().retire(positions, reason)
        if positions:
            for name in self._slot_state():
                setattr(self, name, getattr(self, name).index_select(0, index))
        return index

    def park(self, slot: int) -> PairedCache:
        """The row's pending MTP positions read into its parked MTP row; the main row rewound
        to the MTP row's length (module docstring)."""
        row = self.cache.take([slot])
        valid = self.pend_valid[slot:slot + 1]
        count = valid.sum(1)
        if bool(count.any()):
            self.model.mtp_draft(self.pend_streams[slot:slot + 1], self.pend_ids[slot:slot + 1],
                                 row.mtp, valid, (count - 1)[:, None])
        row.main.lengths = torch.minimum(row.main.lengths, row.mtp.lengths)
        return row

    # ------------------------------------------------------------------ admission
    def prefill(self, start: int, prompts: list[list[int]], fresh: list[bool]):
        """The main prefill (`Engine.prefill`) with the MTP block reading each chunk's
        streams at the positions whose next token is in the prompt; keeps the streams at
        every prompt's last token (`tail`) for its samples' first MTP position."""
        ids, mask, lens = self.padded(prompts)
        m, (main, mtp) = len(prompts), (self.cache.main, self.cache.mtp)
        for j, new in enumerate(fresh):
            if new:
                main.lengths[start + j] = mtp.lengths[start + j] = 0
        view, draft_view = main.rows(start, start + m), mtp.rows(start, start + m)
        last = lens - 1                                                  # [m]
        rows = torch.arange(m, device=self.device)
        self.tail = None

        def read(out, a: int, b: int) -> None:
            cols = torch.arange(a, b, device=self.device)
            valid = mask[:, a:b] & (cols[None] < last[:, None])          # [m, b - a]
            nxt = torch.cat((ids[:, a + 1:b + 1], ids[:, :max(0, b + 1 - ids.shape[1])]), 1)
            self.model.mtp_draft(out.streams, nxt, draft_view, valid,
                                 torch.zeros(m, 1, dtype=torch.long, device=self.device))
            here = out.streams[rows, (last - a).clamp(0, b - a - 1)]    # [m, hc, dim]
            inside = ((last >= a) & (last < b))[:, None, None]
            self.tail = here if self.tail is None else torch.where(inside, here, self.tail)

        logits, routes = prefill(self.model, ids, mask, lens, view, self.prefill_chunk,
                                 self.return_routes, on_chunk=read)
        main.set_lengths(start, view.lengths)
        mtp.set_lengths(start, draft_view.lengths)
        self.stats["prefill_tokens"] += float(lens.sum())
        self.stats["prefills"] += 1
        return logits, routes

    def admitted(self, k: int, logits: torch.Tensor, prompt_of: list[int]) -> None:
        """The new slots draw their first token from the prefill's logits; the last prompt
        position, which reads it, becomes their pending MTP position."""
        slots = list(range(k, len(self.active)))
        rows = self.active[k:]
        for r in rows:
            if self.rows[r].limit == 0:
                self.rows[r].finish = "length"
        logp, kept, tok = self.sample(logits, slots)
        emit_step(self.rows, rows, [True] * len(rows), tok, logp, kept, logits, self.finish,
                  self._on_token, self.return_logprobs, self.store_kept)
        self.keep_top_logprobs(logits, slots)
        self.stats["decode_tokens"] += sum(self.rows[r].limit > 0 for r in rows)
        n = len(slots)
        tail = self.tail.index_select(0, torch.as_tensor(prompt_of, device=self.device))
        new = dict(last=tok, unfed=torch.ones(n, dtype=torch.bool, device=self.device),
                   flush=torch.zeros(n, dtype=torch.bool, device=self.device),
                   pend_streams=torch.stack((tail, torch.zeros_like(tail)), 1),
                   pend_ids=torch.stack((tok, torch.full_like(tok, self.pad)), 1),
                   pend_valid=torch.tensor([[True, False]] * n, device=self.device))
        for name in self._slot_state():
            setattr(self, name, torch.cat((getattr(self, name), new[name])))

    # ------------------------------------------------------------------ one step
    def step(self) -> list[int]:
        """Admits what fits, settles finished rows, and runs one draft-and-verify round for
        the others. -> the requests that finished since the last call (`Engine.step`)."""
        self.admit()
        self.settle()
        if self.active:
            self.round()
        finished, self.finished = self.finished, []
        return finished

    def settle(self) -> None:
        """Finished rows leave, except (with routes) one whose last token is not fed yet: it
        stays for one step that feeds it alone."""
        gone = []
        for i, r in enumerate(self.active):
            row = self.rows[r]
            if row.limit == 0 or row.finish is not None:
                if self.return_routes and bool(self.unfed[i]) and row.limit > 0:
                    self.flush[i] = True
                else:
                    gone.append(i)
        self.retire(gone, "length")

    def round(self) -> None:
        k = len(self.active)
        q_logits = self.mtp_step(k)
        q_logp, _, groups = self.distribution(q_logits)
        draft = self.draw(q_logp, q_logits, groups)                      # [k]
        flushing = self.flush
        chunk = torch.stack((self.last, draft), 1)                       # [k, 2]
        valid = torch.stack((torch.ones_like(flushing), ~flushing), 1)
        view = self.cache.main.rows(0, k)
        out = self.model(chunk, token_mask=valid, cache=view, keep_streams=True)
        check, after = out.logits[:, 0], out.logits[:, 1]                # [k, vocab]
        p_logp, p_kept, groups = self.distribution(check)
        accept, fix = self.verify(draft, q_logp, p_logp, check, groups)
        accept &= ~flushing
        second = torch.where(accept, draft, fix)
        view.lengths = view.lengths - (~accept & ~flushing).long()       # forget rejected drafts
        self.cache.main.set_lengths(0, view.lengths)
        a_logp, a_kept, _ = self.distribution(after)
        bonus = self.draw(a_logp, after, groups)
        accepted = accept.tolist()
        self.stats["drafted"] += float((~flushing).sum())
        self.stats["accepted"] += sum(accepted)
        self.stats["steps"] += 1
        if self.return_routes:  # the fed `last` always, the draft where it was accepted
            fed = torch.stack(out.routes[:self.model.cfg.n_layers], dim=2).cpu()  # [k, 2, L, t]
            for i, r in enumerate(self.active):
                self.rows[r].routes.append(fed[i, :1 + accepted[i]])
        alive = (~flushing).tolist()
        self.emit(alive, second, p_logp, p_kept, check)
        more = [alive[i] and accepted[i] and self.rows[r].finish is None
                for i, r in enumerate(self.active)]
        self.emit(more, bonus, a_logp, a_kept, after)
        more_t = torch.as_tensor(more, dtype=torch.bool, device=self.device)
        self.last = torch.where(more_t, bonus, second)
        self.unfed = ~flushing & (~accept | more_t)
        self.pend_streams = out.streams                                  # [k, 2, hc, dim]
        self.pend_ids = torch.stack((second, bonus), 1)
        self.pend_valid = torch.stack((~flushing, accept & more_t), 1)

    def mtp_step(self, k: int) -> torch.Tensor:
        """The MTP block over every slot's pending positions -> the draft logits `[k, vocab]`
        for the token after `last`."""
        view = self.cache.mtp.rows(0, k)
        count = self.pend_valid.sum(1)
        q = self.model.mtp_draft(self.pend_streams, self.pend_ids, view, self.pend_valid,
                                 (count - 1).clamp(min=0)[:, None])[:, 0]
        self.cache.mtp.set_lengths(0, view.lengths)
        return q

    def verify(self, draft, q_logp, p_logp, check, groups):
        """(accepted `[k]` bool, the replacement token `[k]`): the speculative-sampling rule
        per row under its request's parameters (module docstring)."""
        target = check.float().argmax(-1)
        if all(params.greedy for params in groups):  # no draws: accept iff it is the argmax
            return draft == target, target
        k = len(draft)
        greedy = torch.zeros(k, dtype=torch.bool, device=self.device)
        for params, pos in groups.items():
            if params.greedy:
                greedy[torch.as_tensor(pos, dtype=torch.long, device=self.device)] = True
        u = self.uniform(k)
        pick = draft[:, None]
        sampled = u.log() < (p_logp.gather(1, pick) - q_logp.gather(1, pick))[:, 0]
        accept = torch.where(greedy, draft == target, sampled)
        p, q = p_logp.exp(), q_logp.exp()
        residual = (p - q).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
        return accept, self.draw(residual.log(), check, groups)

    def uniform(self, k: int) -> torch.Tensor:
        """One U(0, 1) per slot `[k]`, from the row's own generator where it has one."""
        gens = [self.rows[r].gen for r in self.active]
        u = torch.rand(k, generator=self.gen, device=self.device)
        for i, gen in enumerate(gens):
            if gen is not None:
                u[i] = torch.rand(1, generator=gen, device=self.device)[0]
        return u

    def emit(self, which: list[bool], tokens, logp, kept, logits) -> None:
        emit_step(self.rows, self.active, which, tokens, logp, kept, logits, self.finish,
                  self._on_token, self.return_logprobs, self.store_kept)
        self.keep_top_logprobs(logits)
        self.stats["decode_tokens"] += sum(which)
