"""The dry-run planner: parameters, memory per rank and tokens per step, before any allocation.

Memory per rank (bytes per parameter, `p` = parameters resident on the rank; "owned" = the
rank's share under whole-matrix ownership, dense / dp + experts / (dp / ep)):
- weights: 2 (bf16) or 4 (fp32); bf16 training also keeps an fp32 master copy: +4 per resident
  parameter at `zero_stage` 0, +4 per owned one at stages 1 and 2;
- gradients: one micro-batch's in the parameter dtype, plus fp32 ones: per resident parameter at
  stage 0 (bf16 runs) and stage 1 (the local fp32 accumulation), per owned one at stage 2, plus
  the owners' fp32 reduced gradient at stages 1 and 2 and one fp32 reduce bucket (`BUCKET`);
- optimizer: Muon momentum 4 per Muon parameter, split over data-parallel ranks by whole
  matrices; AdamW moments 8 per AdamW parameter, replicated at stage 0 and owned at 1 and 2;
- routed experts are split over `ep_size` ranks; everything else is replicated. Muon momentum of
  experts is split over the expert-data-parallel group (world / ep ranks holding the same experts);
- expert-parallel traffic: per token and MoE layer, dispatch sends k copies of the hidden state
  (activation dtype) plus a fp32 routing weight, combine returns k hidden states; under uniform
  routing a fraction (ep-1)/ep of them leaves the rank (`dispatch_bytes_per_token`).
- stage 3 (`optim.weight_sharding`): the blocks' parameters (`_block_counts`: the layers and
  the MTP blocks' inner block; routed experts only when their expert-data-parallel group has
  more than one rank) are held 1/dp (experts 1/(dp/ep)) plus one gathered block; gradients are
  the replicated parameters' bf16 ones plus one block's, the owners' fp32 reduced gradient and
  one reduce bucket;
- frozen models (GRPO's reference policy, distillation's teachers; `frozen_models`): weights
  only, in their own dtype (bf16 2 bytes, fp32 4 per parameter), experts split over `ep_size`
  like the policy's (`load_frozen_model` shards them the same way); no gradients or optimizer.
Workspace (`workspace_bytes`, transient): the optimizer step's Newton-Schulz buffers, about 7
fp32 copies of the largest same-shape batch of matrices a rank orthogonalises (capped by
MuonAdamW's `max_ns_batch_numel`), and at stage 0 in fp32 DeepSpeed's flattened all-reduce
buffer.
Activations are an estimate per micro-batch (documented in `activation_bytes`); they are the
least exact line, within about 2x of what a profiler shows.

Communication per optimizer step (`comm_terms`, bytes a rank sends, and seconds at `Links`):
dense gradients ring all-reduced over data parallel (stage 0) or reduced to their owners in
fp32 (once per step at stage 1, once per micro-batch at stages 2 and 3), expert gradients the
same over the ranks holding the same experts, the owners' broadcast of updated matrices (Muon's
at stage 0, every parameter at 1 and 2, the parameters outside the blocks at 3), stage 3's
per-block weight gathers (forward and backward of every micro-batch), and the MoE all-to-all
(forward, backward, and the checkpointed forward's recompute). A term's time is its bytes over
the link it crosses: NVLink when its group fits in one node, the inter-node NIC otherwise (a
ring is as slow as its slowest hop); all-to-all traffic splits by the share of peers on other
nodes. No overlap with compute is assumed: the figures say which term dominates, not the step
time.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.summary import build_meta
from optim.groups import ADAMW, assign

BUCKET = 1 << 26   # elements of one fp32 reduce bucket (MuonAdamW's bucket_numel)
NS_BATCH = 1 << 26  # MuonAdamW's max_ns_batch_numel
NS_COPIES = 7       # directions + stacked input + Newton-Schulz iterates, fp32 (measured ~7)
DS_ALLREDUCE = 500_000_000  # DeepSpeed's elements per flattened all-reduce buffer (stage 0)


@dataclass(frozen=True)
class Links:
    """Per-GPU link bandwidths (bytes/s, one direction). Defaults: H200 nodes of 8 with NVLink 4
    (450 GB/s per GPU) and one 400 Gb/s NIC per GPU between nodes."""
    gpus_per_node: int = 8
    intra_node: float = 450e9
    inter_node: float = 400e9 / 8


@dataclass(frozen=True)
class CommTerm:
    name: str
    bytes: float       # sent per rank per optimizer step
    seconds: float     # at `Links`, no overlap
    link: str          # "nvlink" | "network" | "mixed" | "-"


@dataclass
class Plan:
    world: int
    dp: int
    ep: int
    total_params: int
    activated_params: int
    params_per_rank: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    tokens_per_step: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    expert_params_per_rank: int = 0
    dispatch_bytes: float = 0.0   # per token per MoE layer, forward (dispatch + combine)
    frozen: tuple = ()            # (name, parameters resident per rank, weight bytes per rank)
    comm: tuple = ()              # CommTerm per communication kind, per optimizer step
    zero_stage: int = 0
    checkpointing: str = "off"
    workspace: float = 0.0        # transient: Newton-Schulz and all-reduce buffers
    step_grads: float = 0.0       # gradient bytes still held during the optimizer step
    cp: int = 1                   # context parallelism: world = dp x cp

    @property
    def frozen_bytes(self) -> float:
        return float(sum(b for _, _, b in self.frozen))

    @property
    def total(self) -> float:
        """The peak: what persists, plus the larger of the backward's transients (gradients,
        activations) and the optimizer step's (the gradients it still holds, workspace)."""
        return (self.weights + self.optimizer + self.frozen_bytes
                + max(self.grads + self.activations, self.step_grads + self.workspace))

    def format(self) -> str:
        gib = 2 ** 30
        rows = [
            f"world {self.world} = data-parallel {self.dp} x context-parallel {self.cp} "
            f"(expert-parallel {self.ep}), "
            f"zero_stage {self.zero_stage}, activation checkpointing {self.checkpointing}",
            f"parameters: {self.total_params / 1e9:.2f}B total, "
            f"{self.activated_params / 1e9:.2f}B activated per token, "
            f"{self.params_per_rank / 1e9:.2f}B resident per rank",
            f"tokens per step: {self.tokens_per_step:,} "
            f"(micro-batch {self.micro_batch} x seq {self.seq_len} x accumulation "
            f"{self.grad_accum} x dp {self.dp}"
            + (f"; each sequence over {self.cp} ranks, {self.seq_len // self.cp:,} tokens each"
               if self.cp > 1 else "") + ")",
            "memory per rank:",
            f"  weights      {self.weights / gib:10.2f} GiB",
            f"  gradients    {self.grads / gib:10.2f} GiB",
            f"  optimizer    {self.optimizer / gib:10.2f} GiB",
            f"  activations  {self.activations / gib:10.2f} GiB (estimate)",
            f"  workspace    {self.workspace / gib:10.2f} GiB (optimizer step, with "
            f"{self.step_grads / gib:.2f} GiB of gradients still held; the peak counts the larger "
            f"of this and gradients + activations)",
            *(f"  {name:<12} {b / gib:10.2f} GiB (frozen: {n / 1e9:.2f}B parameters per "
              f"rank, weights only)" for name, n, b in self.frozen),
            f"  total        {self.total / gib:10.2f} GiB",
            f"routed experts: {self.expert_params_per_rank / 1e9:.2f}B parameters per rank; "
            f"all-to-all {self.dispatch_bytes / 1024:.1f} KiB per token per MoE layer "
            f"(forward, dispatch + combine; backward the same again)",
        ]
        if self.comm:
            slowest = max(self.comm, key=lambda t: t.seconds)
            rows.append("communication per optimizer step and rank (no overlap assumed):")
            rows += [f"  {t.name:<22} {t.bytes / gib:9.2f} GiB  {t.seconds * 1e3:9.1f} ms  "
                     f"({t.link})" for t in self.comm]
            if slowest.seconds > 0:
                rows.append(f"  dominant: {slowest.name}")
        return "\n".join(rows)


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype_bytes: int,
                     checkpointing: str, context: int | None = None,
                     csa_dense: bool = False) -> float:
    """Saved activations of one micro-batch of `seq_len` tokens per row (this rank's under
    context parallelism) in rows of `context` tokens (default `seq_len`). Per token and block
    without checkpointing: the hc streams a few times over (mHC pre/post in fp32: ~6·hc·d·4),
    the attention projections and output (~(2·q_lora + 3·heads·c + g·o_lora)·dtype), fp32
    scores and probabilities over the window (~heads·2w·4) and over the compressed entries a
    query scores (`compressed_entries`: HCA's context/m grow with the row, so long rows are
    superlinear) and the MoE (k·(3·inter + d)·dtype). Block checkpointing keeps only each
    block's input streams plus one block's full set; selective keeps the mHC part."""
    tokens = micro_batch * seq_len
    hc_bytes = 6 * cfg.hc_mult * cfg.dim * 4
    attn = ((2 * cfg.q_lora_rank + 3 * cfg.n_heads * cfg.head_dim
             + cfg.o_groups * cfg.o_lora_rank) * dtype_bytes + cfg.n_heads * 2 * cfg.window_size * 4
            + cfg.n_heads * 2 * 4 * compressed_entries(cfg, context or seq_len, csa_dense))
    moe = cfg.n_activated_experts * (3 * cfg.moe_inter_dim + cfg.dim) * dtype_bytes
    full = hc_bytes + attn + moe
    blocks = cfg.n_layers + cfg.n_mtp_layers
    logits = cfg.vocab_size * 4 * (1 + cfg.n_mtp_layers)
    if checkpointing == "block":
        per_token = blocks * cfg.hc_mult * cfg.dim * dtype_bytes + full
    elif checkpointing == "selective":
        per_token = blocks * hc_bytes + attn + moe
    else:
        per_token = blocks * full
    return tokens * (per_token + logits)


def compressed_entries(cfg: ModelConfig, context: int, csa_dense: bool = False) -> int:
    """The most compressed entries one query scores in any layer, in rows of `context`: all of
    an HCA layer's context/m, a CSA layer's top-k (all context/4 in the dense phase)."""
    most = 0
    for ratio in cfg.compress_ratios[:cfg.n_layers + cfg.n_mtp_layers]:
        if ratio == 4:
            most = max(most, context // 4 if csa_dense else min(cfg.index_topk, context // 4))
        elif ratio:
            most = max(most, context // ratio)
    return most


def _ring_seconds(nbytes: float, group: int, stride: int, links: Links) -> tuple[float, str]:
    """A ring over `group` ranks spaced `stride` apart: inside one node or across nodes."""
    if group <= 1 or nbytes == 0:
        return 0.0, "-"
    if group * stride <= links.gpus_per_node:
        return nbytes / links.intra_node, "nvlink"
    return nbytes / links.inter_node, "network"


def comm_terms(cfg: ModelConfig, dp: int, ep: int, dense: int, experts: int, muon_dense: int,
               muon_experts: int, tokens_per_rank: int, grad_bytes: int, act_bytes: int,
               checkpointing: str, links: Links = Links(), zero_stage: int = 0,
               grad_accum: int = 1, block_dense: int = 0, block_experts: int = 0
               ) -> tuple[CommTerm, ...]:
    """Per-rank traffic of one optimizer step (module doc). `dense`/`experts`: parameters the
    rank holds outside/inside the routed experts; `muon_*`: those Muon updates (broadcast by
    their owners at stage 0); `tokens_per_rank`: micro-batch x seq x accumulation;
    `block_*`: of those, the parameters stage 3 gathers per block."""
    terms = []

    def ring(name: str, n_bytes: float, group: int, stride: int, all_reduce: bool):
        factor = 2 * (group - 1) / group if all_reduce else (group - 1) / group
        sent = n_bytes * factor if group > 1 else 0.0
        seconds, link = _ring_seconds(sent, group, stride, links)
        terms.append(CommTerm(name, sent, seconds, link))

    edp = dp // ep  # ranks holding the same experts, ep apart
    if zero_stage == 0:
        ring("dense grad all-reduce", dense * grad_bytes, dp, 1, True)
        ring("expert grad all-reduce", experts * grad_bytes, edp, ep, True)
        ring("muon broadcast", muon_dense * act_bytes, dp, 1, False)
        ring("expert muon broadcast", muon_experts * act_bytes, edp, ep, False)
    else:  # fp32 on the wire; stages 2 and 3 reduce every micro-batch
        times = grad_accum if zero_stage >= 2 else 1
        ring("dense grad reduce", dense * 4 * times, dp, 1, False)
        ring("expert grad reduce", experts * 4 * times, edp, ep, False)
        gathered_d, gathered_e = (block_dense, block_experts) if zero_stage == 3 else (0, 0)
        ring("weight broadcast", (dense - gathered_d) * act_bytes, dp, 1, False)
        ring("expert weight broadcast", (experts - gathered_e) * act_bytes, edp, ep, False)
        if zero_stage == 3:  # every block gathered in forward and again in backward
            ring("block weight gather", 2 * grad_accum * gathered_d * act_bytes, dp, 1, False)
            ring("expert block gather", 2 * grad_accum * gathered_e * act_bytes, edp, ep, False)
    passes = 3 if checkpointing in ("block", "selective") else 2  # fwd, bwd (+ recompute)
    moe_layers = cfg.n_layers + cfg.n_mtp_layers
    a2a = tokens_per_rank * moe_layers * passes * dispatch_bytes_per_token(cfg, ep, act_bytes)
    if ep > 1 and a2a:
        local = min(ep, links.gpus_per_node)
        off_node = (ep - local) / (ep - 1)  # share of the other EP ranks on other nodes
        seconds = a2a * (off_node / links.inter_node + (1 - off_node) / links.intra_node)
        link = "nvlink" if off_node == 0 else "mixed"
        terms.append(CommTerm("moe all-to-all", a2a, seconds, link))
    else:
        terms.append(CommTerm("moe all-to-all", 0.0, 0.0, "-"))
    return tuple(terms)


_PARAMETERS: dict[str, list] = {}


def workspace_bytes(cfg: ModelConfig, dp: int, ep: int, zero_stage: int, resident: int,
                    bf16: bool = True) -> float:
    """Transient bytes of the optimizer step (module doc): Newton-Schulz on the largest batch of
    same-shape Muon matrices one rank owns (whole matrices, spread evenly over the owners),
    plus DeepSpeed's flattened all-reduce buffer at stage 0 in fp32 (its bf16 wrapper reduces
    its own flat fp32 gradient buffer in place)."""
    per_shape: dict[tuple, float] = {}
    for name, p in _parameters(cfg):
        if p.dim() < 2 or assign(name, p.shape)[0] == ADAMW:
            continue
        expert = ".ffn.experts." in name
        owners = dp // ep if expert else dp
        local = (p.numel() // ep if expert else p.numel()) / owners
        key = tuple(p.shape[-2:])
        per_shape[key] = per_shape.get(key, 0.0) + local
    ns = NS_COPIES * 4 * min(NS_BATCH, max(per_shape.values(), default=0.0))
    allreduce = 4 * min(DS_ALLREDUCE, resident) if zero_stage == 0 and dp > 1 and not bf16 \
        else 0.0
    return ns + allreduce


_COUNTS: dict[tuple, tuple] = {}


def _counts(cfg: ModelConfig, ep: int) -> tuple[int, ...]:
    """(total, activated, resident, muon, adamw, expert muon, expert resident) parameters, the
    last five per rank at `ep`."""
    key = (repr(cfg), ep)
    if key not in _COUNTS:
        _COUNTS[key] = _count(cfg, ep)
    return _COUNTS[key]


def _count(cfg: ModelConfig, ep: int) -> tuple[int, ...]:
    total = activated = resident = muon = adamw = expert_muon = expert_local = 0
    frac = cfg.n_activated_experts / cfg.n_routed_experts
    for name, p in _parameters(cfg):
        n = p.numel()
        is_mtp = name.startswith("mtp.")
        is_expert = ".ffn.experts." in name
        if not is_mtp:
            total += n
            if not name.startswith("embed."):
                activated += n * frac if is_expert else n
        local = n // ep if is_expert else n
        resident += local
        if is_expert:
            expert_local += local
        if assign(name, p.shape)[0] == ADAMW:  # the optimizer's own grouping rules
            adamw += local
        elif is_expert:
            expert_muon += local
        else:
            muon += local
    return total, int(activated), resident, muon, adamw, expert_muon, expert_local


def _block_counts(cfg: ModelConfig, ep: int) -> tuple[int, int, int, int]:
    """(dense, routed-expert, largest block, largest block without its experts) parameters
    per rank at `ep` that stage 3 gathers per block
    (`optim.weight_sharding.sharded_block_params`)."""
    from optim.weight_sharding import sharded_block_params

    dense = experts = 0
    blocks: dict[str, int] = {}
    dense_blocks: dict[str, int] = {}
    for name, p in _parameters(cfg):
        parts = name.split(".")
        if parts[0] not in ("layers", "mtp") or not sharded_block_params(
                ".".join(parts[2:]), parts[0] == "mtp"):
            continue
        is_expert = ".ffn.experts." in name
        local = p.numel() // ep if is_expert else p.numel()
        experts += local if is_expert else 0
        dense += 0 if is_expert else local
        block = ".".join(parts[:2])
        blocks[block] = blocks.get(block, 0) + local
        dense_blocks[block] = dense_blocks.get(block, 0) + (0 if is_expert else local)
    return (dense, experts, max(blocks.values(), default=0),
            max(dense_blocks.values(), default=0))


def _parameters(cfg: ModelConfig) -> list:
    """(name, meta tensor) of the model's parameters, built once per config (sizing tables
    plan hundreds of layouts of the same model)."""
    key = repr(cfg)
    if key not in _PARAMETERS:
        _PARAMETERS[key] = list(build_meta(cfg).named_parameters())
    return _PARAMETERS[key]


def frozen_weight_bytes(cfg: ModelConfig, ep: int, dtype_bytes: int) -> tuple[int, float]:
    """(parameters, weight bytes) one rank holds of a frozen model: routed experts split over
    `ep`, the rest replicated; the fp32-by-design tensors (`model.weights._FP32_NAMES`) at 4."""
    from model.weights import _FP32_NAMES

    resident, nbytes = 0, 0.0
    for name, p in _parameters(cfg):
        local = p.numel() // ep if ".ffn.experts." in name else p.numel()
        resident += local
        nbytes += local * (4 if _FP32_NAMES.search(name) else dtype_bytes)
    return resident, nbytes


def _state_bytes(cfg: ModelConfig, dp: int, ep: int, zero_stage: int, bf16: bool):
    """Per-rank (weights, gradients, optimizer, gradients held in the optimizer step, block
    parameters stage 3 gathers: dense, experts) at `zero_stage` (module doc)."""
    _, _, resident, muon, adamw, expert_muon, expert_local = _counts(cfg, ep)
    w_bytes = 2 if bf16 else 4
    edp = dp // ep
    owned = (resident - expert_local) / dp + expert_local / edp
    master = 4 if bf16 else 0
    if zero_stage == 0:
        weights = resident * (w_bytes + master)
        grads = resident * (w_bytes + (4 if bf16 else 0))
        step_grads = grads
        optimizer = muon * 4 / dp + expert_muon * 4 / edp + adamw * 8
    block_dense = block_experts = 0
    if zero_stage == 3:
        block_dense, expert_blocks, largest, largest_dense = _block_counts(cfg, ep)
        if edp == 1:  # a local expert domain stays whole: only the dense part is gathered
            expert_blocks, largest = 0, largest_dense
        block_experts = expert_blocks
        replicated = resident - block_dense - block_experts
        gathered = (largest_dense * (1 - 1 / dp)                 # one block, less its owned
                    + (largest - largest_dense) * (1 - 1 / edp))  # share (counted just before)
        held = replicated + block_dense / dp + block_experts / edp + gathered
        weights = held * w_bytes + owned * master
        grads = ((replicated + largest) * w_bytes + owned * 4
                 + min(BUCKET, max(largest, replicated)) * 4)
        step_grads = owned * 4
        optimizer = muon * 4 / dp + expert_muon * 4 / edp + adamw * 8 / dp
    elif zero_stage in (1, 2):
        weights = resident * w_bytes + owned * master
        local = resident if zero_stage == 1 else 0      # stage 1's full fp32 accumulation
        grads = resident * w_bytes + (local + owned) * 4 + min(BUCKET, owned) * 4
        step_grads = owned * 4                          # the owners' reduced fp32 gradients
        optimizer = muon * 4 / dp + expert_muon * 4 / edp + adamw * 8 / dp
    return weights, grads, optimizer, step_grads, block_dense, block_experts


def make_plan(cfg: ModelConfig, world: int, ep: int, micro_batch: int, seq_len: int,
              global_batch: int, bf16: bool, checkpointing: str,
              frozen_models: list | tuple = (), links: Links = Links(),
              zero_stage: int = 0, cp: int = 1, csa_dense: bool = False) -> Plan:
    """`frozen_models`: (name, ModelConfig, dtype) per frozen model a stage holds besides the
    policy, dtype "bf16" | "fp32" (or a torch dtype); planned as weights only. `links`: the
    bandwidths of the communication estimate. `zero_stage`: 0 to 3 (`optim.zero`). `cp`:
    context parallelism (world = data-parallel x cp; parameters, gradients and optimizer state
    are shared over all `world` ranks as without it, activations are seq_len / cp tokens per
    row, plus the attention exchange of `train.plan_cp`). `csa_dense`: the dense-CSA phase."""
    from .plan_cp import cp_comm_term

    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}: choose 0, 1, 2 or 3")
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep_size={ep} must divide the world size {world}")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"parallel.ep_size={ep} must divide n_routed_experts="
                         f"{cfg.n_routed_experts}")
    if cp < 1 or world % cp:
        raise ValueError(f"parallel.cp_size={cp} must divide the world size {world}")
    dp = world  # the ranks sharing every parameter (data- and context-parallel alike)
    if global_batch % (micro_batch * (world // cp)):
        raise ValueError(f"batch.global_batch={global_batch} must be a multiple of "
                         f"data.micro_batch={micro_batch} x data-parallel size {world // cp}")
    total, activated, resident, muon, adamw, expert_muon, expert_local = _counts(cfg, ep)
    w_bytes = 2 if bf16 else 4
    weights, grads, optimizer, step_grads, block_dense, block_experts = _state_bytes(
        cfg, dp, ep, zero_stage, bf16)
    acts = activation_bytes(cfg, micro_batch, seq_len // cp, w_bytes, checkpointing, seq_len,
                            csa_dense)
    frozen = []
    for name, fcfg, dtype in frozen_models:
        if fcfg.n_routed_experts % ep:
            raise ValueError(f"frozen model {name}: parallel.ep_size={ep} must divide its "
                             f"n_routed_experts={fcfg.n_routed_experts}")
        frozen.append((name, *frozen_weight_bytes(fcfg, ep, _dtype_bytes(dtype, name))))
    accum = global_batch // (micro_batch * (world // cp))
    comm = comm_terms(cfg, dp, ep, resident - expert_local, expert_local, muon, expert_muon,
                      micro_batch * seq_len // cp * accum, w_bytes, w_bytes, checkpointing, links,
                      zero_stage, accum, block_dense, block_experts)
    if cp > 1:
        comm += (cp_comm_term(cfg, seq_len, cp, micro_batch * accum, w_bytes, checkpointing,
                              links),)
    return Plan(world, world // cp, ep, total, int(activated), resident, weights, grads,
                optimizer, acts,
                global_batch * seq_len, micro_batch, seq_len, accum,
                expert_local, dispatch_bytes_per_token(cfg, ep, w_bytes), tuple(frozen), comm,
                zero_stage, checkpointing, workspace_bytes(cfg, dp, ep, zero_stage, resident, bf16),
                step_grads, cp)


def _dtype_bytes(dtype, name: str) -> int:
    known = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
    key = str(dtype).removeprefix("torch.")
    if key not in known:
        raise ValueError(f"frozen model {name}: dtype {dtype!r}: choose bf16 or fp32")
    return known[key]


def dispatch_bytes_per_token(cfg: ModelConfig, ep: int, act_bytes: int = 2) -> float:
    """Bytes one token sends to other ranks per MoE layer in the forward (see module doc)."""
    k = cfg.n_activated_experts
    per_copy = cfg.dim * act_bytes + 4 + cfg.dim * act_bytes    # dispatch (x, weight) + combine
    return k * per_copy * (ep - 1) / ep


def ep_table(presets=("flash", "pro"), eps=(8, 16, 32, 64)) -> str:
    """Markdown sizing table (world = ep, so each expert lives on one rank; bf16 training):
    expert parameters and training state per rank (bf16 weight + fp32 master + bf16 and fp32
    gradients + fp32 Muon momentum = 16 bytes per parameter), all-to-all bytes per token per
    layer, and the whole plan's per-rank total at micro-batch 1 x 4096 tokens with block
    activation checkpointing."""
    from model.config import get_config

    rows = ["| preset | EP | experts / rank | expert params / rank | expert state / rank "
            "| all-to-all / token / layer (fwd) | plan total / rank |",
            "|---|---|---|---|---|---|---|"]
    for name in presets:
        cfg = get_config(name)
        for ep in eps:
            plan = make_plan(cfg, ep, ep, 1, 4096, ep, True, "block")
            rows.append(
                f"| {name} | {ep} | {cfg.n_routed_experts // ep} | "
                f"{plan.expert_params_per_rank / 1e9:.2f}B | "
                f"{plan.expert_params_per_rank * 16 / 2**30:.0f} GiB | "
                f"{plan.dispatch_bytes / 1024:.1f} KiB | {plan.total / 2**30:.0f} GiB |")
    return "\n".join(rows)


TOKENS_PER_STEP = 4 * 2 ** 20   # the sizing tables' batch: 1024 sequences of 4096


def best_layout(cfg: ModelConfig, world: int, zero_stage: int, checkpointing: str = "block",
                seq_len: int = 4096, micro_batch: int = 1) -> Plan | None:
    """The smallest-memory plan at `world` ranks, bf16, `TOKENS_PER_STEP` per step: the largest
    valid `ep_size` (dividing the world and the expert count; a larger EP only moves expert
    weights off the rank, while the fp32 expert state per rank, E / (ep x dp / ep), stays the
    same). None if no EP > 0 is valid."""
    global_batch = max(TOKENS_PER_STEP // seq_len, world * micro_batch)
    global_batch -= global_batch % (world * micro_batch)
    eps = [ep for ep in range(1, world + 1) if world % ep == 0 and cfg.n_routed_experts % ep == 0]
    return make_plan(cfg, world, max(eps), micro_batch, seq_len, global_batch, True,
                     checkpointing, zero_stage=zero_stage) if eps else None


def smallest_world(cfg: ModelConfig, budget_bytes: float, zero_stage: int,
                   checkpointing: str = "block", gpus_per_node: int = 8,
                   max_world: int = 4096) -> Plan | None:
    """The first world size (whole nodes) whose best layout fits `budget_bytes` per rank."""
    for world in range(gpus_per_node, max_world + 1, gpus_per_node):
        plan = best_layout(cfg, world, zero_stage, checkpointing)
        if plan is not None and plan.total <= budget_bytes:
            return plan
    return None


def fit_table(presets=(("flash", 64, 64), ("pro", 256, 128)), budget_gib: float = 120) -> str:
    """Markdown: per-rank memory of each preset at its target layout for every zero_stage
    (bf16, micro-batch 1 x 4096, block checkpointing, 4M tokens per step), the dominant
    communication term, and the smallest world size that fits `budget_gib` per rank."""
    from model.config import get_config

    gib = 2 ** 30
    rows = [f"| preset | world | EP | zero_stage | weights | gradients | optimizer | activations "
            f"| total / rank | fits {budget_gib:.0f} GiB | dominant traffic / step "
            f"| smallest world that fits |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, world, ep in presets:
        cfg = get_config(name)
        for stage in (0, 1, 2, 3):
            p = make_plan(cfg, world, ep, 1, 4096, TOKENS_PER_STEP // 4096, True, "block",
                          zero_stage=stage)
            top = max(p.comm, key=lambda c: c.seconds)
            small = smallest_world(cfg, budget_gib * gib, stage)
            where = (f"{small.world} (EP {small.ep}, {small.total / gib:.0f} GiB)" if small
                     else "none up to 4096")
            rows.append(f"| {name} | {world} | {ep} | {stage} | {p.weights / gib:.1f} | "
                        f"{p.grads / gib:.1f} | {p.optimizer / gib:.1f} | "
                        f"{p.activations / gib:.1f} | **{p.total / gib:.1f} GiB** | "
                        f"{'yes' if p.total <= budget_gib * gib else 'no'} | {top.name} "
                        f"{top.bytes / gib:.0f} GiB, {top.seconds:.1f} s | {where} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m train.plan: the sizing tables of train/README.md
    print(ep_table())
    print()
    print(fit_table())


def check_fit(cfg, model_cfg: ModelConfig, info, bf16: bool, frozen_models=()) -> None:
    """Stops a training run before it allocates when its plan cannot fit this machine's
    devices (90 % of `available_memory`), printing the plan and what to change."""
    from .config import sequences_at

    plan = make_plan(model_cfg, info.world, cfg.parallel.ep_size, cfg.data.micro_batch,
                     cfg.data.seq_len, sequences_at(cfg, cfg.batch.global_batch,
                                                    cfg.data.seq_len) or cfg.batch.global_batch,
                     bf16, cfg.activation_checkpointing, frozen_models=frozen_models,
                     zero_stage=cfg.parallel.zero_stage, cp=cfg.parallel.cp_size)
    limit = available_memory(info.device)
    if plan.total > 0.9 * limit:
        raise SystemExit(
            f"{plan.format()}\n\nconf={cfg.run_name} needs ~{plan.total / 2**30:.1f} GiB per "
            f"rank but this {info.device.type} rank has {limit / 2**30:.1f} GiB. Use more ranks "
            f"or expert parallelism (parallel.ep_size), parallel.zero_stage=2, "
            f"activation_checkpointing, a smaller data.micro_batch, or a smaller preset. "
            f"`dry_run=true` prints this plan.")


def available_memory(device) -> float:
    """Bytes a rank may use: the GPU's total memory, or this machine's RAM shared by the local
    ranks on CPU."""
    import os

    import torch

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return psutil.virtual_memory().total / max(local, 1)
