"""MTP speculative decoding: the MTP block drafts the next token, the next main forward checks it.

    out = generate(model, prompts, ..., speculative=True)   # same arguments, same outputs
    out.stats["drafted"], out.stats["accepted"]               # acceptance = accepted / drafted

The main model at position t gives the distribution p of token t+1, from which y(t+1) is drawn
as in plain decoding; the MTP block reads the main streams at t and the embedding of y(t+1) and
proposes a draft d for token t+2 from its own distribution q. One main forward of the two tokens
[y(t+1), d] then gives p at t+1 (to check d) and at t+2 (the token after d). The check is the
standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): accept d with
probability min(1, p(d) / q(d)); on rejection draw from the residual max(0, p - q), normalised.
Every emitted token is then distributed exactly as under plain decoding with the same sampling
parameters (temperature, top-k and top-p shape p and q alike). Greedy accepts d iff it is the
main model's argmax and otherwise emits that argmax, so greedy output is plain greedy output
(up to the float differences of a two-token chunk against two one-token steps, which only
matter at exact logit ties). Each round emits one or two tokens for one main forward of two
tokens and one MTP forward of one or two.

Everything returned per token comes from the main model at the step that emitted it: the
log-probs (`logprobs` under the sampled-from distribution p, `raw_logprobs` under its softmax),
the kept sets of p, and the routes of the fed tokens (a rejected draft's routes are discarded;
a row's last token is fed once more, as in plain decoding), so RL replay stays exact.

A rejected draft has already been written to the main cache; `ModelCache.rewind` forgets it.
The MTP block keeps a cache of its own (`new_cache(mtp=True)`) that only ever holds accepted
positions: main and MTP caches have the same length at the start of every round. Expert
parallelism is not supported here yet (`generate` refuses it before any collective).
"""

from __future__ import annotations

import time

import torch

from .generation import emit_step
from .sampling import SamplingParams, draw, sampling_distribution


def speculative_decode(model, prompts, rows, params: SamplingParams, gen, pad: int,
                       finish_reason, on_token, return_logprobs: bool, return_routes: bool,
                       store_kept: bool) -> dict[str, float]:
    """Fills `rows` (`generation._Row`, one per prompt) in place; returns the stats.
    `finish_reason(row)` is plain decoding's stop rule (EOS, stop sequences, length)."""
    cfg, device = model.cfg, model.embed.weight.device
    n_layers, batch = cfg.n_layers, len(prompts)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    width = int(lens.max())
    ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    mask = torch.arange(width, device=device)[None] < lens[:, None]  # [batch, width]
    room = width + max(r.limit for r in rows) + 2  # the last round's draft is one past the end
    cache = model.new_cache(batch, room)
    drafts = model.new_cache(batch, room, mtp=True)
    stats = {"drafted": 0.0, "accepted": 0.0, "decode_tokens": 0.0}

    t0 = time.perf_counter()
    out = model(ids, token_mask=mask, cache=cache, logits_index=(lens - 1)[:, None],
                keep_streams=True)
    if return_routes:
        prompt_routes = torch.stack(out.routes[:n_layers], dim=2).cpu()  # [b, w, layers, k]
        for i, r in enumerate(rows):
            r.routes.append(prompt_routes[i, :r.prompt_len])
    stats["prefill_s"] = time.perf_counter() - t0

    # the first new token comes from the prefill's logits, as in plain decoding
    active = list(range(batch))
    for row in rows:
        if row.limit == 0:
            row.finish = "length"
    logits = out.logits[:, 0]  # [batch, vocab]
    logp, kept = sampling_distribution(logits, params)
    first = logits.float().argmax(-1) if params.greedy else draw(logp, gen)  # [batch]
    emit_step(rows, active, [True] * batch, first, logp, kept, logits, finish_reason, on_token,
               return_logprobs, store_kept)
    stats["decode_tokens"] += sum(r.limit > 0 for r in rows)
    # the MTP block over the whole prompt: position i reads token i + 1 (the new one at the end)
    next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
    next_ids[torch.arange(batch, device=device), lens - 1] = first
    last = first
    flush = [return_routes and rows[r].finish is not None and rows[r].limit > 0 for r in active]
    active, keep = _retire(active, [f or rows[r].finish is None for f, r in zip(flush, active)])
    if not active:
        stats["decode_s"] = time.perf_counter() - t0 - stats["prefill_s"]
        return stats
    index = torch.as_tensor(keep, dtype=torch.long, device=device)
    for c in (cache, drafts):
        c.select(index)
    streams, next_ids, mask, lens = (t.index_select(0, index) for t in (out.streams, next_ids,
                                                                         mask, lens))
    last, flush = last.index_select(0, index), [flush[i] for i in keep]
    mask = mask & ~torch.as_tensor(flush, device=device)[:, None]
    q_logits = model.mtp_draft(streams, next_ids, drafts, mask, (lens - 1)[:, None])[:, 0]

    while active:  # one round: draft, verify, emit one or two tokens per row
        n = len(active)
        flushing = torch.as_tensor(flush, dtype=torch.bool, device=device)  # [n]
        q_logp, _ = sampling_distribution(q_logits, params)
        draft = q_logits.float().argmax(-1) if params.greedy else draw(q_logp, gen)  # [n]
        chunk = torch.stack((last, draft), dim=1)  # [n, 2]
        valid = torch.stack((torch.ones_like(flushing), ~flushing), dim=1)
        out = model(chunk, token_mask=valid, cache=cache, keep_streams=True)
        check, after = out.logits[:, 0], out.logits[:, 1]  # [n, vocab]: p at t+1 and t+2
        p_logp, p_kept = sampling_distribution(check, params)
        a_logp, a_kept = sampling_distribution(after, params)
        pick = draft[:, None]
        if params.greedy:
            accept = draft == check.float().argmax(-1)
            fix = check.float().argmax(-1)
            bonus = after.float().argmax(-1)
        else:  # accept with probability min(1, p/q); else draw from max(0, p - q)
            u = torch.rand(n, generator=gen, device=device)
            accept = u.log() < (p_logp.gather(1, pick) - q_logp.gather(1, pick))[:, 0]
            p, q = p_logp.exp(), q_logp.exp()
            residual = (p - q).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            fix = draw(residual.log(), gen)
            bonus = draw(a_logp, gen)
        accept &= ~flushing
        second = torch.where(accept, draft, fix)  # token t+2
        cache.rewind((~accept & ~flushing).long())  # a rejected draft leaves the main cache
        if return_routes:
            step_routes = torch.stack(out.routes[:n_layers], dim=2).cpu()  # [n, 2, layers, k]
        accepted = accept.tolist()  # the round's host sync, with the emitted ids below
        stats["drafted"] += n - sum(flush)
        stats["accepted"] += sum(accepted)

        alive = [not f for f in flush]
        if return_routes:  # the fed `last` always; the fed draft only where accepted
            for i, row_id in enumerate(active):
                rows[row_id].routes.append(step_routes[i, :1 + accepted[i]])
        emit_step(rows, active, alive, second, p_logp, p_kept, check, finish_reason, on_token,
                   return_logprobs, store_kept)
        more = [alive[i] and accepted[i] and rows[r].finish is None for i, r in enumerate(active)]
        emit_step(rows, active, more, bonus, a_logp, a_kept, after, finish_reason, on_token,
                   return_logprobs, store_kept)
        stats["decode_tokens"] += sum(alive) + sum(more)
        # a row that just finished on a token it has not fed is fed it once more (its routes)
        new_flush = [return_routes and alive[i] and rows[r].finish is not None
                     and not (accepted[i] and not more[i]) for i, r in enumerate(active)]
        retiring = [f or rows[r].finish is not None for f, r in zip(flush, active)]
        still = [nf or not ret for nf, ret in zip(new_flush, retiring)]
        active, keep = _retire(active, still)
        if not active:
            break
        index = torch.as_tensor(keep, dtype=torch.long, device=device)
        more_t = torch.as_tensor(more, dtype=torch.bool, device=device)
        last = torch.where(more_t, bonus, second).index_select(0, index)
        # the MTP block's next positions: t+1 (reading token t+2) always, t+2 (reading the bonus
        # token t+3) where the draft was accepted; nothing for rows that only flush
        flush = [new_flush[i] for i in keep]
        two = (accept & more_t).index_select(0, index)
        one = ~torch.as_tensor(flush, dtype=torch.bool, device=device)
        m_ids = torch.stack((second, bonus), dim=1).index_select(0, index)
        m_valid = torch.stack((one, one & two), dim=1)
        for c in (cache, drafts):
            if len(keep) != n:
                c.select(index)
        q_logits = model.mtp_draft(out.streams.index_select(0, index), m_ids, drafts, m_valid,
                                   two.long()[:, None])[:, 0]
    stats["decode_s"] = time.perf_counter() - t0 - stats["prefill_s"]
    return stats


def _retire(active: list[int], stay: list[bool]) -> tuple[list[int], list[int]]:
    """Keeps batch row i where `stay[i]`: (the rows still in the batch, their old indices)."""
    keep = [i for i in range(len(active)) if stay[i]]
    return [active[i] for i in keep], keep
