"""GRPO rewards: format-gated correctness from the domain verifiers, with a time limit, plus the
optional length and overlong shaping.

    reward = Score.reward from the domain verifier              (1/0 for right/wrong; partial
                                                                 credit in [0, 1] where the
                                                                 domain gives it; unreadable 0)
             - length_penalty x generated / max_new_tokens       (optional, V3.2's length term)
             - DAPO's soft overlong penalty                      (grpo.overlong=penalty)

There is no additive format bonus: a bonus for well-formed but wrong answers is a reward the
policy can collect without solving anything, and format validity is already a precondition of
correctness. Format validity is logged instead.

Verification under a time limit (`timed_verify`: a verifier that raises or hangs scores 0 and
is counted) lives in `train/verify.py`, shared with distillation.
"""

from __future__ import annotations

import math

from data.domains.base import Score



def shaped_reward(score: Score, generated: int, truncated: bool, max_new_tokens: int,
                  length_penalty: float = 0.0, overlong: str = "mask",
                  overlong_buffer: int = 16, overlong_penalty: float = 1.0) -> float:
    """The scalar reward of one sample (module docstring). `generated`: the model's tokens in
    its last turn budget sense (all generated tokens of the sample); `truncated`: it hit the
    length limit. DAPO's soft penalty ramps linearly from 0 at `max_new_tokens - buffer`
    generated tokens to `-overlong_penalty` at the limit."""
    # `safe_verify` has checked the reward is finite and in [0, 1]; a Score built elsewhere
    # that is not is refused here rather than trained on
    reward = float(score.reward)
    if not math.isfinite(reward):
        raise ValueError(f"Score.reward={score.reward!r} for a sample ({score.reason!r}): "
                         f"rewards must be finite")
    if length_penalty:
        reward -= length_penalty * generated / max_new_tokens
    if overlong == "penalty":
        start = max_new_tokens - overlong_buffer
        if truncated or generated > start:
            reward -= overlong_penalty * min(1.0, max(0, generated - start) / overlong_buffer)
    return reward
