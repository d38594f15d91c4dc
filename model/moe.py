"""DeepSeekMoE FFN of DeepSeek-V4 (spec §5): router, hash routing, grouped experts, shared expert.

Every block's FFN is an MoE. Data flow of one call (T = batch*seq tokens, k = topk, E experts):

    scores [T, E] = score_func(x @ gate.weight^T)                         (fp32)
    ids    [T, k] = top-k(scores + bias) | tid2eid[input_ids] (hash layers) | replayed routes
    (replayed: the router's own pick is still computed, as `live_routes`, to log agreement)
    w      [T, k] = scores gathered at ids, normalised over the k picks, times route_scale
    dispatcher.dispatch -> copies sorted by expert -> Experts (grouped SwiGLU, w applied to h
    before w2) -> dispatcher.combine (sum of the k copies) + shared expert -> input dtype

Parameter and buffer names follow the released checkpoint (`gate.weight`, `gate.bias`,
`gate.tid2eid`, `experts.w{1,2,3}` stacked over experts, `shared_experts.w{1,2,3}.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import v4kernels
from model.config import ModelConfig
from model.norm import fp32_island
from model.dispatcher import LocalDispatcher, TokenDispatcher
from model.expert_gemm import (GROUPED_MM_ALIGN, cpu_grouped_mm,  # noqa: F401 (re-exported)
                               cpu_inference_grouped_mm, experts_grouped_mm, experts_padded,
                               grouped_mm_usable, swiglu)


@dataclass
class MoEOutput:
    out: Tensor            # [batch, seq, dim], input dtype
    # [] fp32, unweighted sequence-wise balance loss (0 on hash layers and without autograd)
    balance_loss: Tensor
    counts: Tensor         # [n_routed_experts] fp32, copies routed per expert (valid tokens)
    routes: Tensor         # [batch, seq, topk] int64 expert ids used
    # [batch, seq, topk] int64, detached: what the router itself would pick (top-k of the biased
    # scores; hash ids on hash layers) when `routes` were replayed; None otherwise (and on a
    # hash layer replayed without input_ids, which has no table lookup to make)
    live_routes: Tensor | None = None


# ---------------------------------------------------------------------------------- numerics
def route_scores(logits: Tensor, score_func: str) -> Tensor:
    """Router affinities from fp32 logits; sqrtsoftplus is V4's, the others are V3/V2's."""
    if score_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"score_func={score_func!r}: choose sqrtsoftplus, sigmoid or softmax")


# ---------------------------------------------------------------------------------- hash table
def hash_seed(cfg: ModelConfig, layer_id: int) -> int:
    """Each hash layer gets its own table (otherwise layers 0..2 would route identically), a
    pure function of the config so it never depends on init order or the init generator."""
    return int(cfg.seed) * 1_000_003 + int(layer_id)


def build_hash_table(vocab_size: int, n_experts: int, topk: int, seed: int) -> Tensor:
    """A frozen token -> expert table ([vocab_size, topk] int64), balanced and deterministic.

    The released table is unpublished (spec §5.2, §12.3), so we build our own:
    1. Lay out vocab_size*topk slots and fill them with consecutive random permutations of the
       E experts (one "block" per permutation, drawn from a CPU generator seeded with `seed`).
       Each expert appears exactly once per full block, so per-expert token counts differ by at
       most 1 (≈ vocab*k/E each): perfect static balance.
    2. Token t takes slots [t*k, (t+1)*k). Within a block the ids are distinct. A token whose
       slots straddle a block boundary (only when k does not divide E) could get an expert
       twice; we then swap each clashing head-of-block entry with the first later entry of the
       same block that does not clash. Swaps stay inside one permutation, so balance is kept.
    Random permutations (rather than e.g. t*k+j mod E) make the expert *combinations* varied,
    which is what lets k experts per token represent more than E distinct routes.
    """
    if not 0 < topk <= n_experts:
        raise ValueError(f"topk={topk}: must be in [1, n_experts={n_experts}]")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: must be positive")
    total = vocab_size * topk
    n_blocks = -(-total // n_experts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(n_blocks, n_experts, generator=gen)                  # [blocks, E]
    blocks = keys.argsort(dim=1, stable=True)                               # [blocks, E] perms
    if n_experts % topk:
        rows = blocks.tolist()
        for b in range(1, n_blocks):
            tail_len = (b * n_experts) % topk  # slots of the straddling token in block b-1
            if tail_len:
                _separate_head(rows[b], set(rows[b - 1][n_experts - tail_len:]), topk - tail_len)
        blocks = torch.tensor(rows, dtype=torch.int64)
    return blocks.reshape(-1)[:total].reshape(vocab_size, topk).clone()


def _separate_head(block: list[int], tail: set[int], head_len: int) -> None:
    """Swaps clashing entries out of block[:head_len]; a partner always exists because the
    block holds E - k + (#clashes) non-clashing entries after the head and k <= E."""
    q = head_len
    for p in range(head_len):
        if block[p] in tail:
            while block[q] in tail:
                q += 1
            block[p], block[q] = block[q], block[p]
            q += 1


# ---------------------------------------------------------------------------------- router
class Gate(nn.Module):
    """Router. Scores in fp32 from `weight`; selection by score + `bias` (non-hash layers) or by
    the frozen `tid2eid` table (hash layers); routing weights always from the unbiased scores.

    `bias` (the checkpoint's e_score_correction_bias) is a persistent buffer so no optimizer or
    gradient ever touches it; it moves only through `MoE.update_bias`. Keep it fp32: a bf16
    bias cannot absorb 1e-3 steps once it has grown.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.route_scale = float(cfg.route_scale)
        self.vocab_size = cfg.vocab_size
        # MTP blocks have layer_id >= n_layers >= n_hash_layers, so they are never hash-routed.
        self.is_hash = layer_id < cfg.n_hash_layers
        self.seed = hash_seed(cfg, layer_id)
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.dim))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.empty(self.vocab_size, self.topk,
                                                        dtype=torch.int64), persistent=True)
        else:
            self.register_buffer("bias", torch.empty(self.n_experts, dtype=torch.float32),
                                 persistent=True)
        if not self.weight.is_meta:
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero bias / rebuild the hash table (also after `to_empty` from the meta device)."""
        if self.is_hash:
            if not self.tid2eid.is_meta:
                table = build_hash_table(self.vocab_size, self.n_experts, self.topk, self.seed)
                self.tid2eid.copy_(table)
        else:
            self.bias.zero_()

    def forward(self, x: Tensor, input_ids: Tensor | None,
                routes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, dim], input_ids [T] | None, routes [T, k] | None ->
        (weights [T, k] fp32, expert ids [T, k] int64, scores [T, E] fp32)."""
        with fp32_island(x):
            logits = F.linear(x.float(), self.weight.float())             # [T, E]
        scores = route_scores(logits, self.score_func)                    # [T, E]
        if routes is not None:        # RL routing replay: ids fixed, weights from current scores
            idx = routes.long()
        else:
            idx = self.select(scores, input_ids)                          # [T, k]
        # Normalised over the k picks for every score_func (spec §5.1's formula); note the
        # released reference code skips this normalisation when score_func is softmax.
        weights = scores.gather(1, idx)                                   # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return weights, idx, scores

    def select(self, scores: Tensor, input_ids: Tensor | None) -> Tensor:
        """The router's own pick: scores [T, E] fp32, input_ids [T] (hash layers) -> [T, k]
        int64, no gradient (selection is discrete; the bias only steers it)."""
        if self.is_hash:
            return self.tid2eid[input_ids]
        biased = scores.detach() + self.bias.float()                      # [T, E]
        return biased.topk(self.topk, dim=-1).indices


# ---------------------------------------------------------------------------------- experts
class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: w1/w3 [E, inter, dim], w2 [E, dim, inter].

    Computes on whatever expert-sorted rows and per-expert counts it is given, so under expert
    parallelism it holds only this rank's E_local experts and the dispatcher feeds it local
    rows. `impl` picks the kernel: "auto" (grouped_mm when usable, else padded), "padded",
    "grouped_mm".
    """

    IMPLS = ("auto", "padded", "grouped_mm")

    def __init__(self, n_experts: int, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.swiglu_limit = float(swiglu_limit)
        self.impl = "auto"
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: Tensor, counts: Tensor, weights: Tensor | None = None) -> Tensor:
        """x [N, dim] grouped by expert, counts [E_local] (sum N), weights [N] | None ->
        [N, dim] in x's dtype (matmuls in x's dtype, activation in fp32)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected [tokens, {self.dim}], got {tuple(x.shape)}")
        if counts.shape != (self.n_experts,):
            raise ValueError(f"counts: expected [{self.n_experts}], got {tuple(counts.shape)}")
        if weights is not None and weights.shape != (x.shape[0],):
            raise ValueError(f"weights: expected [{x.shape[0]}], got {tuple(weights.shape)}")
        if self.impl not in self.IMPLS:
            raise ValueError(f"Experts.impl={self.impl!r}: choose one of {self.IMPLS}")
        if x.shape[0] == 0:
            # Keep the (empty) output on the autograd graph: under expert parallelism a rank
            # whose experts got no token must still run the backward all-to-all with the others.
            return x * 0
        w1, w3, w2 = (w.to(x.dtype) for w in (self.w1, self.w3, self.w2))
        counts = counts.long()
        use_grouped = (self.impl == "grouped_mm"
                       or (self.impl == "auto" and grouped_mm_usable(x, w1)))
        if use_grouped:
            fn = experts_grouped_mm
        elif self.impl == "auto" and cpu_inference_grouped_mm(x, w1):
            return experts_grouped_mm(x, counts, weights, w1, w3, w2, self.swiglu_limit,
                                      align=1, mm=cpu_grouped_mm)
        elif v4kernels.use_triton(x, w1):
            fn = v4kernels.grouped_swiglu_experts  # Triton grouped GEMMs, same contract
        else:
            fn = experts_padded
        return fn(x, counts, weights, w1, w3, w2, self.swiglu_limit)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised bias-free Linear on the current default device (meta under
    `with torch.device('meta')`), so construction neither allocates there nor wastes a
    kaiming init that `init_weights` overwrites anyway."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False,
                              device=torch.get_default_device())


class SharedExpert(nn.Module):
    """Dense SwiGLU every token goes through, with the same clamp as the routed experts (the
    current reference revision clamps it too, spec §5.3)."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.swiglu_limit = float(swiglu_limit)
        self.w1 = _linear(dim, inter_dim)
        self.w3 = _linear(dim, inter_dim)
        self.w2 = _linear(inter_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Matmuls in x's dtype (like `Experts`), activation in fp32."""
        w1, w3, w2 = (lin.weight.to(x.dtype) for lin in (self.w1, self.w3, self.w2))
        h = swiglu(F.linear(x, w1), F.linear(x, w3), self.swiglu_limit)   # [..., inter] fp32
        return F.linear(h.to(x.dtype), w2)                                # [..., dim]


# ---------------------------------------------------------------------------------- losses
def sequence_balance_loss(scores: Tensor, idx: Tensor, valid: Tensor | None,
                          sequence_sum=None) -> Tensor:
    """V3's sequence-wise balance loss (spec §5.4), unweighted, mean over batch rows.

    Per row with T valid tokens: f_e = E/(k*T) * #{t: e in ids(t)}, P_e = mean_t s'_{t,e} with
    s' the scores normalised over all experts; L = sum_e f_e * P_e (1 at perfect balance).
    Gradients flow through P only. Rows without valid tokens are left out of the mean.
    scores [B, S, E] fp32, idx [B, S, k], valid [B, S] bool | None -> [] fp32.
    `sequence_sum` (context parallelism: the S tokens are this rank's part of each row) sums
    the per-row counts and probability sums over the rows' other parts, differentiably.
    """
    b, s, n_exp = scores.shape
    k = idx.shape[-1]
    mask = (torch.ones(b, s, device=scores.device) if valid is None
            else valid.to(torch.float32))                                 # [B, S]
    n_valid = mask.sum(dim=1)                                             # [B]
    hits = scores.new_zeros(b, n_exp).scatter_add_(
        1, idx.reshape(b, s * k), mask[:, :, None].expand(b, s, k).reshape(b, s * k))  # [B, E]
    probs = scores / scores.sum(dim=-1, keepdim=True)                     # [B, S, E]
    p_sum = (probs * mask[:, :, None]).sum(dim=1)                         # [B, E]
    if sequence_sum is not None:
        stats = sequence_sum(torch.cat((hits, p_sum, n_valid[:, None]), dim=1))
        hits, p_sum, n_valid = stats[:, :n_exp], stats[:, n_exp:-1], stats[:, -1].detach()
    denom = n_valid.clamp(min=1)                                          # [B]
    f = hits.detach() * (n_exp / k) / denom[:, None]                      # [B, E]
    p = p_sum / denom[:, None]                                            # [B, E]
    per_row = (f * p).sum(dim=-1)                                         # [B]
    has_tokens = (n_valid > 0).float()                                    # [B]
    return (per_row * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def expert_counts(idx: Tensor, valid: Tensor | None, n_experts: int) -> Tensor:
    """Copies routed per expert over valid tokens: idx [B, S, k] -> [E] fp32 (no host sync)."""
    src = (torch.ones(idx.shape, device=idx.device) if valid is None
           else valid[..., None].expand(idx.shape).to(torch.float32))     # [B, S, k]
    return torch.zeros(n_experts, device=idx.device).scatter_add_(
        0, idx.reshape(-1), src.reshape(-1))


def routing_agreement(replayed: Tensor, live: Tensor, mask: Tensor | None = None) -> Tensor:
    """Keep Routing's health metric: the fraction of replayed (token, expert) picks that the
    live router also picks. replayed, live [..., k] int (live may have another k), mask [...]
    bool | None -> [] fp32: per token |replayed ∩ live| / k as sets (picks within a token are
    distinct, as top-k and the hash table make them), averaged over the masked tokens (NaN
    when there are none: nothing to agree on)."""
    if replayed.shape[:-1] != live.shape[:-1] or replayed.dim() < 1:
        raise ValueError(f"routing_agreement: replayed {tuple(replayed.shape)} and live "
                         f"{tuple(live.shape)} must agree on all but the last dim")
    if replayed.is_floating_point() or live.is_floating_point():
        raise ValueError("routing_agreement: expected integer expert ids")
    live = live.to(replayed.device)
    found = (replayed[..., :, None] == live[..., None, :]).any(-1)        # [..., k]
    per_token = found.float().mean(-1)                                    # [...]
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape or mask.dtype != torch.bool:
        raise ValueError(f"routing_agreement: mask must be bool {tuple(per_token.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return per_token[mask.to(per_token.device)].mean()


# ---------------------------------------------------------------------------------- module
class MoE(nn.Module):
    """DeepSeekMoE FFN of block `layer_id` (layer ids >= n_layers are MTP blocks)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        n_blocks = cfg.n_layers + cfg.n_mtp_layers
        if not 0 <= layer_id < n_blocks:
            raise ValueError(f"layer_id={layer_id}: must be in [0, {n_blocks}) "
                             f"(n_layers + n_mtp_layers)")
        self.layer_id = layer_id
        self.dim = cfg.dim
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.vocab_size = cfg.vocab_size
        self.gate = Gate(cfg, layer_id)
        self.is_hash = self.gate.is_hash
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)
        self.expert_offset = 0  # global index of experts.w*[0] (non-zero under EP)
        self.shared_experts = (
            SharedExpert(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts, cfg.swiglu_limit)
            if cfg.n_shared_experts > 0 else None)
        # Replaceable (`moe.dispatcher = ...`): the expert-parallel all-to-all plugs in here.
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.n_routed_experts)

    def forward(self, x: Tensor, input_ids: Tensor | None, routes: Tensor | None = None,
                token_mask: Tensor | None = None, sequence_sum=None) -> MoEOutput:
        """x [B, S, dim]; input_ids [B, S] (needed on hash layers); routes [B, S, k] expert ids
        to replay (RL); token_mask [B, S] bool, False = padding (kept out of counts and the
        balance loss, still computed); `sequence_sum`: see `sequence_balance_loss`."""
        b, s = self._check_inputs(x, input_ids, routes, token_mask)
        t, k = b * s, self.topk
        x_flat = x.reshape(t, self.dim)                                   # [T, dim]
        ids_flat = input_ids.reshape(t) if input_ids is not None else None
        routes_flat = routes.reshape(t, k) if routes is not None else None
        weights, idx, scores = self.gate(x_flat, ids_flat, routes_flat)   # [T,k] [T,k] [T,E]
        live = None
        if routes is not None and (ids_flat is not None or not self.is_hash):
            live = self.gate.select(scores, ids_flat).reshape(b, s, k)    # [B, S, k]

        x_sorted, local_counts, handle = self.dispatcher.dispatch(x_flat, idx, weights)
        y_sorted = self.experts(x_sorted, local_counts, handle.weights)   # [N, dim]
        y = self.dispatcher.combine(y_sorted, handle)                     # [T, dim] fp32
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_flat).float()

        idx = idx.reshape(b, s, k)                                        # [B, S, k]
        counts = expert_counts(idx, token_mask, self.n_experts)           # [E]
        if self.is_hash or not torch.is_grad_enabled():
            # Hash selection is fixed by the table, so f_e cannot respond: the loss could only
            # bend the router's weights, not balance anything. Spec §12.9 leaves it open.
            # Without autograd (generation, evaluation) nothing trains on it: reported as 0.
            loss = torch.zeros((), device=x.device, dtype=torch.float32)
        else:
            loss = sequence_balance_loss(scores.reshape(b, s, -1), idx, token_mask, sequence_sum)
        return MoEOutput(out=y.to(x.dtype).reshape(b, s, self.dim), balance_loss=loss,
                         counts=counts, routes=idx.detach(), live_routes=live)

    def _check_inputs(self, x: Tensor, input_ids: Tensor | None, routes: Tensor | None,
                      token_mask: Tensor | None) -> tuple[int, int]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [batch, seq, {self.dim}], got {tuple(x.shape)}")
        b, s = x.shape[:2]
        # Value checks read the tensors on the host; skip them while tracing with compile.
        check_values = not torch.compiler.is_compiling()
        if input_ids is not None:
            if input_ids.shape != (b, s) or input_ids.is_floating_point():
                raise ValueError(f"input_ids: expected integer [{b}, {s}], got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}")
            if self.is_hash and check_values and input_ids.numel() and bool(
                    ((input_ids < 0) | (input_ids >= self.vocab_size)).any()):
                raise ValueError(f"input_ids: ids must lie in [0, {self.vocab_size})")
        elif self.is_hash and routes is None:
            raise ValueError(f"input_ids: required by hash-routed layer {self.layer_id}")
        if routes is not None:
            if routes.shape != (b, s, self.topk) or routes.is_floating_point():
                raise ValueError(f"routes: expected integer [{b}, {s}, {self.topk}], got "
                                 f"{routes.dtype} {tuple(routes.shape)}")
            if check_values and routes.numel() and bool(
                    ((routes < 0) | (routes >= self.n_experts)).any()):
                raise ValueError(f"routes: expert ids must lie in [0, {self.n_experts})")
        if token_mask is not None and (token_mask.shape != (b, s)
                                       or token_mask.dtype != torch.bool):
            raise ValueError(f"token_mask: expected bool [{b}, {s}], got {token_mask.dtype} "
                             f"{tuple(token_mask.shape)}")
        return b, s

    @torch.no_grad()
    def shard_experts(self, ep_rank: int, ep_size: int, dispatcher: TokenDispatcher) -> None:
        """Expert parallelism: keep only experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of the stacks
        (fresh contiguous tensors, so the full stacks can be freed) and route through
        `dispatcher`, which must deliver rows for exactly those local experts. Router, bias,
        hash table and shared expert stay whole (they see every expert / every token)."""
        if ep_size < 1 or self.n_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_size={ep_size}, ep_rank={ep_rank}: ep_size must divide "
                             f"n_routed_experts={self.n_experts} and 0 <= ep_rank < ep_size")
        e_loc = self.n_experts // ep_size
        if dispatcher.n_local_experts != e_loc:
            raise ValueError(f"dispatcher holds {dispatcher.n_local_experts} local experts, "
                             f"expected {e_loc}")
        ex = self.experts
        if ex.n_experts != self.n_experts:
            raise RuntimeError(f"layer {self.layer_id}: experts are already sharded")
        lo = ep_rank * e_loc
        for name in ("w1", "w3", "w2"):
            full = getattr(ex, name)
            local = nn.Parameter(full.detach()[lo:lo + e_loc].clone(),
                                 requires_grad=full.requires_grad)
            setattr(ex, name, local)
        ex.n_experts = e_loc
        self.expert_offset = lo
        self.dispatcher = dispatcher

    @torch.no_grad()
    def update_bias(self, counts: Tensor, speed: float = 1e-3) -> None:
        """Aux-loss-free balancing (spec §5.4): b_e += speed * sign(mean(counts) - counts_e),
        so overloaded experts become less likely picks. `counts` is the load since the last
        update (e.g. summed `MoEOutput.counts` over micro-batches, all-reduced over data
        parallel ranks). No-op on hash layers, whose selection ignores any bias."""
        if self.is_hash:
            return
        if counts.shape != (self.n_experts,):
            raise ValueError(f"counts: expected [{self.n_experts}], got {tuple(counts.shape)}")
        c = counts.detach().to(device=self.gate.bias.device, dtype=torch.float32)
        self.gate.bias.add_(torch.sign(c.mean() - c), alpha=speed)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None,
                     w2_std: float | None = None) -> None:
        """normal(0, std) for the router and shared expert from `generator`, in a fixed order
        (gate.weight, shared w1, w3, w2); each routed expert from its own generator seeded by
        (generator's seed, layer, global expert index), so a rank holding experts [lo, hi) under
        expert parallelism initialises exactly the slice the full model would have, without
        ever materialising the other experts. Down projections use `w2_std` (default `std`):
        V4's init is unpublished (spec §12.2), so any depth scaling is the transformer's
        decision, passed in here. Resets the bias to zero and rebuilds the hash table. Meta
        tensors are skipped."""
        w2_std = std if w2_std is None else w2_std
        plan = [(self.gate.weight, std)]
        if self.shared_experts is not None:
            se = self.shared_experts
            plan += [(se.w1.weight, std), (se.w3.weight, std), (se.w2.weight, w2_std)]
        for tensor, sd in plan:
            _normal_(tensor, sd, generator)
        base = generator.initial_seed() if generator is not None else torch.initial_seed()
        ex = self.experts
        for i in range(ex.n_experts):
            e = self.expert_offset + i
            gen = torch.Generator().manual_seed((base * 1000003 + self.layer_id * 4099 + e)
                                                % (1 << 63))
            for tensor, sd in ((ex.w1, std), (ex.w3, std), (ex.w2, w2_std)):
                _normal_(tensor[i:i + 1], sd, gen)
        self.gate.reset_buffers()


def _normal_(t: Tensor, std: float, generator: torch.Generator | None) -> None:
    """normal_(0, std) that tolerates meta tensors and a generator on another device (sampled
    there slice by slice and copied, so results do not depend on where the weights live)."""
    if t.is_meta:
        return
    if generator is None or generator.device == t.device:
        t.normal_(0.0, std, generator=generator)
        return
    for row in t:  # one expert / one output row at a time keeps the staging buffer small
        row.copy_(torch.empty(row.shape, device=generator.device).normal_(
            0.0, std, generator=generator))
