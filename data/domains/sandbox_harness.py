"""The child side of `data/domains/sandbox.py` (copied into the private directory and run as
`python -I harness.py DIR STDLIB PREFIX BASE_PREFIX`; it imports nothing from v4lab).

Installs an audit hook, then runs the job's setup and code and each test in one namespace, and
writes `report.json` (passed count, first failure) into DIR. The hook refuses network access,
new processes, signals, `ctypes`, writing outside DIR and reading outside DIR and Python's
installation; a refusal raises PermissionError inside the code, which then fails like any
other error.
"""

import json
import os
import sys

FOLDER, READABLE = sys.argv[1], tuple(os.path.realpath(p) for p in sys.argv[2:] if p)
REPORT = os.path.join(FOLDER, "report.json")
BLOCKED = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn",
           "os.posix_spawn", "os.system", "os.kill", "os.killpg", "ctypes.", "pty.",
           "os.startfile", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.")
state = {"reporting": False}


def _inside(path, roots):
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def _guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        if path == REPORT and not state["reporting"]:
            raise PermissionError("sandbox: the report is the harness's")
        if writes and not _inside(path, (FOLDER,)):
            raise PermissionError(f"sandbox: writing {path} (outside the sandbox folder)")
        if not writes and not _inside(path, (FOLDER, *READABLE)):
            raise PermissionError(f"sandbox: reading {path} (outside the sandbox folder)")
    if event in ("os.listdir", "os.scandir") and args and args[0] is not None and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if not _inside(path, (FOLDER, *READABLE)):
            raise PermissionError(f"sandbox: listing {path} (outside the sandbox folder)")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree",
                 "os.chmod", "os.symlink", "os.link", "os.truncate") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(target))
            if not _inside(path, (FOLDER,)):
                raise PermissionError(f"sandbox: {event} on {path} (outside the sandbox folder)")


def _report(passed, reason):
    state["reporting"] = True
    with open(REPORT, "w") as f:
        json.dump({"passed": passed, "reason": reason}, f)


def main():
    with open(os.path.join(FOLDER, "job.json")) as f:
        job = json.load(f)
    sys.addaudithook(_guard)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["setup"] + "\n" + job["code"], "solution.py", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - SystemExit included: nothing passes
        _report(0, f"the code raised {type(error).__name__}: {error}")
        return
    passed, first = 0, ""
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"test_{i}.py", "exec"), namespace)
            passed += 1
        except BaseException as error:  # noqa: BLE001
            first = first or f"test {i} failed: {type(error).__name__}: {error}"
    _report(passed, first or "ok")


main()
