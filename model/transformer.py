"""The DeepSeek-V4 model: embedding → hc_mult residual streams → blocks → head collapse → norm →
head, plus MTP. One forward serves pre-training, SFT, RL (routes replayed) and evaluation.

    out = Transformer(cfg)(input_ids, doc_ids=None, positions=None, routes=None)
    out.logits, out.mtp_logits, out.balance_loss, out.indexer_loss, out.expert_counts, out.routes
    out.live_routes  # with routes replayed: what each router itself would pick (Keep Routing)

Incremental decoding uses the same forward with a cache (`model/INFERENCE.md`):

    cache = model.new_cache(batch, max_len)
    model(prompt_ids, token_mask=real, cache=cache)   # ragged prefill, right-padded rows
    model(next_ids[:, None], cache=cache)             # one token per row at cache.lengths

Packed sequences: `doc_ids` `[batch, seq]` separates documents inside a row; positions restart
per document (derived from doc_ids when not given). No attention, compression group, indexer
choice or MTP input crosses a document boundary.

The forward's arguments (`forward` reads as: inputs → blocks → head → MTP → output):
- `routes` replays expert ids (one `[batch, seq, topk]` per block, MTP blocks last; an entry may
  be None) instead of the routers' own top-k; the routers still score every token (the routing
  weights, and so the router gradient, come from those scores) and report their own pick as
  `live_routes`.
- With `cache` (from `new_cache`): the tokens continue each row at `cache.lengths`
  (`positions`, if given, must equal that), `token_mask` marks each row's real tokens (a
  prefix; the rest is right padding, computed but not cached), the attention layers append to
  the cache, and the MTP blocks are skipped (`mtp_logits` is empty).
- `logits_index` `[batch, k]` computes logits only at those sequence indices (`[batch, k,
  vocab]`), e.g. each row's last real token in a prefill.
- `mtp=False` skips the MTP blocks (a post-training stage that does not train them saves their
  compute; `mtp_logits` is then empty and `expert_counts` has main-layer rows only).
- `head=False` stops before the output head: `logits` is None and `hidden` (and `mtp_hidden`)
  hold the normed head inputs, so a vocabulary-sized loss can apply the head in token chunks
  (distillation's full-vocabulary KL) instead of materialising `[batch, seq, vocab]`.
- `keep_streams=True` also returns the last block's streams (`streams`, every position).
- Under context parallelism (`context_parallel` set, no cache) the rows are whole and every
  output is this rank's tokens (`model/context_parallel.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import AttentionContext
from .block import Block
from .cache import ModelCache
from .config import ModelConfig
from .mhc import HyperConnectionSite, create_head_collapse, hc_head, init_head_collapse
from .mtp import MTPBlock
from .norm import RMSNorm
from .packing import positions_from_doc_ids
from .rope import rope_frequencies


@dataclass
class ModelOutput:
    logits: torch.Tensor | None         # [batch, seq, vocab]; None when forward(head=False)
    mtp_logits: list[torch.Tensor]      # per MTP depth, [batch, seq, vocab]
    balance_loss: torch.Tensor          # scalar fp32, mean over routed (non-hash) MoE layers
    indexer_loss: torch.Tensor          # scalar fp32, mean over CSA layers (0 unless requested)
    expert_counts: torch.Tensor         # [n_blocks, n_routed_experts] tokens per expert
    routes: list[torch.Tensor]          # per block, [batch, seq, topk] expert ids
    # per block, like routes: the router's own top-k (detached) where routes were replayed,
    # None where not (see `MoEOutput.live_routes`; `moe.routing_agreement` compares them)
    live_routes: list[torch.Tensor | None] = field(default_factory=list)
    # forward(head=False): the head's input (final norm applied), [batch, seq, dim], and the
    # same per MTP depth; the caller applies `head.weight` itself, e.g. in token chunks
    hidden: torch.Tensor | None = None
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)
    # forward(keep_streams=True): the last main block's residual streams [batch, seq, hc, dim],
    # what the MTP block reads (speculative decoding drafts from them)
    streams: torch.Tensor | None = None


def mtp_next_ids(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The MTP block's input at position i: token i+1. A document's last position has no next
    token of its own; it re-reads its own token (its MTP target is masked), so nothing crosses
    documents. `[batch, seq]` → `[batch, seq]`."""
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    return torch.cat((torch.where(same_doc, input_ids[:, 1:], input_ids[:, :-1]),
                      input_ids[:, -1:]), dim=1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # weights given, so nn.Embedding skips its own normal_ init (init_weights fills it): on
        # the meta device that init would import torch._dynamo, 3 s of every process start
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim,
                                  _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        create_head_collapse(self, cfg.hc_mult, cfg.dim)
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        self.csa_mode = cfg.csa_mode
        self.compute_indexer_loss = False
        self.expert_parallel = (0, 1)  # (ep_rank, ep_size); see shard_experts
        # a `ContextParallel`: training forwards (no cache) then take whole rows and compute
        # this rank's chunks of them (`model/context_parallel.py`)
        self.context_parallel = None
        self.init_weights()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic init from `seed` (default cfg.seed): normal(0, init_std) for matrices,
        ones for norms, zeros for `ape` and `attn_sink`, mHC as a plain residual (see mhc.py).
        Output projections (`wo_b`, expert and shared `w2`) are scaled by 1/sqrt(2·blocks), the
        GPT-2 rule, so the residual stream's variance does not grow with depth.
        Does nothing on the meta device."""
        if self.embed.weight.is_meta:
            return
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        std = cfg.init_std
        out_std = std / math.sqrt(2 * (cfg.n_layers + cfg.n_mtp_layers))
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)) and "ffn" not in name:
                s = out_std if name.endswith("wo_b") else std
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * s)
        for block in [*self.layers, *self.mtp]:
            block.attn.attn_sink.zero_()
            for comp in (getattr(block.attn, "compressor", None),
                         getattr(getattr(block.attn, "indexer", None), "compressor", None)):
                if comp is not None:
                    comp.ape.zero_()
            block.ffn.init_weights(std, gen, w2_std=out_std)
            for site in ("attn", "ffn"):
                HyperConnectionSite.init(block, site, cfg.hc_mult, std, gen)
        init_head_collapse(self, cfg.hc_mult, std, gen)
        for block in self.mtp:
            init_head_collapse(block, cfg.hc_mult, std, gen)

    def set_csa_mode(self, mode: str, indexer_loss: bool | None = None) -> None:
        """Attention phase (spec §10.3): 'dense' CSA (all visible compressed entries) early in
        training, 'sparse' (indexer top-k) later; `indexer_loss` turns the indexer's KL on."""
        if mode not in ("dense", "sparse"):
            raise ValueError(f"csa mode {mode!r}: choose 'dense' or 'sparse'")
        self.csa_mode = mode
        if indexer_loss is not None:
            self.compute_indexer_loss = indexer_loss

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, mtp: bool = False) -> ModelCache:
        """An empty inference cache for `batch` rows of up to `max_len` tokens (model dtype and
        device by default); `mtp=True`: the cache of the MTP blocks, for `mtp_draft`."""
        w, cfg = self.embed.weight, self.cfg
        layers = range(cfg.n_layers, cfg.n_layers + cfg.n_mtp_layers) if mtp else None
        return ModelCache(cfg, batch, max_len, dtype or w.dtype, device or w.device, layers)

    def mtp_draft(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: ModelCache,
                  token_mask: torch.Tensor | None = None,
                  logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """The first MTP block, incrementally: `streams` `[batch, seq, hc, dim]` are the main
        model's (`forward(keep_streams=True)`) at the positions `cache.lengths + arange(seq)`,
        `next_ids` `[batch, seq]` the token after each of them; → logits `[batch, k, vocab]`
        for the token after that, at the sequence indices `logits_index` `[batch, k]` (all
        positions when None). `cache` is `new_cache(..., mtp=True)`; the block attends to its
        own earlier positions there, exactly as in the training forward."""
        if not self.mtp:
            raise ValueError("mtp_draft: the model has no MTP block (n_mtp_layers=0)")
        step = cache.begin(next_ids, None, token_mask)
        freqs = {c: rope_frequencies(self.cfg, c).to(next_ids.device) for c in (False, True)}
        ctx = AttentionContext(torch.zeros_like(next_ids), step.positions, freqs, self.csa_mode,
                               False, cache=cache, step=step)
        y, _ = self.mtp[0].predict(streams, self.embed(next_ids), ctx, next_ids, None,
                                   token_mask=token_mask)  # [batch, seq, dim], normed
        cache.commit(step)
        if logits_index is not None:
            y = y.gather(1, logits_index[..., None].expand(-1, -1, y.shape[-1]))
        return self.head(y)

    def shard_experts(self, ep_rank: int, ep_size: int, make_dispatcher) -> None:
        """Expert parallelism: every MoE layer (MTP blocks included) keeps only this rank's
        `n_routed_experts / ep_size` experts and routes through `make_dispatcher(layer_id)`.
        The model never imports the communication layer: it only receives dispatcher objects.
        `expert_parallel` records (ep_rank, ep_size) for checkpointing code."""
        for block in [*self.layers, *self.mtp]:
            block.ffn.shard_experts(ep_rank, ep_size, make_dispatcher(block.ffn.layer_id))
        self.expert_parallel = (ep_rank, ep_size)

    @torch.no_grad()
    def update_router_biases(self, counts: torch.Tensor, speed: float = 1e-3) -> None:
        """Aux-loss-free balancing from per-block expert counts `[n_blocks, E]` (summed over
        micro-batches and data-parallel ranks by the caller)."""
        for block, c in zip([*self.layers, *self.mtp], counts):
            block.ffn.update_bias(c, speed)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, routes=None,
                token_mask: torch.Tensor | None = None, cache: ModelCache | None = None,
                logits_index: torch.Tensor | None = None, mtp: bool = True,
                head: bool = True, keep_streams: bool = False) -> ModelOutput:
        """input_ids `[batch, seq]` → `ModelOutput`; training, prefill and decode alike (the
        arguments: "The forward's arguments" in the module docstring)."""
        run = self._inputs(input_ids, doc_ids, positions, routes, token_mask, cache,
                           logits_index, mtp)
        x, auxes = self._blocks(run)                          # [batch, seq, hc, dim]
        hidden, logits = self._head(x, logits_index, head)  # [batch, seq|k, dim], logits
        mtp_logits, mtp_hidden = self._mtp(x, run, head, auxes) if run.next_ids is not None \
            else ([], [])
        cfg = self.cfg
        routed = [a.balance_loss for i, a in enumerate(auxes) if i >= cfg.n_hash_layers]
        csa = [a.indexer_loss for a, b in zip(auxes, [*self.layers, *self.mtp])
               if b.attn.kind == "csa"]
        zero = hidden.new_zeros((), dtype=torch.float32)
        # under context parallelism each rank reports its share: the group's shares add up
        cp_size = 1 if run.ctx.shard is None else run.ctx.shard.size
        return ModelOutput(
            logits=logits,
            mtp_logits=mtp_logits,
            balance_loss=torch.stack(routed).mean() / cp_size if routed else zero,
            indexer_loss=torch.stack(csa).mean() if csa else zero,
            expert_counts=torch.stack([a.counts for a in auxes]),
            routes=[a.routes for a in auxes],
            live_routes=[a.live_routes for a in auxes],
            hidden=None if head else hidden,
            mtp_hidden=mtp_hidden,
            streams=x if keep_streams else None,
        )

    def _inputs(self, input_ids, doc_ids, positions, routes, token_mask, cache, logits_index,
                mtp) -> "ForwardInputs":
        """Checks the arguments and builds the attention context: the cache step (prefill,
        decode), default documents and positions, the MTP block's next-token ids, and this
        rank's chunks under context parallelism."""
        cfg = self.cfg
        step = None
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids: not supported with a cache (one document per row)")
            step = cache.begin(input_ids, positions, token_mask)
            positions = step.positions
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        if positions is None:
            positions = positions_from_doc_ids(doc_ids)
        n_blocks = cfg.n_layers + cfg.n_mtp_layers
        if routes is not None and len(routes) != n_blocks:
            raise ValueError(f"routes: expected {n_blocks} entries (one per block incl. MTP), "
                             f"got {len(routes)}")
        run_mtp = bool(self.mtp) and mtp and cache is None
        next_ids = mtp_next_ids(input_ids, doc_ids) if run_mtp else None
        shard = None
        if self.context_parallel is not None and cache is None:
            if logits_index is not None:
                raise ValueError("logits_index: not supported under context parallelism")
            shard = self.context_parallel.shard(doc_ids, positions)
            input_ids, doc_ids, positions, token_mask, next_ids, routes = shard.take_all(
                input_ids, doc_ids, positions, token_mask, next_ids, routes)
        freqs = {c: rope_frequencies(cfg, c).to(input_ids.device) for c in (False, True)}
        indexer_loss = self.compute_indexer_loss and torch.is_grad_enabled() and cache is None
        ctx = AttentionContext(doc_ids, positions, freqs, self.csa_mode, indexer_loss,
                               cache=cache, step=step, shard=shard)
        return ForwardInputs(input_ids, token_mask, routes, ctx, next_ids)

    def _blocks(self, run: "ForwardInputs"):
        """Embedding → hc streams → the main blocks (the cache step committed after the last)."""
        h = self.embed(run.input_ids)  # [batch, seq, dim]
        x = h[:, :, None].expand(-1, -1, self.cfg.hc_mult, -1).contiguous()  # [b, s, hc, dim]
        auxes = []
        for i, block in enumerate(self.layers):
            route = None if run.routes is None else run.routes[i]
            x, aux = block(x, run.ctx, run.input_ids, route, run.token_mask)
            auxes.append(aux)
        if run.ctx.cache is not None:
            run.ctx.cache.commit(run.ctx.step)
        return x, auxes

    def _head(self, x: torch.Tensor, logits_index: torch.Tensor | None, head: bool):
        """Streams → (normed head input `[batch, seq|k, dim]`, logits or None)."""
        cfg = self.cfg
        if logits_index is not None:  # [batch, k]: collapse, norm and head only where needed
            x = x.gather(1, logits_index[..., None, None].expand(-1, -1, *x.shape[2:]))
        y = hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.hc_eps,
                    cfg.norm_eps)
        hidden = self.norm(y)
        return hidden, self.head(hidden) if head else None

    def _mtp(self, x: torch.Tensor, run: "ForwardInputs", head: bool, auxes: list):
        """The MTP blocks on the last block's streams: (logits per depth, or with `head=False`
        the normed head inputs per depth); their BlockAux appended to `auxes`."""
        next_embeds = self.embed(run.next_ids)
        logits, hidden = [], []
        for k, block in enumerate(self.mtp):
            r = None if run.routes is None else run.routes[self.cfg.n_layers + k]
            lg, aux = block.predict(x, next_embeds, run.ctx, run.next_ids,
                                    self.head if head else None, r, run.token_mask)
            (logits if head else hidden).append(lg)
            auxes.append(aux)
        return logits, hidden


@dataclass
class ForwardInputs:
    """One forward's inputs after `Transformer._inputs` (this rank's tokens under CP)."""

    input_ids: torch.Tensor              # [batch, seq]
    token_mask: torch.Tensor | None      # [batch, seq] bool
    routes: list | None                  # per block, [batch, seq, topk] or None
    ctx: AttentionContext
    next_ids: torch.Tensor | None        # [batch, seq]: the MTP block's input (None: no MTP)
