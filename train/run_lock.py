"""One writer per run directory.

Two trainers (or two pipelines) writing one folder interleave `metrics.jsonl`, overwrite each
other's checkpoints and build a report from the mix, and nothing says so. The first writer holds
`<dir>/.lock`; a second is refused with the holder's PID and host before any work.

Why `fcntl.flock` under the PID file: the kernel drops the lock when its holder dies, however it
dies (kill -9 included), so a stale lock is taken over with no race between two newcomers (only
one gets the flock), and no PID-liveness guess is needed. The file's text (PID, host, command)
is only there to name the holder in the refusal. Linux NFS maps flock onto POSIX locks, so a
folder shared between nodes is locked too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process writes this run directory."""


class RunLock:
    def __init__(self, directory: str | os.PathLike, what: str = "run directory"):
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{self.what} {self.dir} is in use by {holder}: two writers would mix its "
                f"checkpoints and metrics. Wait for it, stop it, or choose another folder "
                f"(the lock goes with its process; {self.path})") from None
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:200]
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock; the file may stay
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    return text or "another process (PID not yet written)"
