"""Running a completion's code against its unit tests, never in the trainer's process.

    result = run_tests(code, ["assert add(1, 2) == 3", ...], Limits(cpu_seconds=5))
    result.passed, result.total, result.reason

Each call writes the code and a small harness into a fresh private temporary directory and runs
`python -I harness.py` there as a child process: the harness executes the code, then each test
in the same namespace (a test passes when it raises nothing), and reports the counts. What is
enforced, and where:

- wall clock (everywhere): the child's whole process group is killed after `wall_seconds`;
- CPU time, address space, file size (POSIX `setrlimit`; address space is not enforced on
  macOS): an infinite loop stops at `cpu_seconds`, a 100 GB allocation fails, no file grows
  beyond `file_mb`;
- no network and no new processes (Linux: with `unshare` available, the child runs in new
  user, network and PID namespaces, so it has only a loopback interface and cannot signal
  anything outside; everywhere: a Python audit hook installed before the code runs refuses
  sockets, `fork`, `exec`, `subprocess`, `os.system`, `os.kill` and `ctypes`);
- files (audit hook): opening anything for writing outside the private directory, or reading
  outside it and Python's own installation, is refused; the directory is removed afterwards;
- environment: only PATH, LANG and HOME (the private directory) reach the child.

This contains mistakes and naive attacks by generated code (the tests list them: an infinite
loop, a fork bomb, a huge allocation, writing outside its folder, reading the trainer's files,
`sys.exit`, a network call), not a determined adversary with native code: run untrusted code at
scale in a container or VM. A child that exits before the harness reports (`sys.exit`,
`os._exit`, a crash, a kill) has passed nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_HARNESS = Path(__file__).with_name("sandbox_harness.py")


@dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16


@dataclass(frozen=True)
class TestResult:
    passed: int
    total: int
    reason: str  # "ok", or why tests did not run / pass (first failure, timeout, ...)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--pid",
                               "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_NAMESPACES: bool | None = None


def namespaces_available() -> bool:
    """Whether the child can run in its own user/network/PID namespaces here (checked once)."""
    global _NAMESPACES
    if _NAMESPACES is None:
        _NAMESPACES = _unshare_works()
    return _NAMESPACES


def _limit(limits: Limits):
    """The child's pre-exec setup: its own session (one process group to kill), rlimits."""
    def apply() -> None:
        os.setsid()
        try:
            import resource
        except ImportError:  # not POSIX: the wall clock still applies
            return
        cpu = max(1, int(limits.cpu_seconds + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        size = limits.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        if sys.platform.startswith("linux"):
            memory = limits.memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


def run_tests(code: str, tests: list[str], limits: Limits = Limits(),
              setup: str = "") -> TestResult:
    """Runs `setup`, `code`, then each of `tests` in one namespace, in a sandboxed child."""
    if not tests:
        return TestResult(0, 0, "no tests")
    folder = Path(tempfile.mkdtemp(prefix="v4lab-sandbox-"))
    try:
        (folder / "job.json").write_text(json.dumps({"setup": setup, "code": code,
                                                     "tests": list(tests)}))
        shutil.copy(_HARNESS, folder / "harness.py")
        cmd = [sys.executable, "-I", "harness.py", str(folder), os.path.dirname(os.__file__),
               sys.prefix, sys.base_prefix]
        if namespaces_available():
            cmd = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork",
                   "--kill-child", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "HOME": str(folder)}
        return _run(cmd, folder, env, limits, len(tests))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(cmd: list[str], folder: Path, env: dict, limits: Limits, total: int) -> TestResult:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_limit(limits) if os.name == "posix" else None)
    try:
        _, err = proc.communicate(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return TestResult(0, total, f"timeout: over {limits.wall_seconds:g} s wall clock")
    report = folder / "report.json"
    if not report.is_file():
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        ran = time.monotonic() - start
        why = (f"cpu time limit ({limits.cpu_seconds:g} s) reached" if
               proc.returncode == -signal.SIGXCPU or ran >= limits.cpu_seconds
               else f"exited with status {proc.returncode} before the tests ran")
        return TestResult(0, total, f"{why}: {tail[0][:200]}".rstrip(": "))
    result = json.loads(report.read_text())
    return TestResult(int(result["passed"]), total, str(result["reason"])[:300])


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()
