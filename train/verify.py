"""Verifiers under a time limit, for every stage that scores rollouts (GRPO, distillation).

A verifier that raises scores 0 with the error recorded (`safe_verify`); one that hangs is cut
off after `timeout` seconds by SIGALRM (main thread; pure-Python loops are interrupted), scores
0 and is counted. Off the main thread (where signals cannot be used) the limit is not enforced
and the verification runs to completion.
"""

from __future__ import annotations

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
