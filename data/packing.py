"""Packing documents into fixed `seq_len` windows, and the one helper that turns windows into the
model's packed-sequence batch.

Two window streams, both addressed by window index so that any window can be built directly
(resume and re-sharding never replay data):

- `ConcatStream` (pretraining): per epoch the training documents are shuffled (seeded by
  seed, source and epoch), each is wrapped as BOS + ids + EOS, all are concatenated, and the
  concatenation is cut into consecutive `seq_len` windows. Epochs follow each other seamlessly (a
  window may hold the end of epoch e and the start of e+1), so no token is ever dropped or
  duplicated. A document cut by a window boundary continues in the next window as a new segment
  whose positions restart at 0; the cost is one lost next-token target per cut (the last token of
  a window has no label). The windows are then *drawn* in a seeded permutation (`window(i)` is
  stream window `perm(i)`, block by block of up to `WINDOW_SHUFFLE_BLOCK` windows, about an
  epoch), as Megatron's sample index shuffles its samples: read in stream order, one step's
  windows were consecutive pieces of the same few documents (one long file could fill a whole
  batch) and the loss swung with whatever file the step landed in. Each block of stream windows
  is still drawn exactly once, so no token is dropped or repeated, and `window(i)` stays a pure
  function of i (exact resume). In finite mode (validation) documents keep storage order, the
  stream is read once in order, and the last window is padded.
- `BinPackedStream` (SFT): whole conversations, never split, are packed best-fit (first-fit
  decreasing) into windows, in groups of `buffer` shuffled conversations; the rest of each window
  is padding.

`to_batch` is shared by both: labels are the next token of the same segment where that token is
trainable, else -100.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from data.config import DataError
from data.shards import TokenShard

IGNORE = -100
# windows per shuffle block (int32 permutation: 16 MiB; 2**22 windows of 4096 tokens = 17B tokens)
WINDOW_SHUFFLE_BLOCK = 1 << 22


@dataclass
class Window:
    """One packed row before batching."""

    tokens: np.ndarray  # [seq_len] int64
    seg_starts: np.ndarray  # [n_segments] int64, sorted, seg_starts[0] == 0
    target_mask: np.ndarray | None = None  # [seq_len] bool: may this token be a target?


def to_batch(windows: list[Window]) -> dict[str, torch.Tensor]:
    """Stacks windows into the model's batch: int64 tensors, each [batch, seq_len].

    input_ids  the tokens
    doc_ids    segment index within the row: 0,0,0,1,1,2,... (padding is its own segment)
    positions  0-based position inside the segment
    labels     input_ids[t+1] if t+1 is in the same segment and is a trainable target, else -100
    """
    tokens = np.stack([w.tokens for w in windows]).astype(np.int64, copy=False)  # [B, L]
    n_rows, seq_len = tokens.shape
    is_start = np.zeros((n_rows, seq_len), dtype=bool)  # [B, L]
    for row, w in enumerate(windows):
        is_start[row, w.seg_starts] = True
    if not is_start[:, 0].all():
        raise ValueError("every window must start a segment at position 0")
    doc_ids = np.cumsum(is_start, axis=1) - 1  # [B, L]
    t = np.arange(seq_len)
    positions = t - np.maximum.accumulate(np.where(is_start, t, 0), axis=1)  # [B, L]
    target_ok = ~is_start[:, 1:]  # [B, L-1]: the next token continues this segment
    if any(w.target_mask is not None for w in windows):
        mask = np.stack([np.ones(seq_len, bool) if w.target_mask is None else w.target_mask
                         for w in windows])
        target_ok &= mask[:, 1:]
    labels = np.full((n_rows, seq_len), IGNORE, dtype=np.int64)  # [B, L]
    labels[:, :-1] = np.where(target_ok, tokens[:, 1:], IGNORE)
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in
            (("input_ids", tokens), ("labels", labels), ("doc_ids", doc_ids),
             ("positions", positions))}


def pad_window(tokens: np.ndarray, seg_starts: list[int], mask: np.ndarray | None, used: int,
               pad_id: int) -> Window:
    """Fills tokens[used:] with `pad_id` as one extra segment that is never a target."""
    seq_len = len(tokens)
    if used < seq_len:
        if mask is None:
            mask = np.ones(seq_len, bool)
        tokens[used:] = pad_id
        mask[used:] = False
        seg_starts = seg_starts + [used]
    return Window(tokens, np.asarray(seg_starts, np.int64), mask)


class _EpochCache:
    """Keeps the last few per-epoch index arrays; building one is O(n_docs)."""

    def __init__(self, build, size: int = 2):
        self.build, self.size, self.items = build, size, OrderedDict()

    def __call__(self, epoch: int):
        if epoch not in self.items:
            self.items[epoch] = self.build(epoch)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return self.items[epoch]


class ConcatStream:
    """Concatenate-then-split windows over a shard's documents (see the module docstring)."""

    def __init__(self, shard: TokenShard, docs: np.ndarray, seq_len: int, bos: int, eos: int,
                 seed: int, stream_id: int, finite: bool = False):
        if len(docs) == 0:
            raise DataError(f"{shard.meta.get('label', shard.path)}: no documents to pack")
        self.shard, self.docs, self.seq_len = shard, np.asarray(docs, np.int64), seq_len
        self.bos, self.eos, self.finite = bos, eos, finite
        self.seed, self.stream_id = seed, stream_id
        self.offsets = np.asarray(shard.offsets)  # [n_docs + 1]
        self.lengths = np.diff(self.offsets)  # [n_docs]
        self.tokens_per_epoch = int(self.lengths[self.docs].sum() + 2 * len(self.docs))
        self._epoch = _EpochCache(self._build_epoch)
        self.shuffle_block = min(self.n_windows, WINDOW_SHUFFLE_BLOCK)
        self._perm = _EpochCache(self._build_window_perm)

    @property
    def n_windows(self) -> int:
        """Windows in one pass (the last one partial); the number of windows in finite mode."""
        return -(-self.tokens_per_epoch // self.seq_len)

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.finite:
            order = self.docs
        else:
            rng = np.random.default_rng([self.seed, self.stream_id, epoch])
            order = self.docs[rng.permutation(len(self.docs))]
        starts = np.zeros(len(order) + 1, np.int64)  # [n + 1] stream offset of each BOS
        np.cumsum(self.lengths[order] + 2, out=starts[1:])
        return order, starts

    def _build_window_perm(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream_id, 0x77696E, block])
        return rng.permutation(self.shuffle_block).astype(np.int32)  # [shuffle_block]

    def window(self, index: int) -> Window:
        """The `index`-th window drawn: stream window `perm(index)` (module docstring); in
        finite mode the stream's own order."""
        if self.finite:
            return self.window_at(index)
        block, j = divmod(index, self.shuffle_block)
        return self.window_at(block * self.shuffle_block + int(self._perm(block)[j]))

    def window_at(self, index: int) -> Window:
        """Window `index` of the concatenated stream, in stream order."""
        seq_len, total = self.seq_len, self.tokens_per_epoch
        if self.finite and not 0 <= index < self.n_windows:
            raise IndexError(f"window {index} out of range [0, {self.n_windows})")
        out = np.empty(seq_len, np.int64)
        seg_starts: list[int] = []
        pos, p = 0, index * seq_len  # window offset, stream offset
        while pos < seq_len and not (self.finite and p >= total):
            epoch, off = divmod(p, total)
            order, starts = self._epoch(epoch)
            d = int(np.searchsorted(starts, off, side="right")) - 1
            doc = order[d]
            n = int(self.lengths[doc])
            a = off - int(starts[d])  # offset inside [BOS, ids..., EOS]
            take = min(n + 2 - a, seq_len - pos)
            b = a + take
            seg_starts.append(pos)
            if a == 0:
                out[pos] = self.bos
            lo, hi = max(a, 1), min(b, n + 1)  # the slice of real ids covered
            if hi > lo:
                src = int(self.offsets[doc]) - 1
                out[pos + lo - a:pos + hi - a] = self.shard.tokens[src + lo:src + hi]
            if b == n + 2:
                out[pos + take - 1] = self.eos
            pos += take
            p += take
        return pad_window(out, seg_starts, None, pos, self.eos)

    def target_count(self) -> int:
        """Finite mode: how many labels != -100 the whole pass yields (ids + EOS of every
        document, less one per window boundary that cuts a document)."""
        _, starts = self._epoch(0)
        n_cuts = (self.n_windows - 1) - int(np.count_nonzero(starts[1:-1] % self.seq_len == 0))
        return int(self.lengths[self.docs].sum() + len(self.docs)) - n_cuts


class BinPackedStream:
    """Whole documents (conversations) packed first-fit decreasing into windows; the tokens past
    `seq_len` of an over-long document are cut (drop such documents before, if that is the
    policy). Targets follow the shard's mask."""

    def __init__(self, shard: TokenShard, docs: np.ndarray, seq_len: int, pad_id: int,
                 seed: int, stream_id: int, buffer: int = 1024, finite: bool = False):
        if len(docs) == 0:
            raise DataError(f"{shard.meta.get('label', shard.path)}: no documents to pack")
        if shard.mask is None:
            raise DataError(f"{shard.path}: bin packing needs a shard with a loss mask")
        self.shard, self.docs, self.seq_len, self.pad_id = shard, np.asarray(docs), seq_len, pad_id
        self.seed, self.stream_id, self.buffer, self.finite = seed, stream_id, buffer, finite
        self.offsets = np.asarray(shard.offsets)
        self.lengths = np.minimum(np.diff(self.offsets), seq_len)  # [n_docs] after cutting
        self._epoch = _EpochCache(self._build_epoch)
        self._epoch_windows: list[int] = []  # windows in each epoch built so far

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(docs in window order [n_docs], window boundaries into it [n_windows + 1])."""
        if self.finite:
            order = self.docs
        else:
            rng = np.random.default_rng([self.seed, self.stream_id, epoch])
            order = self.docs[rng.permutation(len(self.docs))]
        items, bounds = [], [0]
        for g in range(0, len(order), self.buffer):
            group = order[g:g + self.buffer]
            group = group[np.argsort(-self.lengths[group], kind="stable")]  # longest first
            free = np.empty(len(group), np.int64)  # [max bins] room left in each bin
            bins: list[list[int]] = []
            for doc in group:
                n = self.lengths[doc]
                fits = np.flatnonzero(free[:len(bins)] >= n)
                if len(fits):
                    b = fits[0]
                else:
                    b = len(bins)
                    bins.append([])
                    free[b] = self.seq_len
                bins[b].append(int(doc))
                free[b] -= n
            for b in bins:
                items.extend(b)
                bounds.append(len(items))
        return np.asarray(items, np.int64), np.asarray(bounds, np.int64)

    def _locate(self, index: int) -> tuple[int, int]:
        """(epoch, window inside the epoch) of a stream window index."""
        epoch, first = 0, 0
        while True:
            if epoch == len(self._epoch_windows):
                self._epoch_windows.append(len(self._epoch(epoch)[1]) - 1)
            if index < first + self._epoch_windows[epoch]:
                return epoch, index - first
            if self.finite:
                raise IndexError(f"window {index} out of range [0, {self.n_windows})")
            first += self._epoch_windows[epoch]
            epoch += 1

    @property
    def n_windows(self) -> int:
        """Windows in epoch 0 (all of them in finite mode)."""
        return len(self._epoch(0)[1]) - 1

    def window(self, index: int) -> Window:
        epoch, j = self._locate(index)
        items, bounds = self._epoch(epoch)
        out = np.empty(self.seq_len, np.int64)
        mask = np.zeros(self.seq_len, bool)
        seg_starts, pos = [], 0
        for doc in items[bounds[j]:bounds[j + 1]]:
            n, src = int(self.lengths[doc]), int(self.offsets[doc])
            seg_starts.append(pos)
            out[pos:pos + n] = self.shard.tokens[src:src + n]
            mask[pos:pos + n] = self.shard.mask[src:src + n].astype(bool)
            pos += n
        return pad_window(out, seg_starts, mask, pos, self.pad_id)
