"""Multi-teacher on-policy distillation as a `Task` for the trainer core: the batches are the
student's own rollouts (`rl/rollout_task.py`, shared with GRPO), the loss its divergence from
the teacher of each prompt's domain (`distill/loss.py`).

Per rollout, after the student sampled and the verifiers scored (scores are logged, and used
only by the optional task-reward term):

    samples → micro-batches (`rl/rollout_batch.py`; tool-result tokens have loss_mask 0)
    → every teacher whose weight on a row is > 0 reads that row once, frozen, at temperature 1,
      with its own routing: `kl=full|topk` keep its head inputs at the response positions
      (`teacher_hidden/<name>` [N_k, dim_T], with `teacher_tokens/<name>` [N_k] their indices
      among the batch's N response tokens), so the loss applies the teacher's head chunk by
      chunk next to the student's; `kl=sampled` keeps only the mixed log-prob of the sampled
      tokens (`teacher_logp` [b, L-1])

The training forward replays the sampled routes (Keep Routing) and stops before the head
(`forward(head=False)`); the per-token loss is Σ_k w_k·KL(π_θ ‖ π_k) over the kept sets (Keep
Sampling Mask; the whole vocabulary by default), token-mean over response tokens. Optional
terms: `reward_coef` × a GRPO-style task-reward policy gradient (group-mean advantage,
importance-weighted by π_θ/π_old), and `mtp_weight` × the MTP block's KL at position t (which
predicts token t+2) to the teacher's main head at position t+1 (which predicts the same token),
so that speculative decoding with the MTP block stays useful.

The KL is always between the distributions at temperature 1 (the student's sampling
temperature only shapes exploration); `kl=sampled`, the task-reward term and `opsm_delta`
compare π_θ with the sampler's log-probs, so they need temperature 1 (checked at start-up).
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import ModelConfig
from model.sampling import KeptSets
from train.dist import DistInfo
from train.memory import SectionPeak
from rl.logprobs import route_agreement
from rl.objective import stale_keep, surrogate
from rl.rollout_batch import kept_sets, route_list
from rl.rollout_task import RolloutTask
from train.task import EvalResult, LossOutput

from distill.config import teacher_weights
from distill.loss import chunked_reverse_kl, chunked_token_logprobs, sampled_kl_loss


def select_kept(kept: KeptSets | None, index: torch.Tensor) -> KeptSets | None:
    """The rows `index` (1-D, into kept's rows) of a CSR kept-set list."""
    if kept is None:
        return None
    ids, counts = kept.ids.cpu(), kept.counts.cpu().long()
    offsets = torch.cumsum(counts, 0) - counts
    index = index.cpu().long()
    lengths = counts[index]
    starts = torch.repeat_interleave(offsets[index], lengths)
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    return KeptSets(ids[starts + within], lengths.to(torch.int32))


class DistillTask(RolloutTask):
    stage = "distill"
    label_time_key = "time/teacher"

    def __init__(self, cfg, info: DistInfo, model_cfg: ModelConfig, tokenizer_file: str,
                 domains: list[tuple[Any, float]],
                 teachers: dict[str, torch.nn.Module] | None = None, generate_fn=None,
                 teacher_loaders: dict[str, Any] | None = None):
        """`teachers`: {name: frozen model}, or `teacher_loaders`: {name: loader(ep_groups)},
        called once the trainer has built the student (`attach_frozen`), so that under EP each
        teacher is sharded over the student's groups; `domains`: (Domain, weight) of the
        prompts."""
        d = cfg.distill
        super().__init__(cfg, d, info, model_cfg, tokenizer_file, domains, generate_fn)
        self.d = d
        self.train_mtp = d.mtp_weight > 0
        self.update_router_bias = False  # routes are replayed (see rl/grpo_task.py)
        self.teachers = dict(teachers or {})
        self.teacher_loaders = dict(teacher_loaders or {})
        self.teacher_names = sorted({*self.teachers, *self.teacher_loaders})
        self.domain_names = [dom.name for dom, _ in domains]
        self.mix = {name: teacher_weights(d, name) for name in self.domain_names}
        missing = {t for m in self.mix.values() for t in m} - set(self.teacher_names)
        if missing:
            raise ValueError(f"distill: no teacher model for {sorted(missing)} (loaded: "
                             f"{self.teacher_names})")
        self.teacher_scores: dict[str, float] | None = None  # measured once, at the first eval
        self.loss_peak = 0.0  # bytes: the KL terms' peak over this step's micro-batches

    def attach_frozen(self, ep_groups) -> None:
        for name, load in self.teacher_loaders.items():
            self.teachers[name] = load(ep_groups)

    # ------------------------------------------------------------------ rollout → batches
    def to_batches(self, groups: list[list], model, n_micro: int) -> list[list[dict]]:
        samples, advantages = [], []
        for grp in groups:
            mean = sum(s.reward for s in grp) / len(grp)
            for s in grp:
                samples.append(s)
                advantages.append(s.reward - mean if self.d.reward_coef else 0.0)
        batches = []
        for batch, mine in self.collate_shuffled(samples, advantages, [0.0] * len(samples)):
            names = [s.domain for s in mine]
            batch["domain_id"] = torch.tensor([self.domain_names.index(n) for n in names])
            batch["teacher_w"] = torch.tensor([[self.mix[n].get(t, 0.0)
                                                for t in self.teacher_names] for n in names])
            batches.append(batch)
        with torch.no_grad():
            for batch in batches:
                self.teacher_pass(batch)
        return self.split_updates(batches, n_micro)

    def teacher_pass(self, batch: dict[str, Any]) -> None:
        """Each teacher reads the rows it teaches; what the loss needs of it goes into `batch`."""
        device = self.info.device
        sel = batch["gen_mask"] > 0                                   # [b, L-1]
        row_of_token = sel.nonzero()[:, 0]                            # [N]
        targets = batch["input_ids"][:, 1:][sel]                      # [N]
        kept = kept_sets(batch)
        mixed = torch.zeros(sel.shape)                                # [b, L-1]
        for k, name in enumerate(self.teacher_names):
            rows = batch["teacher_w"][:, k] > 0                       # [b]
            if not rows.any() and not self.collective:
                continue
            # under EP a teacher's forward is a collective: every rank runs it, on all its rows
            read = torch.ones_like(rows) if self.collective else rows
            teacher = self.teachers[name]
            out = teacher(batch["input_ids"][read].to(device),
                          token_mask=batch["token_mask"][read].to(device), mtp=False, head=False)
            hidden = out.hidden[:, :-1][(sel & rows[:, None])[read].to(device)]  # [N_k, dim_T]
            tokens = rows[row_of_token].nonzero()[:, 0]               # [N_k] into N
            if self.d.kl == "sampled":
                logp = chunked_token_logprobs(hidden, teacher.head.weight, targets[tokens],
                                              kept=select_kept(kept, tokens),
                                              chunk=self.d.kl_chunk)
                w = batch["teacher_w"][row_of_token[tokens], k]
                flat = mixed[sel]
                flat[tokens] += w * logp.cpu()
                mixed[sel] = flat
            else:
                batch[f"teacher_hidden/{name}"] = hidden.cpu()
                batch[f"teacher_tokens/{name}"] = tokens
        if self.d.kl == "sampled":
            batch["teacher_logp"] = mixed

    # ------------------------------------------------------------------ loss
    def count(self, batch: dict[str, Any]) -> float:
        return float(batch["loss_mask"].sum())

    def loss(self, model, batch: dict[str, Any]) -> LossOutput:
        cfg, d = self.model_cfg, self.d
        routes = route_list(batch, cfg.n_layers, cfg.n_mtp_layers)
        out = model(batch["input_ids"], token_mask=batch["token_mask"], routes=routes,
                    mtp=self.train_mtp, head=False)
        head = getattr(model, "module", model).head.weight           # [vocab, dim]
        sel = batch["gen_mask"] > 0                                   # [b, L-1]
        row_of_token = sel.nonzero()[:, 0]                            # [N]
        weight = batch["loss_mask"][sel]                              # [N] 1 = trained
        hidden = out.hidden[:, :-1][sel]                              # [N, dim]
        targets = batch["input_ids"][:, 1:][sel]                      # [N]
        kept = kept_sets(batch)
        old = batch["old_logp"][sel]                                  # [N] the sampler's
        logp = None
        if d.kl == "sampled" or d.reward_coef or d.opsm_delta:
            logp = chunked_token_logprobs(hidden, head, targets, kept=kept, chunk=d.kl_chunk)
        if d.kl == "sampled":
            teacher = batch["teacher_logp"][sel]
            per_token = sampled_kl_loss(logp, old, teacher)
            kl = (old - teacher).detach()                             # the sampled estimate
        else:
            per_token = self.measured(self.teacher_kl, hidden, head, batch, kept, row_of_token)
            kl = per_token.detach()
        if d.reward_coef:  # GRPO's policy-gradient term, unclipped (rl/objective.py)
            adv = batch["advantages"][row_of_token]
            per_token = per_token - d.reward_coef * surrogate(torch.exp(logp - old), adv)
        if d.opsm_delta:  # μ > 1: a sequence whose prefix went stale teaches the wrong policy
            stale = torch.zeros(sel.shape[0], device=hidden.device)
            stale = stale.index_add(0, row_of_token, (old - logp).detach())
            stale = stale / sel.sum(1).clamp_min(1)
            weight = weight * stale_keep(stale, d.opsm_delta)[row_of_token]
        total = (per_token * weight).sum()
        metrics = {"kl": (kl * weight).sum()}
        if self.train_mtp:
            mtp = self.measured(self.mtp_kl, out.mtp_hidden[0], head, batch, kept, sel)
            total = total + d.mtp_weight * mtp
            metrics["mtp_kl"] = mtp.detach()
        domain = batch["domain_id"][row_of_token]
        for i, name in enumerate(self.domain_names):
            mine = (domain == i).float() * weight
            metrics[f"kl/{name}"] = (kl * mine).sum()
            metrics[f"tokens/{name}"] = mine.sum()
        if d.opsm_delta:
            metrics["opsm_masked"] = (batch["loss_mask"][sel] - weight).sum()
        if routes is not None:
            agree = route_agreement(batch["routes"], out.live_routes)[sel]
            metrics["routing_agreement"] = (agree * weight).sum()
        return LossOutput(total, metrics, out.expert_counts)

    def teacher_kl(self, hidden, head, batch, kept, row_of_token) -> torch.Tensor:
        """[N] Σ_k w_k·KL(π_θ ‖ π_k) at each response token (full or top-k)."""
        per_token = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        for k, name in enumerate(self.teacher_names):
            key = f"teacher_tokens/{name}"
            if key not in batch:
                continue
            tokens = batch[key]
            w = batch["teacher_w"][row_of_token[tokens], k]
            kl = chunked_reverse_kl(hidden[tokens], head, batch[f"teacher_hidden/{name}"],
                                    self.teachers[name].head.weight,
                                    kept=select_kept(kept, tokens), chunk=self.d.kl_chunk,
                                    mode=self.d.kl, k=self.d.topk)
            per_token = per_token.index_add(0, tokens, w * kl)
        return per_token

    def mtp_kl(self, mtp_hidden, head, batch, kept, sel) -> torch.Tensor:
        """Σ over positions t with response tokens t+1 and t+2 of the MTP block's KL at t to the
        teacher's main head at t+1 (both predict token t+2), weighted like the main KL."""
        n = int(sel.sum())
        pos = torch.full(sel.shape, -1, dtype=torch.long, device=sel.device)
        pos[sel] = torch.arange(n, device=sel.device)                 # [b, L-1] → token index
        both = sel[:, :-1] & sel[:, 1:]                               # [b, L-2]
        student = mtp_hidden[:, :-2][both]                            # [M, dim]
        nxt = pos[:, 1:][both]                                        # [M] token t+1's index
        row_of_token = sel.nonzero()[:, 0]
        total = student.new_zeros((), dtype=torch.float32)
        for k, name in enumerate(self.teacher_names):
            key = f"teacher_tokens/{name}"
            if key not in batch:
                continue
            inv = torch.full((n,), -1, dtype=torch.long, device=sel.device)
            inv[batch[key]] = torch.arange(batch[key].numel(), device=sel.device)
            rows = inv[nxt]
            ok = rows >= 0
            if not ok.any():
                continue
            kl = chunked_reverse_kl(student[ok], head, batch[f"teacher_hidden/{name}"][rows[ok]],
                                    self.teachers[name].head.weight,
                                    kept=select_kept(kept, nxt[ok]), chunk=self.d.kl_chunk,
                                    mode="topk" if self.d.kl == "topk" else "full",
                                    k=self.d.topk)
            w = batch["teacher_w"][row_of_token[nxt[ok]], k] * batch["loss_mask"][sel][nxt[ok]]
            total = total + (w * kl).sum()
        return total

    def measured(self, kl_fn, hidden, *args) -> torch.Tensor:
        """`kl_fn(hidden, *args)`, its tensors' peak kept for this step's `memory/loss_peak_gib`."""
        with SectionPeak(hidden.device) as peak:
            out = kl_fn(hidden, *args)
        self.loss_peak = max(self.loss_peak, peak.bytes)
        return out

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """The rollout's metrics plus `memory/loss_peak_gib`: the most the full/top-k KL's own
        tensors held at once in one micro-batch's forward (`train/memory.py`; one chunk of
        `[tokens, vocab]` logits per model, not the batch's). The checkpointed backward
        recomputes one chunk at a time, so its peak is of the same size (tests/distill)."""
        m = super().step_metrics(step_seconds)
        if self.loss_peak:
            m["memory/loss_peak_gib"] = self.loss_peak / 2**30
        self.loss_peak = 0.0
        return m

    def derive_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """KL per domain = (its KL sum) / (its token count); both arrive divided by the same
        global count, which cancels."""
        out = {}
        for name in self.domain_names:
            tokens = metrics.get(f"tokens/{name}", 0.0)
            if tokens > 0:
                out[f"kl/{name}"] = metrics[f"kl/{name}"] / tokens
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, step: int) -> EvalResult:
        from train.evaluate import stage_evaluation

        result = super().evaluate(model, step)
        if not self.d.eval_n:
            return result
        if self.teacher_scores is None:
            self.teacher_scores = {}
            if self.d.eval_teachers:
                for name in self.domain_names:
                    mix = self.mix[name]
                    teacher = max(mix, key=mix.get)
                    dom = [dm for dm, _ in self.domains if dm.name == name]
                    r = stage_evaluation(self.teachers[teacher], self.tokenizer, dom, self.d.eval_n,
                                         self.d.eval_max_new_tokens, self.cfg, self.info, step)
                    self.teacher_scores[name] = r.metrics.get(f"eval/{name}/pass@1", 0.0)
        lines = ["student vs teacher (greedy pass@1, test split):"]
        for name, score in self.teacher_scores.items():
            result.metrics[f"eval/{name}/teacher_pass@1"] = score
            student = result.metrics.get(f"eval/{name}/pass@1", float("nan"))
            lines.append(f"  {name:<12} student {student:.3f}  teacher {score:.3f}")
        if self.teacher_scores:
            result.messages.append("\n".join(lines))
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher_scores": self.teacher_scores}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.teacher_scores = state.get("teacher_scores")
