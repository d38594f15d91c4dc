"""Iterables the trainer consumes: an endless, resumable training loader with a background
prefetch worker, and a finite evaluation loader.

Prefetch uses a thread, not a process: building a batch is a few memory-mapped slices and numpy
ops, far cheaper than a training step, and a thread shares the memory maps and needs no pickling.
The worker computes batches ahead, but the saved state is the cursor after the last batch the
trainer actually received, so prefetching never shifts what a resumed run sees.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from data.packing import Window, to_batch
from data.sampler import DistributedSampler


class WindowStream(Protocol):
    seq_len: int

    def window(self, index: int) -> Window: ...

    @property
    def n_windows(self) -> int: ...


Batch = dict[str, torch.Tensor]  # each [micro_batch, seq_len] int64


def make_batch(streams: list[WindowStream], sampler: DistributedSampler, cursor: int) -> Batch:
    """The batch a rank reads at global `cursor` (pure: no state is touched)."""
    return to_batch([streams[s].window(c) for s, c in sampler.batch_at(cursor)])


def _prefetch(streams: list[WindowStream], sampler: DistributedSampler, cursor: int,
              out: queue.Queue, stop: threading.Event) -> None:
    """Worker: batches from `cursor` on, each with the cursor after it, until `stop`. It holds no
    reference to the loader, so a loader dropped without `close()` is collected and stops it."""
    try:
        while not stop.is_set():
            item = (make_batch(streams, sampler, cursor), cursor + sampler.stride)
            cursor += sampler.stride
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
    except BaseException as e:  # noqa: BLE001 - hand every failure to the consumer
        out.put(e)


class PackedLoader:
    """Endless training batches for one data-parallel rank; `state_dict`/`load_state_dict` resume
    exactly (see `data/sampler.py` for the semantics)."""

    def __init__(self, streams: list[WindowStream], sampler: DistributedSampler,
                 prefetch: int = 8):
        self.streams, self.sampler, self.prefetch = streams, sampler, int(prefetch)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    def make_batch(self, cursor: int) -> Batch:
        return make_batch(self.streams, self.sampler, cursor)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        if self.prefetch == 0:
            batch = self.make_batch(self.sampler.cursor)
            self.sampler.cursor += self.sampler.stride
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, cursor_after = item
        self.sampler.cursor = cursor_after
        return batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=_prefetch, name="v4lab-data-prefetch", daemon=True,
            args=(self.streams, self.sampler, self.sampler.cursor, self._queue, self._stop))
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def close(self) -> None:
        """Stops the worker; iteration can restart later from the current cursor."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()  # batches prefetched from the old cursor are stale
        self.sampler.load_state_dict(state)


class EvalLoader:
    """Every window of finite streams once, split over ranks (window j goes to rank j mod world).
    Every rank yields the same number of full batches, the last ones padded with rows that carry
    no target, so collective ops in evaluation stay in step. Re-iterable.

    `bytes_per_token`: UTF-8 bytes of the evaluated text per target token (labels != -100), so
    bits per byte = mean cross-entropy in nats / ln(2) / bytes_per_token.
    """

    def __init__(self, streams: list[WindowStream], rank: int, world: int, micro_batch: int,
                 pad_id: int, bytes_per_token: float, max_batches: int | None = None):
        self.streams, self.rank, self.world = streams, rank, world
        self.micro_batch, self.pad_id, self.bytes_per_token = micro_batch, pad_id, bytes_per_token
        self.first = np.cumsum([0] + [st.n_windows for st in streams])  # [n_streams + 1]
        per_rank = -(-int(self.first[-1]) // world)
        self.n_batches = -(-per_rank // micro_batch)
        if max_batches is not None:
            self.n_batches = min(self.n_batches, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def _window(self, g: int) -> Window:
        """Global eval window g, or a padding row past the end."""
        if g >= self.first[-1]:
            seq_len = self.streams[0].seq_len
            return Window(np.full(seq_len, self.pad_id, np.int64), np.zeros(1, np.int64),
                          np.zeros(seq_len, bool))
        s = int(np.searchsorted(self.first, g, side="right")) - 1
        return self.streams[s].window(g - int(self.first[s]))

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.n_batches):
            first = (b * self.micro_batch) * self.world + self.rank
            yield to_batch([self._window(first + i * self.world)
                            for i in range(self.micro_batch)])
