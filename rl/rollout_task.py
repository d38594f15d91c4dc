"""On-policy rollouts as a trainer `Task`'s batch source: what GRPO (`rl/grpo_task.py`) and
on-policy distillation (`distill/task.py`) share, so that neither has a loop of its own.

One rollout, at the step boundary before the first of its μ updates (`batches`):

    prompts (this rank's B/world, train split, mixed by domain weight)
    → G samples each through `train.rollout.rollout` → `model.generation.generate`, in-process,
      with the weights being trained (eval mode, no grad, MTP skipped): tokens, the sampler's
      processed log-probs, the routes of every MoE layer, the kept-token sets
    → each sample scored by its domain's verifier under a time limit (`train/verify.py`) and
      labelled by the stage (`label`: GRPO's shaped reward)
    → groups the stage accepts (`accept`; GRPO's dynamic sampling refills the others for up to
      `refill_rounds` more rounds; prompts skipped as too long are always refilled)
    → the stage's batches (`to_batches`: advantages and reference log-probs for GRPO, teacher
      hidden states for distillation), cut into μ mini-batches × n_micro micro-batches

Each optimizer step takes the next mini-batch. The task's state (prompt cursor, rollout count
and the not-yet-used mini-batches of the current rollout) is saved with every checkpoint on
every rank, so a resumed run continues with the mini-batches an uninterrupted one would use.

`section` is the stage's config section (`cfg.grpo`, `cfg.distill`), a
`rl.rollout_config.RolloutSection` (and optionally train_mtp).
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any

import torch

from data.domains.base import draw_rng
from model.config import ModelConfig
from model.sampling import SamplingParams, restricts
from rl.rollout_batch import collate
from train.dist import DistInfo, all_reduce_sum, any_rank
from train.rollout import RolloutParams, rollout
from train.task import EvalResult, StopRequested, Task
from train.verify import timed_verify


class RolloutTask(Task):
    """The shared part of an on-policy stage; subclasses give `to_batches`, `count`, `loss` and
    optionally `label`, `accept`, `refill_rounds`, `extra_rollout_metrics`."""

    stage = "rollout"          # names the stage in messages and seeds
    label_time_key = "time/label"  # what `to_batches` spends its time on
    refill_rounds = 0          # extra rounds for groups `accept` rejects

    def __init__(self, cfg, section, info: DistInfo, model_cfg: ModelConfig,
                 tokenizer_file: str, domains: list[tuple[Any, float]], generate_fn=None):
        """`generate_fn`: `model.generation.generate` (default) or a stand-in with its
        signature (tests script a policy with it)."""
        from encoding.tokenizer import load_tokenizer

        s = section
        self.cfg, self.section, self.info, self.model_cfg = cfg, s, info, model_cfg
        self.tokenizer_file = tokenizer_file
        self.tokenizer = load_tokenizer(tokenizer_file)
        self.domains = domains
        self.train_mtp = bool(getattr(s, "train_mtp", False))
        self.generate_fn = generate_fn
        # under expert parallelism every forward is a collective of the EP group: frozen-model
        # forwards a rank could skip (no rows for it) must then run on every rank
        self.collective = cfg.parallel.ep_size > 1
        sampling = SamplingParams(s.temperature, s.top_p, s.top_k)
        self.params = RolloutParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    max_new_tokens=s.max_new_tokens, n=s.group_size,
                                    batch_size=s.rollout_batch_size,
                                    max_tool_turns=s.max_tool_turns,
                                    return_routes=s.keep_routing,
                                    speculative=s.speculative,
                                    engine=getattr(s, "rollout_engine", True),
                                    compile=getattr(s, "rollout_compile", False),
                                    return_sampling_mask=restricts(sampling,
                                                                   model_cfg.vocab_size))
        self.params.validate()
        self.local_prompts = s.prompts_per_step // info.world
        self.cursor = 0      # global prompt index of the next draw
        self.rollouts = 0
        self.buffer: list[list[dict[str, Any]]] = []  # mini-batches left of this rollout
        self.pending_metrics: dict[str, float] = {}
        self.stop_check = lambda: False  # the trainer's: a stop signal arrived (`Task`)
        self.errors_shown: set[str] = set()  # kinds of verifier/tool errors printed so far

    # ------------------------------------------------------------------ stage hooks
    def label(self, sample) -> None:
        """Set `sample.reward` (default: 1 if correct, else 0)."""
        sample.reward = 1.0 if sample.score.correct else 0.0

    def accept(self, group: list) -> bool:
        """Whether a group of G scored samples is used as it is (GRPO's dynamic sampling
        rejects zero-variance groups)."""
        return True

    def to_batches(self, groups: list[list], model, n_micro: int) -> list[list[dict]]:
        raise NotImplementedError

    def extra_rollout_metrics(self, samples: list) -> dict[str, float]:
        """More rollout metrics (collective: every rank calls it)."""
        return {}

    # ------------------------------------------------------------------ prompts
    def prompt(self, index: int):
        """The `index`-th prompt of the run: a domain by weight, then its train-split item."""
        weights = [w for _, w in self.domains]
        rng = draw_rng(f"{self.stage}-domain", self.cfg.seed, index)
        domain = rng.choices([d for d, _ in self.domains], weights=weights)[0]
        return domain, domain.sample("train", index, self.cfg.seed)

    def draw_round(self) -> list[tuple[Any, Any]]:
        lo = self.cursor + self.info.rank * self.local_prompts
        self.cursor += self.section.prompts_per_step
        return [self.prompt(i) for i in range(lo, lo + self.local_prompts)]

    # ------------------------------------------------------------------ rollout
    def batches(self, step: int, n_micro: int, model) -> list[dict[str, Any]]:
        if not self.buffer:
            self.buffer = self.make_rollout(model, n_micro)
        return self.buffer.pop(0)

    def score(self, domain, item, text: str):
        return timed_verify(domain, item, text, self.section.reward_timeout)

    def make_rollout(self, model, n_micro: int) -> list[list[dict[str, Any]]]:
        s, info = self.section, self.info
        per_rank = self.local_prompts * s.group_size
        micro = self.cfg.data.micro_batch
        if per_rank != s.updates * n_micro * micro:
            raise RuntimeError(f"{self.stage}: {per_rank} samples per rank per rollout, but the "
                               f"trainer takes {s.updates} x {n_micro} x {micro}")
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        stats = {"generate": 0.0, "score": 0.0, "tokens": 0.0}
        kept, spare, first_round = [], [], None
        skipped = rounds = 0
        before = {"cursor": self.cursor, "rollouts": self.rollouts}
        try:
            with torch.no_grad():
                for round_ in range(1 + self.refill_rounds + 2):
                    groups, n_skipped = self.roll_round(model, stats)
                    if any_rank(groups is None, info.device):  # a stop signal, on any rank
                        self.cursor, self.rollouts = before["cursor"], before["rollouts"]
                        raise StopRequested(f"{self.stage}: stopped during a rollout")
                    skipped += n_skipped
                    rounds += 1
                    if first_round is None:
                        first_round = groups
                    for grp in groups:
                        (kept if self.accept(grp) else spare).append(grp)
                    short = len(kept) < self.local_prompts
                    # refills: rejected groups (for refill_rounds rounds) or skipped prompts
                    refill = round_ < self.refill_rounds
                    if not any_rank(short and (refill or len(kept) + len(spare)
                                               < self.local_prompts), info.device):
                        break
        finally:
            model.train(was_training)
        groups = (kept + spare)[:self.local_prompts]
        if len(groups) < self.local_prompts:
            raise RuntimeError(f"{self.stage}: only {len(groups)} of {self.local_prompts} prompt "
                               f"groups on rank {info.rank} after refills; {skipped} prompts were "
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
        """One round of this rank's prompts: groups of G scored, labelled samples (None when
        a stop signal cut it short)."""
        requests = self.draw_round()
        seed = (self.cfg.seed * 7919 + self.rollouts * 104_729 + self.cursor
                + self.info.rank * 15_485_863) % 2**62
        params = RolloutParams(**{**vars(self.params), "seed": seed})
        extra = {"generate_fn": self.generate_fn} if self.generate_fn is not None else {}
        result = rollout(model, self.tokenizer, requests, params, verify_fn=self.score,
                         should_stop=self.stop_check, **extra)
        if result.stopped:
            return None, 0
        self.show_first_errors(result.samples)
        stats["generate"] += result.stats["seconds"]
        stats["score"] += result.stats.get("verify_seconds", 0.0)
        stats["tokens"] += result.stats["generated_tokens"]
        groups: dict[int, list] = {}
        for sample in result.samples:
            sample.truncated = sample.finish == "length"
            self.label(sample)
            groups.setdefault(sample.request, []).append(sample)
        return list(groups.values()), len(result.skipped)

    def show_first_errors(self, samples: list) -> None:
        """Prints the first verifier or tool error of each kind (exception type, or timeout)
        with its domain and item, once per run: a count in the metrics says that something
        fails, this says what."""
        for s in samples:
            for what, error in (("verifier", s.score.error), ("tool", s.error)):
                kind = f"{what} {error.split(':')[0]}" if error else None
                if kind and kind not in self.errors_shown:
                    self.errors_shown.add(kind)
                    rank = f"rank {self.info.rank}: " if self.info.world > 1 else ""
                    print(f"{rank}warning: {self.stage}: first {kind} ({s.domain} item "
                          f"{s.item_id}): {error}", file=sys.stderr, flush=True)

    def collate_shuffled(self, samples: list, advantages: list[float],
                         betas: list[float]) -> list[tuple[dict, list]]:
        """This rollout's samples in a seeded shuffled order (seed, rollout, rank), collated
        into micro-batches of `data.micro_batch` (`rl.rollout_batch.collate`; `gen_mask` = the
        loss mask before the stage masks anything): [(batch, the batch's samples)]."""
        order = list(range(len(samples)))
        random.Random(f"{self.cfg.seed}/{self.rollouts}/{self.info.rank}").shuffle(order)
        cfg, micro = self.model_cfg, self.cfg.data.micro_batch
        out = []
        for m in range(0, len(order), micro):
            idx = order[m:m + micro]
            batch = collate([samples[i] for i in idx], [advantages[i] for i in idx],
                            [betas[i] for i in idx], self.tokenizer.eos_token_id, cfg.n_layers,
                            cfg.n_activated_experts, self.section.keep_routing)
            batch["gen_mask"] = batch["loss_mask"].clone()
            out.append((batch, [samples[i] for i in idx]))
        return out

    def split_updates(self, batches: list[dict], n_micro: int) -> list[list[dict]]:
        """One rollout's micro-batches (in training order) → μ mini-batches of n_micro."""
        return [batches[u * n_micro:(u + 1) * n_micro] for u in range(self.section.updates)]

    def rollout_metrics(self, first_round, groups, stats, skipped, t_rollout, t_label):
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
             self.label_time_key: t_label,
             "rollout/tokens_per_s": t[11] / max(t_rollout, 1e-9), "rollout/index": self.rollouts}
        for i, name in enumerate(names):
            count, correct = t[12 + 2 * i], t[13 + 2 * i]
            if count:
                m[f"reward/pass@1/{name}"] = correct / count
        m.update(self.extra_rollout_metrics(samples))
        return m

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """The latest rollout's metrics, once (logged with the step that made it), plus the
        time the update itself took."""
        m, self.pending_metrics = self.pending_metrics, {}
        if m:
            m["time/update"] = max(step_seconds - m["time/generate"] - m["time/score"]
                                   - m[self.label_time_key], 0.0)
        return m

    # ------------------------------------------------------------------ evaluation
    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["token_mask"].sum())  # prompt and sample tokens, not the padding

    def evaluate(self, model, step: int) -> EvalResult:
        from train.evaluate import stage_evaluation

        if not self.section.eval_n:
            return EvalResult()
        return stage_evaluation(model, self.tokenizer, [d for d, _ in self.domains],
                                self.section.eval_n, self.section.eval_max_new_tokens,
                                self.cfg, self.info, step)

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
        pass  # nothing open between rollouts
