"""Inference KV cache for SWA / CSA / HCA layers (spec §4.7), one object per model.

Per attention layer (`LayerCache`):
- `window`: ring buffer of the last `window_size` rotated K=V vectors, slot = position % window;
- `entries`: the compressed entries appended in order, entry s at slot s (CSA and HCA);
- `state`: the compressor's not-yet-compressed tail: fp32 projections (kv, gate logits) of the
  last `coff·ratio` positions, slot = position % (coff·ratio). For CSA (coff = 2) that is the
  previous complete block (its first-half projections feed the next entry's overlap) plus the
  current partial block; for HCA the current partial block;
- CSA only: `index_keys` (the indexer compressor's entries) and `index_state` (its tail).
Every tensor has one extra trailing slot that masked scatter writes go to, so writes never need
a host-side filter.

Ragged batches: prompts are left-aligned and right-padded. Each row keeps its own length
(`lengths`, the next absolute position), so rows advance independently: a prefill writes only
the row's real tokens (`token_mask`), and a decode step feeds one token per row at position
`lengths[row]`. Finished rows are dropped with `select` (RL rollouts of very different
lengths). Because the positions are the row's own, no padding token is ever inside a row's
window or a compression block, and the cached computation equals the full forward.

Memory (`nbytes`): window + entries + indexer keys grow as ~`c/ratio + d/4` per token and layer,
against `c` per token and layer for a dense shared-KV (MQA) cache of the same dims; the
compressor states are a fixed per-sequence cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .config import CSA_RATIO, ModelConfig


@dataclass
class CompressorState:
    """fp32 projections of the last `size` positions of one compressor (slot = pos % size)."""

    kv: torch.Tensor    # [batch, size + 1, coff*c]
    gate: torch.Tensor  # [batch, size + 1, coff*c] gate logits, `ape` not added

    @property
    def size(self) -> int:
        return self.kv.shape[1] - 1


@dataclass
class LayerCache:
    window: torch.Tensor                          # [batch, window + 1, c]
    entries: torch.Tensor | None = None           # [batch, max_len // ratio + 1, c]
    state: CompressorState | None = None
    index_keys: torch.Tensor | None = None        # [batch, max_len // 4 + 1, index_head_dim]
    index_state: CompressorState | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"window": self.window}
        for name in ("entries", "index_keys"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("state", "index_state"):
            st = getattr(self, name)
            if st is not None:
                out[f"{name}.kv"], out[f"{name}.gate"] = st.kv, st.gate
        return out


@dataclass
class CacheStep:
    """What one cached forward appends, shared by every layer (built by `ModelCache.begin`)."""

    start: torch.Tensor      # [batch] position of the first new token (row length before)
    positions: torch.Tensor  # [batch, seq] absolute positions of the new tokens
    valid: torch.Tensor      # [batch, seq] bool, real tokens (a prefix of each row)
    end: torch.Tensor        # [batch] row length after the step
    fresh: bool              # every row was empty (a prefill from scratch)
    n_entries: dict[int, int] = field(default_factory=dict)  # ratio -> entries read this step
    # ratio -> whether any row completes a block this step (read on the host with the lengths,
    # so a decode step that completes none skips the pooling: 3 of 4 steps at ratio 4)
    completes: dict[int, bool] = field(default_factory=dict)
    visible: dict[int, torch.Tensor] = field(default_factory=dict)  # ratio -> [b, seq, n]
    slots: dict[int, torch.Tensor] = field(default_factory=dict)  # ring size -> [b, seq]

    def ring_slots(self, size: int) -> torch.Tensor:
        """`[batch, seq]` slot of each new token in a ring of `size` (+1 sink) slots: pos % size
        for the real tokens among each row's last `size` positions, the sink slot `size` for
        the rest. Shared by every ring of that size this step."""
        if size not in self.slots:
            keep = self.valid & (self.positions >= self.end[:, None] - size)
            self.slots[size] = torch.where(keep, self.positions % size, size)
        return self.slots[size]

    def entry_visibility(self, ratio: int) -> torch.Tensor:
        """`[batch, seq, n]` bool: entry s is usable by a query at position t once its last token
        (s+1)·ratio − 1 is at or before t (the training rule), and only if complete in the row."""
        if ratio not in self.visible:
            n = self.n_entries[ratio]
            s = torch.arange(n, device=self.positions.device)
            done = (s[None, :] < (self.end // ratio)[:, None])[:, None, :]  # [batch, 1, n]
            self.visible[ratio] = ((s + 1) * ratio - 1 <= self.positions[..., None]) & done
        return self.visible[ratio]


class ModelCache:
    """All layers' caches for `batch` rows of at most `max_len` tokens each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, layer_ids: range | None = None):
        """`layer_ids`: the attention layers cached (default the main layers; the MTP blocks,
        `range(n_layers, n_layers + n_mtp_layers)`, get a cache of their own for speculative
        decoding, since the draft block runs one position behind the main model)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"ModelCache: batch={batch} and max_len={max_len} must be positive")
        self.cfg, self.max_len, self.dtype = cfg, max_len, dtype
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        c, d, w = cfg.head_dim, cfg.index_head_dim, cfg.window_size

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        def state(ratio: int, width: int, overlap: bool) -> CompressorState:
            coff = 2 if overlap else 1
            return CompressorState(zeros(batch, coff * ratio + 1, coff * width, dt=torch.float32),
                                   zeros(batch, coff * ratio + 1, coff * width, dt=torch.float32))

        self.layer_ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        # the compression ratios a step tracks (the indexer's CSA_RATIO always)
        self.ratios = tuple(sorted({cfg.compress_ratios[i] for i in self.layer_ids
                                    if cfg.compress_ratios[i]} | {CSA_RATIO}))
        self.layers: dict[int, LayerCache] = {}  # layer id -> its cache
        for i in self.layer_ids:
            ratio, kind = cfg.compress_ratios[i], cfg.layer_kind(i)
            layer = LayerCache(window=zeros(batch, w + 1, c))
            if ratio:
                layer.entries = zeros(batch, max_len // ratio + 1, c)
                layer.state = state(ratio, c, overlap=kind == "csa")
            if kind == "csa":
                layer.index_keys = zeros(batch, max_len // CSA_RATIO + 1, d)
                layer.index_state = state(CSA_RATIO, d, overlap=True)
            self.layers[i] = layer
        # ratio -> (layer id, tensor) holding max_len // ratio + 1 entry slots (see _static_step)
        self.entry_source = {}
        for i, layer in self.layers.items():
            if layer.entries is not None:
                self.entry_source.setdefault(cfg.compress_ratios[i], (i, "entries"))
            if layer.index_keys is not None:
                self.entry_source.setdefault(CSA_RATIO, (i, "index_keys"))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    # ------------------------------------------------------------------ stepping
    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> CacheStep:
        """Validates a chunk `[batch, seq]` against the cache and describes where it goes."""
        batch, seq = input_ids.shape
        if batch != self.batch:
            raise ValueError(f"cache holds {self.batch} rows, input_ids has {batch}")
        start = self.lengths
        expected = start[:, None] + torch.arange(seq, device=start.device)  # [batch, seq]
        if getattr(self, "static", False):
            return self._static_step(start, expected, input_ids, token_mask)
        if positions is not None and not torch.equal(positions.to(expected.device), expected):
            raise ValueError("positions: with a cache they must continue each row, i.e. equal "
                             f"cache.lengths[:, None] + arange(seq) = {expected.tolist()}; got "
                             f"{positions.tolist()}")
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None
                 else token_mask.to(torch.bool))
        if seq > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("token_mask: with a cache each row's real tokens must come first "
                             "(right padding only)")
        end = start + valid.sum(1)
        starts, ends = torch.stack((start, end)).tolist()  # the step's one host sync
        end_max, start_max = max(ends), max(starts)
        if end_max > self.max_len:
            row = int(end.argmax())
            raise ValueError(f"cache full: row {row} would hold {end_max} tokens, "
                             f"max_len={self.max_len} (create the cache with a larger max_len)")
        ratios = self.ratios  # computed at construction: loops over the config break a graph
        return CacheStep(start=start, positions=expected, valid=valid, end=end,
                         fresh=start_max == 0, n_entries={r: end_max // r for r in ratios},
                         completes={r: any(e // r > s // r for s, e in zip(starts, ends))
                                    for r in ratios})

    def _static_step(self, start, positions, input_ids, token_mask) -> CacheStep:
        """The step without a host synchronisation and with shapes fixed by the cache alone
        (`static=True`, for a captured or compiled decode step): every compressed entry slot
        is read (the invisible ones masked, as always), pooling runs every step (it writes only
        the blocks that complete), and the caller guarantees what `begin` otherwise checks
        (positions continue each row, right padding, room in the rows)."""
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None
                 else token_mask.to(torch.bool))
        ratios = self.ratios  # computed at construction: loops over the config break a graph
        return CacheStep(start=start, positions=positions, valid=valid,
                         end=start + valid.sum(1), fresh=False,
                         n_entries={r: self._entry_slots(r) for r in ratios},
                         completes={r: True for r in ratios})

    def _entry_slots(self, ratio: int):
        """max_len // ratio, read from a cache tensor's size where one holds that ratio: under
        `torch.compile(dynamic=True)` a size is a symbol and `max_len` a constant, so a cache
        of another length (a later rollout's, a grown one) reuses the compiled step."""
        source = self.entry_source.get(ratio)
        if source is None:
            return self.max_len // ratio
        return getattr(self.layers[source[0]], source[1]).shape[1] - 1

    def commit(self, step: CacheStep) -> None:
        self.lengths = step.end

    def rewind(self, counts: torch.Tensor) -> None:
        """Forgets the last `counts[row]` tokens of each row (a rejected speculative draft).

        Shortening `lengths` is the whole rollback: every write is addressed by position (ring
        slot pos % size, entry slot pos // ratio) and every read is bounded by the row's length,
        so a forgotten token's slots are either invisible (an entry past `lengths // ratio`) or
        hold a position no later query reads (the ring slot of position L, reused by L - size,
        which is outside the window of every query at L or later), and they are overwritten when
        the row reaches that position again."""
        self.lengths = self.lengths - counts.to(self.lengths)

    # ------------------------------------------------------------------ housekeeping
    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keeps only `rows` (in that order), e.g. to drop finished sequences from a batch."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths = self.lengths.index_select(0, rows)
        for layer in self.layers.values():
            for f in fields(layer):
                value = getattr(layer, f.name)
                if isinstance(value, torch.Tensor):
                    setattr(layer, f.name, value.index_select(0, rows))
                elif isinstance(value, CompressorState):
                    setattr(layer, f.name, CompressorState(value.kv.index_select(0, rows),
                                                           value.gate.index_select(0, rows)))

    def extend(self, other: "ModelCache") -> None:
        """Appends `other`'s rows after this cache's (same model, `max_len`, dtype, device):
        a continuous batch takes in newly prefilled requests."""
        if other.max_len != self.max_len or other.layer_ids != self.layer_ids:
            raise ValueError(f"extend: caches differ (max_len {other.max_len} vs {self.max_len})")
        self.lengths = torch.cat((self.lengths, other.lengths))
        for i, layer in self.layers.items():
            theirs = other.layers[i]
            for f in fields(layer):
                mine, value = getattr(layer, f.name), getattr(theirs, f.name)
                if isinstance(mine, torch.Tensor):
                    setattr(layer, f.name, torch.cat((mine, value)))
                elif isinstance(mine, CompressorState):
                    setattr(layer, f.name, CompressorState(torch.cat((mine.kv, value.kv)),
                                                           torch.cat((mine.gate, value.gate))))

    # ------------------------------------------------------------------ slots (model/engine.py)
    def rows(self, start: int, stop: int) -> "ModelCache":
        """A cache over rows [start, stop) that shares this one's storage: a forward through it
        writes these rows in place (every write is a scatter into the cache tensors). Its
        `lengths` is its own tensor (a forward replaces it): copy it back with
        `set_lengths`."""
        view = object.__new__(ModelCache)
        view.cfg, view.max_len, view.dtype, view.layer_ids = (self.cfg, self.max_len,
                                                              self.dtype, self.layer_ids)
        view.ratios, view.entry_source = self.ratios, self.entry_source
        view.lengths = self.lengths[start:stop].clone()
        view.layers = {i: _map_layer(layer, lambda t: t[start:stop])
                       for i, layer in self.layers.items()}
        return view

    def set_lengths(self, start: int, lengths: torch.Tensor) -> None:
        self.lengths[start:start + lengths.shape[0]] = lengths

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Row dst[j] becomes a copy of row src[j] (a prompt's state forked to its samples, a
        running row moved into a freed slot). Rows of `src` are read before any is written."""
        if not src:
            return
        device = self.lengths.device
        src_t = torch.as_tensor(src, dtype=torch.long, device=device)
        dst_t = torch.as_tensor(dst, dtype=torch.long, device=device)
        for t in self._all_tensors():
            t.index_copy_(0, dst_t, t.index_select(0, src_t))

    def take(self, rows: list[int]) -> "ModelCache":
        """A new cache holding copies of `rows` (a finished sample's state, kept aside)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        out = self.rows(0, self.batch)
        out.lengths = self.lengths.index_select(0, index)
        out.layers = {i: _map_layer(layer, lambda t: t.index_select(0, index))
                      for i, layer in self.layers.items()}
        return out

    def put(self, slots: list[int], other: "ModelCache") -> None:
        """Rows of `other` (same layers; grown to this cache's `max_len` first if shorter)
        copied into `slots`."""
        other.grow(self.max_len)
        index = torch.as_tensor(slots, dtype=torch.long, device=self.lengths.device)
        for mine, theirs in zip(self._all_tensors(), other._all_tensors()):
            mine.index_copy_(0, index, theirs)

    def grow(self, max_len: int) -> None:
        """Reallocates for rows of up to `max_len` tokens, keeping what every row holds (the
        compressed entries and indexer keys grow; the window and the compressor tails do
        not depend on it)."""
        if max_len <= self.max_len:
            return
        bigger = ModelCache(self.cfg, self.batch, max_len, self.dtype, self.lengths.device,
                            self.layer_ids)
        for i, layer in self.layers.items():
            for name in ("entries", "index_keys"):
                old = getattr(layer, name)
                if old is not None:  # the last slot is the write sink: not copied
                    getattr(bigger.layers[i], name)[:, :old.shape[1] - 1] = old[:, :-1]
            for name in ("window", "state", "index_state"):
                setattr(bigger.layers[i], name, getattr(layer, name))
        bigger.lengths = self.lengths
        self.__dict__.update(bigger.__dict__)

    def _all_tensors(self) -> list[torch.Tensor]:
        out = [self.lengths]
        for layer in self.layers.values():
            _map_layer(layer, out.append)
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part: 'window', 'entries', 'index_keys' (grow with context) and
        'state' (compressor tails, fixed per sequence). Excludes the one write-sink slot."""
        out = {"window": 0, "entries": 0, "index_keys": 0, "state": 0}
        for layer in self.layers.values():
            for name, t in layer.tensors().items():
                part = "state" if "state" in name else name
                out[part] += (t.shape[1] - 1) * t[:, :1].numel() * t.element_size()
        return out


def _map_layer(layer: LayerCache, fn) -> LayerCache:
    """A LayerCache of `fn(t)` for each of `layer`'s tensors (compressor states included)."""
    def state(value: CompressorState | None):
        return None if value is None else CompressorState(fn(value.kv), fn(value.gate))

    return LayerCache(window=fn(layer.window),
                      entries=None if layer.entries is None else fn(layer.entries),
                      state=state(layer.state),
                      index_keys=None if layer.index_keys is None else fn(layer.index_keys),
                      index_state=state(layer.index_state))


@dataclass
class CacheBytes:
    context: int
    per_token: float         # window + entries + indexer keys + states, per token of context
    growing_per_token: float  # entries + indexer keys only (the part that scales with context)
    dense_per_token: float   # dense shared-KV (MQA) cache, same head_dim and dtype, every layer
    parts: dict[str, int]    # bytes per part for one sequence


def cache_bytes(cfg: ModelConfig, context: int, dtype: torch.dtype = torch.bfloat16) -> CacheBytes:
    """Measured from a cache allocated on the meta device (no memory used) for one sequence of
    `context` tokens."""
    parts = ModelCache(cfg, 1, context, dtype, device="meta").nbytes()
    dense = cfg.n_layers * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return CacheBytes(context=context, per_token=sum(parts.values()) / context,
                      growing_per_token=(parts["entries"] + parts["index_keys"]) / context,
                      dense_per_token=float(dense), parts=parts)
