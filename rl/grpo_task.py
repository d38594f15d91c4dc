"""GRPO as a `Task` for the trainer core (`train/task.py`): the batches are rollouts with the
current weights, the loss is DeepSeek-V3.2's objective (`rl/objective.py`).

The rollout machinery (prompts by domain weight, G samples each with the current weights,
verifier scores under a time limit, refills, μ mini-batches, resumable state) is the trainer's
`rl/rollout_task.py`, shared with distillation. GRPO adds, per rollout:

    rewards (`rl/rewards.py`: format-gated correctness, optional length / overlong shaping)
    → group advantages; dynamic sampling (optional) refills zero-variance groups
    → overlong handling; π_ref log-probs (β > 0); π_old recomputed (optional)
    → shuffled, cut into μ mini-batches × n_micro micro-batches (`rl/rollout_batch.py`)

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

Expert parallelism: the rollout agrees on its generate calls across the EP group
(`train/rollout.py`), refill rounds are agreed over all ranks, and the reference is loaded after
the policy is built, sharded over the same EP groups (`attach_frozen`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from model.config import ModelConfig
from train.dist import DistInfo, all_reduce_sum
from rl.logprobs import route_agreement, token_logprobs
from rl.rollout_batch import route_list
from rl.rollout_task import RolloutTask
from data.cache import atomic_write_text
from train.task import LossOutput, StageDeclined

from .objective import ObjectiveConfig, aggregate, group_advantages, grpo_loss, unit_count
from .rewards import shaped_reward

# below this fraction of prompt groups with reward variance in its first rollout, a GRPO run is
# told its starting model is outside the band it can learn in (`GRPOTask.check_band`). A quarter,
# not "any": at 8 prompts a step, one group made varied by one lucky sample (0.125) let two
# calculator experts with 0.016 mean reward through, and 3 of their next 4 rollouts had no varied
# group at all (held steps); at a quarter a step's gradient rests on at least two groups.
MIN_VARIED_GROUPS = 0.25
BAND_FILE = "band.json"


def band_verdict(varied: float, mean_reward: float) -> dict[str, Any]:
    """Whether a first rollout with `varied` (fraction of prompt groups whose rewards vary) and
    `mean_reward` is in the band GRPO learns in, and on which side it falls out of it."""
    in_band = varied >= MIN_VARIED_GROUPS
    side = "" if in_band else ("solves none" if mean_reward <= 0.5 else "solves nearly all")
    return {"in_band": in_band, "varied_groups": float(varied),
            "mean_reward": float(mean_reward), "side": side, "min_varied": MIN_VARIED_GROUPS}


class GRPOTask(RolloutTask):
    stage = "grpo"
    label_time_key = "time/logprob"

    def __init__(self, cfg, info: DistInfo, model_cfg: ModelConfig, tokenizer_file: str,
                 domains: list[tuple[Any, float]], ref_model=None, generate_fn=None,
                 ref_loader=None):
        """`ref_model`: the frozen reference policy, or `ref_loader(ep_groups)` loads it once
        the trainer has built the policy (`attach_frozen`), sharded like it under EP."""
        g = cfg.grpo
        super().__init__(cfg, g, info, model_cfg, tokenizer_file, domains, generate_fn)
        self.g = g
        self.update_router_bias = g.router_bias_updates
        self.ref_model, self.ref_loader = ref_model, ref_loader
        self.refill_rounds = g.max_refill_rounds if g.dynamic_sampling else 0
        self.objective = ObjectiveConfig(clip_low=g.clip_low, clip_high=g.clip_high,
                                         beta=g.beta, kl_unbiased=g.kl_unbiased,
                                         opsm_delta=g.opsm_delta, loss_agg=g.loss_agg,
                                         norm_len=g.max_new_tokens)
        self.objective.validate()

    def attach_frozen(self, ep_groups) -> None:
        if self.ref_loader is not None:
            self.ref_model = self.ref_loader(ep_groups)

    # ------------------------------------------------------------------ rollout hooks
    def label(self, sample) -> None:
        g = self.g
        sample.reward = shaped_reward(sample.score, sample.generated_tokens, sample.truncated,
                                      g.max_new_tokens, g.length_penalty, g.overlong,
                                      g.overlong_buffer, g.overlong_penalty)

    def extra_rollout_metrics(self, samples: list) -> dict[str, float]:
        """Warns when no sample of the rollout (all ranks) can carry a learning signal: every
        one's verifier failed or timed out, or it was truncated and masked (overlong=mask).
        The step's loss is then 0 by construction, which a curve would show as learning."""
        masking = self.g.overlong == "mask"
        failed = sum(1 for s in samples if s.score.error)
        masked = sum(1 for s in samples if masking and s.truncated and not s.score.error)
        n, failed, masked = all_reduce_sum(torch.tensor(
            [len(samples), failed, masked], dtype=torch.float64,
            device=self.info.device)).cpu().tolist()
        dead = n > 0 and failed + masked == n
        if dead and self.info.is_main:
            hint = "; raise grpo.max_new_tokens" if masked else ""
            print(f"warning: grpo rollout {self.rollouts}: no sample carries a learning signal "
                  f"({failed:.0f} of {n:.0f} verifier errors or timeouts, {masked:.0f} truncated "
                  f"and masked by grpo.overlong=mask{hint}): the loss of its steps is 0 by "
                  f"construction", file=sys.stderr, flush=True)
        return {"rollout/no_signal": float(dead)}

    def rollout_metrics(self, first_round, groups, stats, skipped, t_rollout, t_label):
        """The shared rollout metrics, plus the band check on the run's first rollout."""
        m = super().rollout_metrics(first_round, groups, stats, skipped, t_rollout, t_label)
        if self.rollouts == 1:
            self.check_band(m)
        return m

    def check_band(self, m: dict[str, float]) -> None:
        """GRPO learns only from groups whose rewards vary: an expert that solves nothing (or
        everything) gives zero advantages everywhere, its steps are held without an update, and
        the stage can only spend its budget. The first rollout's prompt groups (before any
        refill) tell, so say it plainly when fewer than `MIN_VARIED_GROUPS` of them vary, and
        write the figures to `run_dir/band.json` (the pipeline reads it). With `grpo.band=stop`
        the run then ends before any update (`StageDeclined`, exit status 3): the pipeline
        trains the SFT expert further and tries again (`pipeline/stages.py`)."""
        varied = 1.0 - m["rollout/zero_var_frac"]
        band = band_verdict(varied, m["reward/mean"])
        if self.info.is_main:
            atomic_write_text(os.path.join(self.cfg.run_dir, BAND_FILE), json.dumps(band))
        if band["in_band"]:
            return
        message = (f"the starting model is outside the band GRPO learns in: {varied:.0%} of the "
                   f"first rollout's prompt groups have reward variance (mean reward "
                   f"{band['mean_reward']:.3f}; it {band['side']} of its samples)")
        if self.g.band == "stop":
            raise StageDeclined(f"grpo: {message}; nothing was trained (grpo.band=stop). Start "
                                f"from an SFT expert that gets some but not all samples of a "
                                f"group right (train it longer, or change the domain's difficulty)")
        if self.info.is_main:
            print(f"warning: grpo: {message}, so steps without variance are held without an "
                  f"update. Start from an SFT expert that gets some but not all samples of a "
                  f"group right (train it longer, or change the domain's difficulty)",
                  file=sys.stderr, flush=True)

    def accept(self, group: list) -> bool:
        """Dynamic sampling (DAPO) keeps only groups whose rewards vary."""
        return not self.g.dynamic_sampling or len({s.reward for s in group}) > 1

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
        batches = []
        for batch, mine in self.collate_shuffled(samples, advantages, betas):
            if g.overlong == "mask":  # DAPO overlong filtering: truncated samples teach nothing
                cut = torch.tensor([s.truncated for s in mine])
                batch["loss_mask"][cut] = 0.0
            batches.append(batch)
        device = self.info.device
        with torch.no_grad():
            for batch in batches:
                on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                # under EP the reference's forward is a collective: every rank runs it
                if self.ref_model is not None and (float(batch["beta"].max()) > 0
                                                   or self.collective):
                    ref, _, _ = token_logprobs(self.ref_model, on, g.temperature)
                    batch["ref_logp"] = ref.cpu()
                if g.recompute_old_logprobs:
                    old, _, _ = token_logprobs(model, on, g.temperature,
                                               route_list(on, cfg.n_layers, cfg.n_mtp_layers))
                    batch["old_logp"] = old.cpu()
        return self.split_updates(batches, n_micro)

    # ------------------------------------------------------------------ loss
    def carries_signal(self, batch: dict[str, Any]) -> bool:
        """A generated token with a non-zero advantage, or, with a KL penalty (beta > 0), any
        generated token: zero-variance groups and masked samples teach nothing, and the
        trainer then holds the update (`Trainer.signal_in`)."""
        live = batch["loss_mask"].sum(1) > 0                                 # [b]
        kl = batch["beta"] > 0 if "ref_logp" in batch else torch.zeros_like(live)
        return bool((live & ((batch["advantages"] != 0) | kl)).any())

    def count(self, batch: dict[str, Any]) -> float:
        return unit_count(batch["loss_mask"], self.g.loss_agg)

    def loss(self, model, batch: dict[str, Any]) -> LossOutput:
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
                route_agreement(batch["routes"], out.live_routes), mask, mean_mode)[0]
        return LossOutput(obj.total, metrics, out.expert_counts)
