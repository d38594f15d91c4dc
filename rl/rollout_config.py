"""What GRPO and on-policy distillation configure alike: the rollout section's shared keys
(`RolloutSection`, which `rl.config.GRPOSection` and `distill.config.DistillSection` extend),
its batch arithmetic and start-up warnings, and the `rollout_samples_per_step` resolver of
`conf/grpo.yaml` and `conf/distill.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from train.config import _num
from train.dist import forwards_are_collective


@dataclass
class RolloutSection:
    # verifiable domains (data/domains), "name" or "name:weight"
    domains: List[str] = field(default_factory=list)
    domain_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    thinking_mode: str = "chat"
    # --- one rollout
    prompts_per_step: int = _num(8, ">= 1")   # B, prompts per rollout (all ranks together)
    group_size: int = _num(8, ">= 1")         # G, samples per prompt
    updates: int = _num(1, ">= 1")            # μ, optimizer steps (mini-batches) per rollout
    temperature: float = _num(1.0, "> 0")
    top_p: float = _num(1.0, "(0, 1]")
    top_k: int = _num(0, ">= 0")              # 0 = off
    max_new_tokens: int = _num(64, ">= 1")    # per assistant turn
    max_tool_turns: Optional[int] = _num(None, ">= 0")  # None: the domain's own
    rollout_batch_size: int = _num(64, ">= 1")  # rows in the rollout batch
    rollout_engine: bool = True                # continuous batching (model/engine.py)
    rollout_compile: bool = False              # the engine's decode step via torch.compile
    speculative: bool = False                  # MTP speculative decoding in rollouts
    reward_timeout: float = _num(10.0, "> 0")  # seconds per verification; a hang scores 0
    keep_routing: bool = True                  # replay the sampled routes in training
    opsm_delta: Optional[float] = _num(None, "> 0")  # off-policy sequence masking; None = off
    # --- evaluation (every logging.eval_every and at the end), test split, greedy
    eval_n: int = _num(64, ">= 0")
    eval_max_new_tokens: int = _num(64, ">= 1")


def register_resolver() -> None:
    """`${rollout_samples_per_step:B,G,μ}` in the stage YAMLs (`batch.global_batch`)."""
    if not OmegaConf.has_resolver("rollout_samples_per_step"):
        OmegaConf.register_new_resolver("rollout_samples_per_step", samples_per_step)


def samples_per_step(prompts_per_step: int, group_size: int, updates: int) -> int:
    """batch.global_batch of an on-policy run: one rollout's samples over its updates (the
    `rollout_samples_per_step` resolver of conf/grpo.yaml and conf/distill.yaml)."""
    return int(prompts_per_step) * int(group_size) // max(int(updates), 1)


def rollout_batch_problems(s: Any, prefix: str, cfg: Any, world: int,
                           stage: str) -> list[str]:
    """The batch arithmetic of a rollout section `s`: B prompts per rollout split over the ranks,
    B·G samples cut into μ mini-batches of `batch.global_batch`, each a whole number of
    micro-batches on every rank. `stage` names it in messages ("GRPO")."""
    problems = []
    samples = s.prompts_per_step * s.group_size
    if s.prompts_per_step % world:
        problems.append(f"{prefix}prompts_per_step={s.prompts_per_step}: must be a multiple of "
                        f"the world size {world} (each rank rolls out its share)")
    if samples % s.updates:
        problems.append(f"{prefix}updates={s.updates}: must divide prompts_per_step x "
                        f"group_size = {samples} (one mini-batch per update)")
    elif cfg.batch.global_batch != samples // s.updates:
        problems.append(f"batch.global_batch={cfg.batch.global_batch}: {stage} takes "
                        f"prompts_per_step x group_size / updates = {samples // s.updates} "
                        f"samples per step (leave batch.global_batch to "
                        f"conf/{prefix.rstrip('.')}.yaml)")
    elif (samples // s.updates) % (cfg.data.micro_batch * world):
        problems.append(f"{prefix.rstrip('.')}: prompts_per_step x group_size / updates = "
                        f"{samples // s.updates} samples per step must be a multiple of "
                        f"data.micro_batch={cfg.data.micro_batch} x world size {world}")
    if getattr(s, "speculative", False) and forwards_are_collective(cfg):
        problems.append(f"{prefix}speculative=true: MTP speculative decoding does not run "
                        f"with collective forwards yet (parallel.ep_size="
                        f"{cfg.parallel.ep_size}, parallel.zero_stage="
                        f"{cfg.parallel.zero_stage}); drop one of them")
    return problems


def reply_budget_warnings(prefix: str, max_new_tokens: int, seq_len: int, max_seq_len: int,
                          tokenizer_file: str, domains, probe: int = 16) -> list[str]:
    """Start-up warnings when `<prefix>.max_new_tokens` does not fit: generation stops at the
    model's context (`max_seq_len`), so a prompt of P tokens leaves max_seq_len - P for the
    reply whatever max_new_tokens says; and `data.seq_len` is the sequence length the memory
    plan assumes, which a prompt plus a full reply should not exceed. P is the longest of the
    first `probe` train prompts of each domain (tokenised, as the rollout does)."""
    from encoding.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    prompt = max(len(tokenizer.encode(domain.sample("train", i).prompt_text(),
                                      add_special_tokens=False))
                 for domain, _ in domains for i in range(probe))
    out = []
    if prompt + max_new_tokens > max_seq_len:
        out.append(f"{prefix}.max_new_tokens={max_new_tokens}: prompts of up to {prompt} tokens "
                   f"leave {max(max_seq_len - prompt, 0)} for a reply in the model's context "
                   f"(max_seq_len={max_seq_len}); longer replies are cut there (finish "
                   f"'length')")
    if prompt + max_new_tokens > seq_len:
        out.append(f"{prefix}.max_new_tokens={max_new_tokens}: a prompt ({prompt} tokens) and a "
                   f"full reply exceed data.seq_len={seq_len}, the length the memory plan "
                   f"assumes; set data.seq_len >= {prompt + max_new_tokens} or lower "
                   f"{prefix}.max_new_tokens")
    return out


