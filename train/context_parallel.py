"""Context parallelism in the trainer: groups, validation, and who reads which rows.

With world W and `parallel.cp_size` C (C divides W), consecutive ranks form a CP group:
ranks [k·C, (k+1)·C) hold the chunks of the same sequences (`model/context_parallel.py`), and
the W / C groups are the data-parallel replicas. So:
- the loader shards sequences by data-parallel rank `rank // C` over `W // C` (every rank of a
  group reads the same rows; the model takes its chunks);
- `batch.global_batch` counts sequences over the W / C replicas;
- every parameter is replicated over all W ranks and its gradient is reduced over all of them,
  as DeepSpeed and the optimizer already do: the loss on each rank is its share of its rows'
  token sum (`model.loss.token_sums`) and the trainer divides by the global target count, so the
  reduced gradient is that of the whole batch, as without CP;
- expert parallelism is orthogonal (the MoE is per token): EP groups are any ranks W / ep
  apart, the same as without CP;
- within a step the CP group exchanges the attention halos and compressed entries (point to
  point and one all-gather per compressor per layer).
"""

from __future__ import annotations

from model.config import CSA_RATIO, ModelConfig


def min_chunk(cfg: ModelConfig) -> int:
    """The shortest chunk a rank may hold: the halos (window − 1 keys, 2·4 CSA projections,
    m HCA projections) come from one neighbouring chunk."""
    ratios = [r for r in cfg.compress_ratios if r]
    need = [cfg.window_size - 1] + [2 * r if r == CSA_RATIO else r for r in ratios]
    return max(need)


def validate(cfg: ModelConfig, world: int, cp_size: int, seq_lens: list[int]) -> None:
    """Bad layouts named with the key and a value that would work, before any work."""
    if cp_size < 1:
        raise ValueError(f"parallel.cp_size={cp_size}: must be >= 1")
    if world % cp_size:
        ok = [c for c in range(1, world + 1) if world % c == 0]
        raise ValueError(f"parallel.cp_size={cp_size} must divide the world size {world} "
                         f"(world = data-parallel x cp); choose one of {ok}")
    if cp_size == 1:
        return
    shortest = min_chunk(cfg)
    for seq in seq_lens:
        if seq % (2 * cp_size):
            ok = seq - seq % (2 * cp_size)
            raise ValueError(f"sequence length {seq} is not a multiple of 2 x parallel.cp_size "
                             f"= {2 * cp_size} (each rank holds one chunk from the front and one "
                             f"from the back); use a length like {ok} or {ok + 2 * cp_size}")
        chunk = seq // (2 * cp_size)
        if chunk < shortest:
            best = max((c for c in range(1, cp_size) if seq % (2 * c) == 0
                        and seq // (2 * c) >= shortest), default=1)
            raise ValueError(f"parallel.cp_size={cp_size} cuts sequence length {seq} into chunks "
                             f"of {chunk} tokens, shorter than the {shortest} an attention halo "
                             f"needs (window {cfg.window_size}, compression ratios "
                             f"{sorted({r for r in cfg.compress_ratios if r})}); "
                             f"use parallel.cp_size={best}")


class ContextParallelError(Exception):
    """A layout context parallelism cannot run (reported as one `error:` line)."""


class StageLayoutError(ContextParallelError):
    """A sequence-length stage this run's layout cannot run; a checkpoint was written first."""


def layout_problem(cfg: ModelConfig, train_cfg, world: int, seq_len: int) -> str | None:
    """Why this run's `parallel.cp_size` cannot run rows of `seq_len` (None if it can), with
    the cp_size that would."""
    from .config import sequences_at

    cp_size, micro = train_cfg.parallel.cp_size, train_cfg.data.micro_batch
    seqs = sequences_at(train_cfg, train_cfg.batch.global_batch, seq_len)

    def works(c: int) -> bool:
        try:
            validate(cfg, world, c, [seq_len])
        except ValueError:
            return False
        return seqs is not None and seqs % (micro * world // c) == 0

    if works(cp_size):
        return None
    ok = [c for c in range(1, world + 1) if world % c == 0 and works(c)]
    hint = (f"resume with parallel.cp_size={min(ok, key=lambda c: abs(c - cp_size))} (of "
            f"{ok}; `dry_run=true` plans each)" if ok else "no cp_size of this world runs it")
    return (f"cannot run with parallel.cp_size={cp_size} ({seqs} sequences per step over "
            f"{world // cp_size} data-parallel ranks x data.micro_batch={micro}, chunks of "
            f"{seq_len // (2 * cp_size)} tokens); {hint}")


def stage_error(cfg: ModelConfig, train_cfg, world: int, seq_len: int,
                step: int) -> StageLayoutError | None:
    """The error that stops a run at step `step` entering a stage of `seq_len` its layout cannot
    run (chunks too short, or the stage's sequences not a multiple of micro-batch x
    data-parallel size), naming the cp_size to resume with; None if it can run."""
    problem = layout_problem(cfg, train_cfg, world, seq_len)
    if problem is None:
        return None
    where = f"; the checkpoint of step {step} resumes it" if step else ""
    return StageLayoutError(f"step {step}: the stage of {seq_len}-token sequences {problem}{where}")


def data_rank(rank: int, world: int, cp_size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of a rank."""
    return rank // cp_size, world // cp_size


def create(cp_size: int, rank: int, world: int):
    """This rank's `ContextParallel` over its group of consecutive ranks (every rank creates
    every group, as torch.distributed requires)."""
    import torch.distributed as dist

    from model.context_parallel import ContextParallel

    mine = None
    for first in range(0, world, cp_size):
        group = dist.new_group(list(range(first, first + cp_size)))
        if first <= rank < first + cp_size:
            mine = group
    return ContextParallel(cp_size, rank % cp_size, mine)
