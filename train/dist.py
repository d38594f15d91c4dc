"""Process-group set-up for every launcher: `deepspeed`, `torchrun` and plain `python`.

DeepSpeed's launcher appends `--local_rank=N` to argv (Hydra would reject it) and sets
LOCAL_RANK; torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run gets a one-process
group on a free local port so the same code path (DeepSpeed engine, collectives) always runs.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Removes `--local_rank=N` / `--local_rank N` (exporting LOCAL_RANK) so Hydra sees only
    its overrides."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m:
            value = m.group(1)
            if value is None and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    launcher: "LauncherWatch | None" = None  # set by init_distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={preference!r}: choose auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Initialises the default process group (gloo on CPU, nccl on GPU) through DeepSpeed."""
    launched = "RANK" in os.environ
    if not launched:  # plain `python`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
        release_shm_workspace()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                    LauncherWatch.for_launched(launched))


SHM_DIR = "/dev/shm"


def shm_workspace_path() -> str:
    """The file DeepSpeed's CPU shared-memory all-reduce (`deepspeed_shm_comm`) creates for this
    rank, named from the uid, MASTER_ADDR, MASTER_PORT and rank (its `shm.cpp`)."""
    rank = dist.get_rank()
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_"
                                 f"{os.environ.get('MASTER_ADDR', '')}_"
                                 f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace() -> None:
    """Unlinks this rank's DeepSpeed shared-memory workspace once every rank has mapped all of
    them, so that it lives exactly as long as the processes that map it.

    DeepSpeed's CPU accelerator gives each rank a ~66 MB file in /dev/shm and never unlinks it:
    every run on a new port used to leave one per rank behind (a day of tests and benchmarks
    here had filled 19 GB of a 24 GB machine's RAM with them). `shm_initialize` returns only
    after it has opened every peer's file, so after a barrier no rank needs a name any more;
    the mappings stay valid after the unlink, and a killed run leaks nothing."""
    path = shm_workspace_path()
    if not os.path.exists(path):  # GPU, or the shm op was not built
        return
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class LauncherWatch:
    """Notices that the launcher of this rank is gone, so the rank stops (checkpoint, exit) the
    way it does on SIGTERM instead of training on as an orphan.

    Under `deepspeed` the tree is runner (`deepspeed ...`) → `deepspeed.launcher.launch` → ranks.
    SIGTERM to the runner kills only the runner: `launch` keeps waiting on its ranks, so the
    ranks' parent is alive and only the runner, their grandparent, says the job was cancelled.
    Both layers are watched. Under torchrun (or another launcher) the parent is the launcher. A
    plain `python` run watches nothing: a closed shell must not stop a `nohup` run.

    A process is gone when it has exited, is a zombie waiting to be reaped, or its pid now
    belongs to a newer process; the parent is also gone when this rank was re-parented.
    """

    ppid: int | None = None
    watched: list[tuple[int, float, str]] = field(default_factory=list)  # pid, start, label

    @classmethod
    def for_launched(cls, launched: bool) -> "LauncherWatch":
        if not launched:
            return cls()
        import psutil

        try:
            parent = psutil.Process().parent()
            if parent is None or parent.pid <= 1:
                return cls(os.getppid())
            chain = [parent]
            if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
                runner = parent.parent()
                if runner is not None and runner.pid > 1:
                    chain.append(runner)
            watched = [(p.pid, p.create_time(), " ".join(p.cmdline())[:120]) for p in chain]
        except psutil.Error:  # watching is a safeguard; never a reason not to train
            return cls(os.getppid())
        return cls(os.getppid(), watched)

    def gone(self) -> str | None:
        """A description of the launcher process that is gone, or None while all are alive."""
        if self.ppid is not None and os.getppid() != self.ppid:
            return f"parent process {self.ppid} exited (this rank was re-parented)"
        if not self.watched:
            return None
        import psutil

        for pid, started, label in self.watched:
            try:
                p = psutil.Process(pid)
                alive = p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            except psutil.Error:
                continue  # unknowable (permissions): assume alive
            if not alive:
                return f"launcher process {pid} ({label}) exited"
        return None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is set on any rank (every rank gets the same answer: no divergent exits)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def main_print(info: DistInfo | None, *args) -> None:
    if info is None or info.is_main:
        print(*args, file=sys.stdout, flush=True)


def forwards_are_collective(cfg) -> bool:
    """Whether every forward of the trained model is a collective, so that all ranks must run
    the same forwards (evaluation and sampling included): under expert parallelism each MoE
    layer is an all-to-all over the EP group, and at `parallel.zero_stage=3` each block gathers
    its weights over the data-parallel group (`optim.weight_sharding`)."""
    return cfg.parallel.ep_size > 1 or cfg.parallel.zero_stage == 3
