"""Context parallelism: each sequence split along its length over `size` ranks (spec §10.5).

Layout (causal load balance). A row of `seq` tokens is cut into `2·size` equal chunks; rank r
holds chunk r and chunk 2·size−1−r, so every rank has one early and one late chunk and the causal
attention work is even. Locally the two chunks are concatenated (`[batch, 2·chunk]`, "local
order") and run through the model as a batch of `2·batch` rows of one chunk each wherever
attention needs their boundaries.

Everything per token (embedding, mHC, MoE, norms, head, losses) needs nothing from other ranks.
Attention needs, per layer (`model/cp_attention.py`):
- a halo: the last n rows of the preceding chunk (sliding window: `window − 1` rotated K=V
  vectors; compressors: their 2m or m projected tokens, so every rank compresses whole blocks),
  exchanged point to point (`halo`);
- the compressed entries of the whole sequence: each rank pools the blocks whose last token it
  holds (at most chunk/m + 1 per chunk, padded), then one all-gather and a select rebuilds every
  entry in sequence order (`gather_entries`): the report's two stages. The compressed stream is
  seq/m entries, so this is about 1/m of what ring attention over raw K=V would move.
Backward sends every gradient back to the rank that produced the tensor (the halo's gradient
to its owner, the gathered entries' gradients summed over ranks and sliced to their owner).

Token ids, document ids and positions are small (8 bytes a token), so every rank of a CP group
reads whole rows and `SequenceShard.take` picks its chunks; block layouts, visibility and the
entries' owners are then computed locally without communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .compressor import BlockLayout


class ContextParallel:
    """A rank's place in its context-parallel group; `group` is a torch.distributed process group
    (None with size 1: the layout and every exchange then run locally, which tests use)."""

    def __init__(self, size: int, rank: int = 0, group=None):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"context parallel: rank {rank} of size {size}")
        self.size, self.rank, self.group = size, rank, group
        self.bytes_sent = 0  # by this rank's exchanges so far (a ring collective's share)

    def chunks(self) -> tuple[int, int]:
        """The global chunk indices this rank holds, in local order."""
        return self.rank, 2 * self.size - 1 - self.rank

    def local_index(self, seq: int, device=None) -> torch.Tensor:
        """`[seq / size]` global index of every token this rank holds, in local order."""
        chunk = seq // (2 * self.size)
        starts = torch.tensor(self.chunks(), device=device) * chunk
        return (starts[:, None] + torch.arange(chunk, device=device)).flatten()

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """Whole rows `[batch, seq, ...]` → this rank's tokens `[batch, seq / size, ...]`."""
        return t.index_select(1, self.local_index(t.shape[1], t.device))

    def shard(self, doc_ids: torch.Tensor, positions: torch.Tensor) -> "SequenceShard":
        """Binds this rank to one batch of whole rows (`[batch, seq]` ids and positions)."""
        seq = doc_ids.shape[1]
        if seq % (2 * self.size):
            raise ValueError(f"context parallel: sequence length {seq} is not a multiple of "
                             f"2·cp_size = {2 * self.size}")
        return SequenceShard(self, doc_ids, positions, seq // (2 * self.size))

    # ------------------------------------------------------------ communication (autograd-aware)
    def peer(self, r: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def exchange(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor]) -> None:
        """Point-to-point: `send[r]` goes to group rank r, `recv[r]` is filled from r."""
        if not send and not recv:
            return
        import torch.distributed as dist

        ops = [dist.P2POp(dist.irecv, t, self.peer(r), self.group) for r, t in recv.items()]
        ops += [dist.P2POp(dist.isend, t.contiguous(), self.peer(r), self.group)
                for r, t in send.items()]
        self.bytes_sent += sum(t.nbytes for t in send.values())
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group, differentiable (backward: the sum of every rank's gradient)."""
        return t if self.size == 1 else _AllReduce.apply(t, self)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """`[size, *t.shape]`, differentiable (backward: gradients summed, own slice kept)."""
        return t[None] if self.size == 1 else _AllGather.apply(t, self)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cp):
        import torch.distributed as dist

        ctx.cp = cp
        out = t.clone()
        dist.all_reduce(out, group=cp.group)
        cp.bytes_sent += _ring_bytes(out, cp.size, all_reduce=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp.group)
        ctx.cp.bytes_sent += _ring_bytes(grad, ctx.cp.size, all_reduce=True)
        return grad, None


def _ring_bytes(t: torch.Tensor, size: int, all_reduce: bool) -> int:
    """What one rank sends in a ring collective over a tensor of `t`'s size (the gathered
    or reduced one): (size − 1)/size of it, twice for an all-reduce."""
    return int(t.nbytes * (size - 1) / size * (2 if all_reduce else 1))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cp):
        import torch.distributed as dist

        ctx.cp = cp
        parts = [torch.empty_like(t) for _ in range(cp.size)]
        dist.all_gather(parts, t.contiguous(), group=cp.group)
        cp.bytes_sent += (cp.size - 1) * t.nbytes
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        # gloo has no reduce-scatter: sum everywhere, keep this rank's slice
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp.group)
        ctx.cp.bytes_sent += _ring_bytes(grad, ctx.cp.size, all_reduce=True)
        return grad[ctx.cp.rank], None


class _Halo(torch.autograd.Function):
    """chunks `[batch, 2, chunk, *f]` (local order) → halos `[batch, 2, n, *f]`: for each local
    chunk the last n rows of the global chunk before it (zeros before chunk 0).

    Rank r's first chunk r follows rank r−1's first chunk; its second chunk 2P−1−r follows rank
    r+1's second chunk (on rank P−1 its own first chunk). So first tails move forward one rank,
    second tails back one rank, and gradients the opposite way."""

    @staticmethod
    def forward(ctx, chunks, n, cp):
        ctx.cp, ctx.n, ctx.shape = cp, n, chunks.shape
        r, last = cp.rank, cp.size - 1
        tails = chunks[:, :, -n:]
        halo = torch.zeros_like(tails)
        send, recv = {}, {}
        if r < last:
            send[r + 1] = tails[:, 0]
            recv[r + 1] = torch.empty_like(tails[:, 1])
        else:
            halo[:, 1] = tails[:, 0]
        if r > 0:
            send[r - 1] = tails[:, 1]
            recv[r - 1] = torch.empty_like(tails[:, 0])
        cp.exchange(send, recv)
        if r > 0:
            halo[:, 0] = recv[r - 1]
        if r < last:
            halo[:, 1] = recv[r + 1]
        return halo

    @staticmethod
    def backward(ctx, grad):
        cp, n = ctx.cp, ctx.n
        r, last = cp.rank, cp.size - 1
        grad_tails = torch.zeros_like(grad)
        send, recv = {}, {}
        if r > 0:
            send[r - 1] = grad[:, 0]
            recv[r - 1] = torch.empty_like(grad[:, 1])
        if r < last:
            send[r + 1] = grad[:, 1]
            recv[r + 1] = torch.empty_like(grad[:, 0])
        else:
            grad_tails[:, 0] = grad[:, 1]
        cp.exchange(send, recv)
        if r < last:
            grad_tails[:, 0] = recv[r + 1]
        if r > 0:
            grad_tails[:, 1] = recv[r - 1]
        out = grad.new_zeros(ctx.shape)
        out[:, :, -n:] = grad_tails
        return out, None, None


@dataclass
class SequenceShard:
    """One forward's view of whole rows from one CP rank: global ids, the local chunk rows, and
    the per-ratio block layouts (computed once, shared by every layer)."""

    cp: ContextParallel
    doc_ids: torch.Tensor    # [batch, seq] global
    positions: torch.Tensor  # [batch, seq] global
    chunk: int
    _layouts: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.cp.size

    @property
    def batch(self) -> int:
        return self.doc_ids.shape[0]

    def chunk_starts(self) -> torch.Tensor:
        """`[2]` global index of each local chunk's first token."""
        return torch.tensor(self.cp.chunks(), device=self.doc_ids.device) * self.chunk

    def local_index(self) -> torch.Tensor:
        """`[2·chunk]` global token index of every local token, in local order."""
        return self.cp.local_index(self.doc_ids.shape[1], self.doc_ids.device)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """Whole rows `[batch, seq, ...]` → this rank's tokens `[batch, 2·chunk, ...]`."""
        return self.cp.take(t)

    def take_all(self, *tensors):
        """`take` of each argument; None stays None, a list (per-block routes) per element."""
        pick = lambda t: None if t is None else self.take(t)
        return tuple([pick(r) for r in t] if isinstance(t, list) else pick(t) for t in tensors)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Local `[batch, 2·chunk, ...]` → one row per chunk `[2·batch, chunk, ...]` (a view)."""
        return t.reshape(t.shape[0] * 2, self.chunk, *t.shape[2:])

    def unrows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0] // 2, 2 * self.chunk, *t.shape[2:])

    def halo(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Local `[batch, 2·chunk, ...]` → `[2·batch, n, ...]`: the n tokens before each chunk."""
        chunks = t.reshape(t.shape[0], 2, self.chunk, *t.shape[2:])
        halo = _Halo.apply(chunks, n, self.cp)
        return halo.reshape(t.shape[0] * 2, n, *t.shape[2:])

    def halo_doc_ids(self, n: int) -> torch.Tensor:
        """`[2·batch, n]` document ids of the n tokens before each chunk (−1 before the row)."""
        idx = self.chunk_starts()[:, None] - n + torch.arange(n, device=self.doc_ids.device)
        ids = self.doc_ids[:, idx.clamp(min=0).flatten()].view(self.batch, 2, n)
        return torch.where(idx >= 0, ids, -1).reshape(self.batch * 2, n)

    # ------------------------------------------------------------------ compressed entries
    def layout(self, ratio: int) -> tuple[BlockLayout, torch.Tensor, "OwnedBlocks"]:
        """Global block layout, visibility `[2·batch, chunk, n]` of each entry to each local
        query, and the blocks this rank pools."""
        if ratio not in self._layouts:
            layout = BlockLayout.build(self.doc_ids, self.positions, ratio)
            visible = layout.visible(self.doc_ids, self.local_index())  # [batch, 2·chunk, n]
            self._layouts[ratio] = (layout, self.rows(visible), OwnedBlocks.build(self, layout))
        return self._layouts[ratio]

    def gather_entries(self, own: torch.Tensor, owned: "OwnedBlocks") -> torch.Tensor:
        """Stage 2: this rank's pooled entries `[2·batch, E, c]` → every entry of the sequence
        for each local chunk row `[2·batch, n, c]` (all-gather, then select in order)."""
        e, c = own.shape[1], own.shape[2]
        parts = self.cp.all_gather(own.reshape(self.batch, 2, e, c))  # [P, batch, 2, E, c]
        flat = parts.transpose(0, 1).reshape(self.batch, -1, c)       # [batch, P·2·E, c]
        entries = flat.gather(1, owned.source[..., None].expand(-1, -1, c))  # [batch, n, c]
        n = entries.shape[1]
        return entries[:, None].expand(-1, 2, -1, -1).reshape(self.batch * 2, n, c)


@dataclass
class OwnedBlocks:
    """The blocks one rank pools (stage 1) and where every entry lands after the all-gather.

    A block belongs to the chunk holding its last token; a chunk of C tokens holds at most
    C // m + 1 block ends, the padded per-chunk count E every rank agrees on without talking."""

    per_chunk: int        # E
    index: torch.Tensor   # [2·batch, E] global entry index of each pooled slot (valid only)
    valid: torch.Tensor   # [2·batch, E] bool
    source: torch.Tensor  # [batch, n] slot of every global entry in the gathered [P·2·E] table

    @classmethod
    def build(cls, shard: SequenceShard, layout: BlockLayout) -> "OwnedBlocks":
        size, chunk, batch = shard.size, shard.chunk, shard.batch
        dev = layout.start.device
        n = layout.n_entries
        e = chunk // layout.ratio + 1
        owner = torch.where(layout.valid, layout.end // chunk, 2 * size)  # [batch, n] chunk id
        ids = torch.arange(n, device=dev)
        mine = torch.tensor(shard.cp.chunks(), device=dev)  # [2]
        owned = owner[:, None, :] == mine[None, :, None]     # [batch, 2, n]
        key = torch.where(owned, ids, ids + n)
        pick = key.argsort(dim=-1)[..., :e]                  # [batch, 2, ≤E], owned first
        valid = owned.gather(-1, pick)
        if pick.shape[-1] < e:  # fewer entries than slots in the whole row
            pad = e - pick.shape[-1]
            pick = torch.nn.functional.pad(pick, (0, pad))
            valid = torch.nn.functional.pad(valid, (0, pad))
        # global entry i of chunk j is slot (i - first entry of j) of chunk j's owner
        per = torch.zeros(batch, 2 * size + 1, dtype=torch.long, device=dev)
        per.scatter_add_(1, owner, torch.ones_like(owner))
        first = per.cumsum(1) - per                          # [batch, 2P+1]
        j = owner.clamp(max=2 * size - 1)
        rank = torch.where(j < size, j, 2 * size - 1 - j)
        slot = (j >= size).long()
        source = (rank * 2 + slot) * e + (ids - first.gather(1, j))
        source = torch.where(layout.valid, source, 0)
        return cls(e, pick.reshape(batch * 2, e), valid.reshape(batch * 2, e), source)

    def local_layout(self, shard: SequenceShard, layout: BlockLayout, lead: int) -> BlockLayout:
        """The owned blocks as a layout over each chunk row with `lead` halo rows in front."""
        rows = lambda t: t[:, None].expand(-1, 2, -1).reshape(shard.batch * 2, -1)
        g = lambda t: rows(t).gather(1, self.index)
        origin = shard.chunk_starts().repeat(shard.batch)[:, None] - lead  # [2·batch, 1]
        start = torch.where(self.valid, g(layout.start) - origin, lead)
        return BlockLayout(ratio=layout.ratio, start=start, valid=self.valid,
                           has_prev=g(layout.has_prev) & self.valid,
                           position=torch.where(self.valid, g(layout.position), 0),
                           doc=g(layout.doc))
