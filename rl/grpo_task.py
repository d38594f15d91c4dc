"""GRPO as a `Task` for the trainer core (`train/task.py`): the batches are rollouts with the
current weights, the loss is DeepSeek-V3.2's objective (`rl/objective.py`).

One rollout, at the step boundary before the first of its μ updates (`batches`):

    prompts (this rank's B/world, train split, mixed by domain weight)
    → G samples each through `train.rollout.rollout` → `model.generation.generate`, in-process,
      with the weights being trained (eval mode, no grad, MTP skipped): tokens, the sampler's
      processed log-probs, the routes of every MoE layer, the kept-token sets
    → rewards (`rl/rewards.py`: verifier under a time limit, optional length / overlong shaping)
    → group advantages; dynamic sampling (optional) refills zero-variance groups
    → overlong handling; π_ref log-probs (β > 0); π_old recomputed (optional)
    → shuffled, cut into μ mini-batches × n_micro micro-batches (`rl/batch.py`)

Each optimizer step then takes the next mini-batch. The training forward replays the sampled
routes (Keep Routing: expert ids fixed, routing weights from the live router, which keeps its
gradient) and renormalises π_θ over the sampled kept sets (Keep Sampling Mask) at the sampling
temperature, so π_θ and π_old are distributions over the same support. π_old defaults to the
sampler's log-probs: the same model code sampled them, so at the first update of a rollout the
ratio is 1 up to fp32 rounding (the cached decode and the full forward sum in different orders);
`grpo.recompute_old_logprobs=true` recomputes π_old with the training forward instead (ratio
exactly 1 at the first update, bitwise, on a deterministic device).

The reference policy (β > 0) is a frozen copy of the starting weights (`grpo.ref`, default
`init_from`), loaded by `train.init.load_frozen_model`; its log-probs are taken with its own
routing (it is a different model; replaying the policy's routes would evaluate a policy that
never existed) over the same kept sets and temperature, so ρ = π_ref/π_θ compares distributions
on one support. β = 0 never loads it.

MoE during RL: router-bias updates are off by default (`grpo.router_bias_updates`): with Keep
Routing the trained experts are the sampled ones, and moving the biases between rollout and
update would make the live router disagree with the replayed routes for reasons unrelated to
learning (the routing-agreement metric would measure the bias schedule). The MTP block is
skipped in rollouts and in training unless `grpo.train_mtp`.

Resume: the task's state (prompt cursor, rollout count, and the not-yet-used mini-batches of
the current rollout) is saved with every checkpoint on every rank, so a resumed run continues
with the same mini-batches an uninterrupted one would have used.

Limitation: expert parallelism (`parallel.ep_size > 1`) is rejected at start-up for GRPO; the
rollout's tool rounds and refill rounds are not yet agreed across an EP group.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from data.domains.base import draw_rng
from model.config import ModelConfig
from model.sampling import SamplingParams, logprobs_over_kept, restricts
from train.dist import DistInfo, all_reduce_sum, any_rank
from train.recipe import Phase
from train.rollout import RolloutParams, rollout
from train.task import EvalResult, LossOutput

from .batch import collate, kept_sets, route_list
from .objective import ObjectiveConfig, aggregate, group_advantages, grpo_loss, unit_count
from .rewards import shaped_reward, timed_verify


def token_logprobs(model, batch: dict[str, Any], temperature: float, routes=None,
                   entropy: bool = False):
    """(log π [b, L-1] fp32 at the generated positions (0 elsewhere), renormalised over the kept
    sets at `temperature`; entropy [b, L-1] of that distribution over the full vocabulary, or
    None; the forward's output)."""
    out = model(batch["input_ids"], token_mask=batch["token_mask"], routes=routes, mtp=False)
    logits = out.logits[:, :-1]                                  # [b, L-1, vocab]
    sel = batch["gen_mask"] > 0                                  # [b, L-1]
    targets = batch["input_ids"][:, 1:][sel]                     # [N]
    picked = logits[sel]                                         # [N, vocab]
    lp = logprobs_over_kept(picked, targets, kept_sets(batch), temperature)  # [N] fp32
    logp = torch.zeros(sel.shape, dtype=torch.float32, device=lp.device)
    logp = logp.masked_scatter(sel, lp)
    ent = None
    if entropy:
        with torch.no_grad():
            z = torch.log_softmax(picked.float() / temperature, dim=-1)  # [N, vocab]
            ent = torch.zeros_like(logp).masked_scatter(sel, -(z.exp() * z).sum(-1))
    return logp, ent, out


class GRPOTask:
    def __init__(self, cfg, info: DistInfo, model_cfg: ModelConfig, tokenizer_file: str,
                 domains: list[tuple[Any, float]], ref_model=None, generate_fn=None):
        """`generate_fn`: `model.generation.generate` (default) or a stand-in with its
        signature (tests script a policy with it)."""
        from encoding.tokenizer import load_tokenizer

        g = cfg.grpo
        self.cfg, self.g, self.info, self.model_cfg = cfg, g, info, model_cfg
        self.tokenizer_file = tokenizer_file
        self.tokenizer = load_tokenizer(tokenizer_file)
        self.domains = domains
        self.train_mtp = g.train_mtp
        self.update_router_bias = g.router_bias_updates
        self.ref_model = ref_model
        self.generate_fn = generate_fn
        self.objective = ObjectiveConfig(clip_low=g.clip_low, clip_high=g.clip_high,
                                         beta=g.beta, kl_unbiased=g.kl_unbiased,
                                         opsm_delta=g.opsm_delta, loss_agg=g.loss_agg,
                                         norm_len=g.max_new_tokens)
        self.objective.validate()
        sampling = SamplingParams(g.temperature, g.top_p, g.top_k)
        self.params = RolloutParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                    max_new_tokens=g.max_new_tokens, n=g.group_size,
                                    batch_size=g.rollout_batch_size,
                                    max_tool_turns=g.max_tool_turns,
                                    return_routes=g.keep_routing,
                                    return_sampling_mask=restricts(sampling,
                                                                   model_cfg.vocab_size))
        self.params.validate()
        self.local_prompts = g.prompts_per_step // info.world
        self.cursor = 0      # global prompt index of the next draw
        self.rollouts = 0
        self.buffer: list[list[dict[str, Any]]] = []  # mini-batches left of this rollout
        self.pending_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ prompts
    def prompt(self, index: int):
        """The `index`-th prompt of the run: a domain by weight, then its train-split item."""
        weights = [w for _, w in self.domains]
        rng = draw_rng("grpo-domain", self.cfg.seed, index)
        domain = rng.choices([d for d, _ in self.domains], weights=weights)[0]
        return domain, domain.sample("train", index, self.cfg.seed)

    def draw_round(self) -> list[tuple[Any, Any]]:
        lo = self.cursor + self.info.rank * self.local_prompts
        self.cursor += self.g.prompts_per_step
        return [self.prompt(i) for i in range(lo, lo + self.local_prompts)]

    # ------------------------------------------------------------------ rollout
    def batches(self, step: int, n_micro: int, phase: Phase, model) -> list[dict[str, Any]]:
        if not self.buffer:
            self.buffer = self.make_rollout(model, n_micro)
        return self.buffer.pop(0)

    def score(self, domain, item, text: str):
        return timed_verify(domain, item, text, self.g.reward_timeout)

    def make_rollout(self, model, n_micro: int) -> list[list[dict[str, Any]]]:
        g, info = self.g, self.info
        per_rank = self.local_prompts * g.group_size
        micro = self.cfg.data.micro_batch
        if per_rank != g.updates * n_micro * micro:
            raise RuntimeError(f"grpo: {per_rank} samples per rank per rollout, but the trainer "
                               f"takes {g.updates} x {n_micro} x {micro}")
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        stats = {"generate": 0.0, "score": 0.0, "tokens": 0.0}
        kept, spare, first_round = [], [], None
        skipped = rounds = 0
        try:
            with torch.no_grad():
                for round_ in range(1 + (g.max_refill_rounds if g.dynamic_sampling else 0) + 2):
                    groups, n_skipped = self.roll_round(model, stats)
                    skipped += n_skipped
                    rounds += 1
                    if first_round is None:
                        first_round = groups
                    for grp in groups:
                        varied = len({s.reward for s in grp}) > 1
                        (kept if varied or not g.dynamic_sampling else spare).append(grp)
                    short = len(kept) < self.local_prompts
                    # refills: zero-variance groups (dynamic sampling) or skipped prompts
                    refill = g.dynamic_sampling and round_ < g.max_refill_rounds
                    if not any_rank(short and (refill or len(kept) + len(spare)
                                               < self.local_prompts), info.device):
                        break
        finally:
            model.train(was_training)
        groups = (kept + spare)[:self.local_prompts]
        if len(groups) < self.local_prompts:
            raise RuntimeError(f"grpo: only {len(groups)} of {self.local_prompts} prompt groups "
                               f"on rank {info.rank} after refills; {skipped} prompts were "
                               f"skipped as longer than the context (see the rollout's "
                               f"'prompt_too_long' reasons): shorten the domain's prompts or "
                               f"raise the model's max_seq_len")
        t1 = time.perf_counter()
        batches = self.to_batches(groups, model, n_micro)
        t2 = time.perf_counter()
        self.rollouts += 1
        self.pending_metrics = self.rollout_metrics(first_round, groups, stats, skipped,
                                                    t1 - t0, t2 - t1)
        self.pending_metrics["rollout/rounds"] = float(rounds)
        return batches

    def roll_round(self, model, stats: dict[str, float]):
        """One round of this rank's prompts: groups of G scored samples (sample.reward set)."""
        g = self.g
        requests = self.draw_round()
        seed = (self.cfg.seed * 7919 + self.rollouts * 104_729 + self.cursor
                + self.info.rank * 15_485_863) % 2**62
        params = RolloutParams(**{**vars(self.params), "seed": seed})
        extra = {"generate_fn": self.generate_fn} if self.generate_fn is not None else {}
        result = rollout(model, self.tokenizer, requests, params, verify_fn=self.score, **extra)
        stats["generate"] += result.stats["seconds"]
        stats["score"] += result.stats.get("verify_seconds", 0.0)
        stats["tokens"] += result.stats["generated_tokens"]
        groups: dict[int, list] = {}
        for s in result.samples:
            truncated = s.finish == "length"
            s.reward = shaped_reward(s.score, s.generated_tokens, truncated, g.max_new_tokens,
                                     g.length_penalty, g.overlong, g.overlong_buffer,
                                     g.overlong_penalty)
            s.truncated = truncated
            groups.setdefault(s.request, []).append(s)
        return list(groups.values()), len(result.skipped)

    def to_batches(self, groups: list[list], model, n_micro: int) -> list[list[dict]]:
        g, cfg = self.g, self.model_cfg
        rewards = torch.tensor([[s.reward for s in grp] for grp in groups])  # [groups, G]
        adv = group_advantages(rewards, g.adv_norm)                          # [groups, G]
        samples, advantages, betas = [], [], []
        for grp, a in zip(groups, adv.tolist()):
            for s, value in zip(grp, a):
                samples.append(s)
                advantages.append(value)
                betas.append(g.beta_per_domain.get(s.domain, g.beta))
        order = list(range(len(samples)))
        random.Random(f"{self.cfg.seed}/{self.rollouts}/{self.info.rank}").shuffle(order)
        micro = self.cfg.data.micro_batch
        pad = self.tokenizer.eos_token_id
        batches = []
        for m in range(0, len(order), micro):
            idx = order[m:m + micro]
            batch = collate([samples[i] for i in idx], [advantages[i] for i in idx],
                            [betas[i] for i in idx], pad, cfg.n_layers, cfg.n_activated_experts,
                            g.keep_routing)
            batch["gen_mask"] = batch["loss_mask"].clone()
            if g.overlong == "mask":  # DAPO overlong filtering: truncated samples teach nothing
                cut = torch.tensor([samples[i].truncated for i in idx])
                batch["loss_mask"][cut] = 0.0
            batches.append(batch)
        device = self.info.device
        with torch.no_grad():
            for batch in batches:
                on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if self.ref_model is not None and float(batch["beta"].max()) > 0:
                    ref, _, _ = token_logprobs(self.ref_model, on, g.temperature)
                    batch["ref_logp"] = ref.cpu()
                if g.recompute_old_logprobs:
                    old, _, _ = token_logprobs(model, on, g.temperature,
                                               route_list(on, cfg.n_layers, cfg.n_mtp_layers))
                    batch["old_logp"] = old.cpu()
        return [batches[u * n_micro:(u + 1) * n_micro] for u in range(g.updates)]

    def rollout_metrics(self, first_round, groups, stats, skipped, t_rollout, t_logprob):
        """Rollout metrics summed over ranks (collective: every rank calls it)."""
        names = [d.name for d, _ in self.domains]
        samples = [s for grp in groups for s in grp]
        rewards = [s.reward for s in samples]
        lengths = [s.generated_tokens for s in samples]
        vec = [len(samples), sum(rewards), sum(r * r for r in rewards),
               sum(s.truncated for s in samples), sum(lengths),
               sum(1 for grp in first_round if len({s.reward for s in grp}) <= 1),
               len(first_round), skipped,
               sum(s.score.format_valid for s in samples),
               sum(1 for s in samples if s.score.error and s.score.error.startswith("timeout")),
               sum(1 for s in samples if s.score.error), stats["tokens"]]
        for name in names:
            mine = [s for s in samples if s.domain == name]
            vec += [len(mine), sum(s.score.correct for s in mine)]
        t = all_reduce_sum(torch.tensor(vec, dtype=torch.float64, device=self.info.device))
        t = t.cpu().tolist()
        longest = torch.tensor([max(lengths, default=0)], dtype=torch.float64,
                               device=self.info.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        n = max(t[0], 1.0)
        mean = t[1] / n
        m = {"reward/mean": mean, "reward/std": math.sqrt(max(t[2] / n - mean * mean, 0.0)),
             "rollout/truncated_frac": t[3] / n, "rollout/response_len_mean": t[4] / n,
             "rollout/response_len_max": float(longest.item()),
             "rollout/zero_var_frac": t[5] / max(t[6], 1.0), "rollout/skipped_prompts": t[7],
             "rollout/format_valid": t[8] / n, "rollout/verifier_timeouts": t[9],
             "rollout/verifier_errors": t[10],
             "time/generate": stats["generate"] - stats["score"], "time/score": stats["score"],
             "time/logprob": t_logprob,
             "rollout/tokens_per_s": t[11] / max(t_rollout, 1e-9), "rollout/index": self.rollouts}
        for i, name in enumerate(names):
            count, correct = t[12 + 2 * i], t[13 + 2 * i]
            if count:
                m[f"reward/pass@1/{name}"] = correct / count
        return m

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """The latest rollout's metrics, once (logged with the step that made it), plus the
        time the update itself took."""
        m, self.pending_metrics = self.pending_metrics, {}
        if m:
            m["time/update"] = max(step_seconds - m["time/generate"] - m["time/score"]
                                   - m["time/logprob"], 0.0)
        return m

    # ------------------------------------------------------------------ loss
    def count(self, batch: dict[str, Any]) -> float:
        return unit_count(batch["loss_mask"], self.g.loss_agg)

    def loss(self, model, batch: dict[str, Any], phase: Phase) -> LossOutput:
        cfg, g = self.model_cfg, self.g
        routes = route_list(batch, cfg.n_layers, cfg.n_mtp_layers)
        logp, ent, out = token_logprobs(model, batch, g.temperature, routes, entropy=True)
        mask = batch["loss_mask"]
        obj = grpo_loss(logp, batch["old_logp"], batch["sampler_logp"], batch.get("ref_logp"),
                        batch["advantages"], mask, self.objective,
                        beta=batch["beta"] if "ref_logp" in batch else 0.0)
        metrics = dict(obj.metrics)
        # diagnostics as plain means in the count's units (like the objective's own)
        mean_mode = "token-mean" if g.loss_agg == "token-mean" else "seq-mean-token-mean"
        metrics["entropy"] = aggregate(ent, mask, mean_mode)[0]
        if routes is not None:
            metrics["routing_agreement"] = aggregate(
                self.agreement(batch["routes"], out.live_routes), mask, mean_mode)[0]
        return LossOutput(obj.total, metrics, out.expert_counts)

    @staticmethod
    def agreement(replayed: torch.Tensor, live: list) -> torch.Tensor:
        """[b, L-1]: per input position, the fraction of replayed (layer, expert) picks the live
        router also picks, over the layers that were replayed."""
        parts = []
        for layer, lv in enumerate(live[:replayed.shape[2]]):
            if lv is None:
                continue
            r = replayed[:, :, layer].long()                          # [b, L, k]
            hit = (r[..., :, None] == lv[..., None, :]).any(-1)        # [b, L, k]
            parts.append(hit.float().mean(-1))
        if not parts:
            return torch.ones(replayed.shape[0], replayed.shape[1] - 1, device=replayed.device)
        return torch.stack(parts).mean(0)[:, :-1]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, step: int, phase: Phase) -> EvalResult:
        from train.evaluate import stage_evaluation

        if not self.g.eval_n:
            return EvalResult()
        return stage_evaluation(model, self.tokenizer, [d for d, _ in self.domains],
                                self.g.eval_n, self.g.eval_max_new_tokens, self.cfg,
                                self.info, step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "rollouts": self.rollouts, "buffer": self.buffer,
                "pending_metrics": self.pending_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = state["cursor"]
        self.rollouts = state["rollouts"]
        self.buffer = state["buffer"]
        self.pending_metrics = state.get("pending_metrics", {})

    def close(self) -> None:
        pass
