"""Which window each rank reads at each step: a seeded mixture over sources, a global cursor,
and rank sharding, all pure functions of (seed, cursor) so that resume is exact.

The training data is one endless global sequence of windows g = 0, 1, 2, ... fixed by the seed
and the mixture. Global window g comes from source `s(g)`, and is that source's `c(g)`-th window
(`c` counts how often the source was chosen before g). Rank r of `world`, with micro-batch B,
reads windows [cursor + r·B, cursor + (r+1)·B) and then the cursor advances by world·B.

The only state is the cursor (windows consumed by all ranks together). Resuming with the same
world size replays nothing and skips nothing, batch for batch; resuming with another world size
(or micro-batch) continues the same global sequence from the same cursor, split differently.

Mixture: windows are grouped in blocks of `block` (10,000) windows. In each block source i gets
exactly `quota_i` windows (largest-remainder rounding of block·weight_i), placed by a seeded
permutation of the block. So proportions are exact per block and `c(g)` is computed in O(block)
without replay.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from data.config import DataError

MIXTURE_BLOCK = 10_000
STATE_VERSION = 1


def quotas(weights: list[float], block: int) -> np.ndarray:
    """Largest-remainder rounding of block·w/sum(w): [n_sources] ints that sum to `block`."""
    w = np.asarray(weights, np.float64)
    share = block * w / w.sum()
    q = np.floor(share).astype(np.int64)
    extra = np.argsort(-(share - q), kind="stable")[: block - int(q.sum())]
    q[extra] += 1
    return q


class MixtureSchedule:
    """Global window index -> (source, window index inside that source)."""

    def __init__(self, weights: list[float], seed: int, block: int = MIXTURE_BLOCK):
        self.weights, self.seed, self.block = [float(w) for w in weights], int(seed), block
        self.quota = quotas(self.weights, block)  # [n_sources]
        for i, (w, q) in enumerate(zip(self.weights, self.quota)):
            if q == 0:
                raise DataError(f"source {i} weight={w}: rounds to no window in a mixture block "
                                 f"of {block} windows; raise its weight")
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, 0x6D6978, b])
            source = rng.permutation(np.repeat(np.arange(len(self.quota)), self.quota))  # [block]
            order = np.argsort(source, kind="stable")
            first = np.concatenate([[0], np.cumsum(self.quota)[:-1]])  # [n_sources]
            rank = np.empty(self.block, np.int64)  # [block] occurrences of the source so far
            rank[order] = np.arange(self.block) - first[source[order]]
            self._blocks[b] = (source, rank)
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def locate(self, g: int) -> tuple[int, int]:
        if len(self.quota) == 1:
            return 0, g
        b, j = divmod(g, self.block)
        source, rank = self._block(b)
        s = int(source[j])
        return s, b * int(self.quota[s]) + int(rank[j])


class DistributedSampler:
    """A rank's view of the global window sequence, with the resumable cursor.

    `identity` (sources, seq_len, ...) is saved with the state and checked on load: resuming onto
    different data would silently change what "the next window" means.
    """

    def __init__(self, weights: list[float], seed: int, rank: int, world: int, micro_batch: int,
                 identity: dict[str, Any] | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"dp_rank={rank}: must be in [0, dp_world={world})")
        if micro_batch <= 0:
            raise ValueError(f"micro_batch={micro_batch}: must be positive")
        self.schedule = MixtureSchedule(weights, seed)
        self.rank, self.world, self.micro_batch = rank, world, micro_batch
        self.identity = dict(identity or {}, seed=int(seed), weights=self.schedule.weights)
        self.cursor = 0  # global windows consumed before the next batch of this rank

    @property
    def stride(self) -> int:
        return self.world * self.micro_batch

    def batch_at(self, cursor: int) -> list[tuple[int, int]]:
        """(source, window) pairs this rank reads for the batch starting at global `cursor`."""
        first = cursor + self.rank * self.micro_batch
        return [self.schedule.locate(g) for g in range(first, first + self.micro_batch)]

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "cursor": int(self.cursor), **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version={state.get('version')!r}: expected "
                             f"{STATE_VERSION}")
        for key, ours in self.identity.items():
            theirs = state.get(key)
            if theirs != ours:
                raise ValueError(f"data state {key}={theirs!r} does not match this run's "
                                 f"{key}={ours!r}; resuming would not continue the same data")
        cursor = int(state["cursor"])
        if cursor < 0:
            raise ValueError(f"data state cursor={cursor}: must be >= 0")
        self.cursor = cursor
