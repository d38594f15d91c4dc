"""GRPO rewards: format-gated correctness from the domain verifiers, with a time limit, plus the
optional length and overlong shaping.

    reward = 1 if the verifier accepts the answer else 0        (an unreadable answer is 0)
             - length_penalty x generated / max_new_tokens       (optional, V3.2's length term)
             - DAPO's soft overlong penalty                      (grpo.overlong=penalty)

There is no additive format bonus: a bonus for well-formed but wrong answers is a reward the
policy can collect without solving anything, and format validity is already a precondition of
correctness. Format validity is logged instead.

A verifier that raises scores 0 with the error recorded (`safe_verify`); one that hangs is cut
off after `timeout` seconds by SIGALRM (main thread; pure-Python loops are interrupted), scores
0 and is counted. Off the main thread (where signals cannot be used) the limit is not enforced
and the verification runs to completion.
"""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager

from data.domains.base import Score, safe_verify


class VerifierTimeout(BaseException):
    """A BaseException, so that `safe_verify`'s `except Exception` (verifier bugs) lets it
    through to `timed_verify`, which scores the hang."""


@contextmanager
def time_limit(seconds: float):
    """Raises VerifierTimeout in the main thread after `seconds` (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise VerifierTimeout(f"verification took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_verify(domain, item, text: str, timeout: float) -> Score:
    """`safe_verify` under a time limit: a hang scores 0 with error 'timeout: ...'."""
    try:
        with time_limit(timeout):
            return safe_verify(domain, item, text)
    except VerifierTimeout as e:
        return Score(0.0, False, False, "verifier timeout", error=f"timeout: {e}")


def shaped_reward(score: Score, generated: int, truncated: bool, max_new_tokens: int,
                  length_penalty: float = 0.0, overlong: str = "mask",
                  overlong_buffer: int = 16, overlong_penalty: float = 1.0) -> float:
    """The scalar reward of one sample (module docstring). `generated`: the model's tokens in
    its last turn budget sense (all generated tokens of the sample); `truncated`: it hit the
    length limit. DAPO's soft penalty ramps linearly from 0 at `max_new_tokens - buffer`
    generated tokens to `-overlong_penalty` at the limit."""
    reward = 1.0 if score.correct else 0.0
    if not math.isfinite(reward):
        reward = 0.0
    if length_penalty:
        reward -= length_penalty * generated / max_new_tokens
    if overlong == "penalty":
        start = max_new_tokens - overlong_buffer
        if truncated or generated > start:
            reward -= overlong_penalty * min(1.0, max(0, generated - start) / overlong_buffer)
    return reward
