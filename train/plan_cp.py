"""Context parallelism in the planner: what the attention exchange moves, what ring attention
would move instead, and the smallest `cp_size` that fits each sequence-length stage.

Bytes one rank sends per micro-batch row and attention layer in the forward
(`model/context_parallel.py`), c = head_dim, two chunks per rank:
- window halo: 2·(window − 1) rotated K=V vectors, activation dtype;
- compressor halos: 2·lead projected tokens, kv and gate, fp32, coff·c wide (lead = 2m
  overlapped CSA, m HCA); the CSA indexer's compressor the same at its own width;
- the entries' all-gather: this rank's 2·(chunk/m + 1) pooled entries (padded) to each of the
  other cp − 1 ranks (a ring moves (cp − 1)/cp of the gathered table), activation dtype.
The backward returns the same halos and all-reduces the gathered table's gradient (gloo has no
reduce-scatter: 2·(cp − 1)/cp of the table). Ring attention over raw K=V would instead pass every
rank's chunk tokens around the ring: (cp − 1)/cp · seq · c per layer; compression makes the
gathered stream seq/m entries, which is the ratio the table shows.
"""

from __future__ import annotations

from model.config import CSA_RATIO, ModelConfig

from .context_parallel import min_chunk


def exchange_bytes(cfg: ModelConfig, seq_len: int, cp: int, act_bytes: int = 2
                   ) -> tuple[float, float]:
    """(halo bytes, all-gather bytes) one rank sends per row in one forward over every
    attention layer (main and MTP)."""
    if cp <= 1:
        return 0.0, 0.0
    chunk = seq_len // (2 * cp)
    c, w = cfg.head_dim, cfg.window_size
    halo = gather = 0.0
    for ratio in cfg.compress_ratios[:cfg.n_layers + cfg.n_mtp_layers]:
        halo += 2 * (w - 1) * c * act_bytes
        if not ratio:
            continue
        widths = [(c, ratio == CSA_RATIO)]
        if ratio == CSA_RATIO:
            widths.append((cfg.index_head_dim, True))
        for width, overlap in widths:
            lead = 2 * ratio if overlap else ratio
            halo += 2 * lead * 2 * (2 if overlap else 1) * width * 4
            gather += (cp - 1) * 2 * (chunk // ratio + 1) * width * act_bytes
    return halo, gather


def ring_attention_bytes(cfg: ModelConfig, seq_len: int, cp: int, act_bytes: int = 2) -> float:
    """What ring attention over uncompressed K=V would send per row in one forward, every
    attention layer: each rank's tokens visit the other cp − 1 ranks."""
    layers = len(cfg.compress_ratios[:cfg.n_layers + cfg.n_mtp_layers])
    return layers * (cp - 1) / cp * seq_len * cfg.head_dim * act_bytes if cp > 1 else 0.0


def cp_comm_term(cfg: ModelConfig, seq_len: int, cp: int, rows: int, act_bytes: int,
                 checkpointing: str, links):
    """The plan's communication line for one optimizer step (`rows` = micro-batch x
    accumulation): forward, the checkpointed forward's recompute, and backward (halos again,
    the gathered gradient's all-reduce twice the gather)."""
    from .plan import CommTerm, _ring_seconds

    halo, gather = exchange_bytes(cfg, seq_len, cp, act_bytes)
    forwards = 2 if checkpointing in ("block", "selective") else 1
    sent = rows * (forwards * (halo + gather) + halo + 2 * gather)
    seconds, link = _ring_seconds(sent, cp, 1, links)
    return CommTerm("cp attention exchange", sent, seconds, link)


def cp_choices(cfg: ModelConfig, world: int, seq_len: int) -> list[int]:
    """The cp sizes that divide the world and leave every chunk long enough for its halos."""
    return [c for c in range(1, world + 1) if world % c == 0 and seq_len % (2 * c) == 0
            and (c == 1 or seq_len // (2 * c) >= min_chunk(cfg))]


def smallest_fitting_cp(cfg: ModelConfig, world: int, ep: int, seq_len: int, tokens: int,
                        budget_bytes: float, zero_stage: int = 2, checkpointing: str = "block",
                        micro_batch: int = 1):
    """The smallest cp (and its plan) at which one rank's plan fits `budget_bytes`, for a step of
    `tokens` tokens in rows of `seq_len`; (None, plan at the largest cp) if none does."""
    from .plan import make_plan

    plan = None
    for cp in cp_choices(cfg, world, seq_len):
        dp = world // cp
        seqs = max(tokens // seq_len // (dp * micro_batch), 1) * dp * micro_batch
        plan = make_plan(cfg, world, ep, micro_batch, seq_len, seqs, True, checkpointing,
                         zero_stage=zero_stage, cp=cp)
        if plan.total <= budget_bytes:
            return cp, plan
    return None, plan


def stage_lines(cfg: ModelConfig, world: int, ep: int, stages: list[tuple[int, int]],
                budget_gib: float, zero_stage: int, checkpointing: str,
                micro_batch: int = 1) -> list[str]:
    """Dry-run lines: per (seq_len, sequences per step) stage, the smallest cp that fits the
    budget, its total, and the exchange against ring attention."""
    gib = 2 ** 30
    lines = [f"sequence-length stages at world {world}, EP {ep} (smallest parallel.cp_size whose "
             f"plan fits {budget_gib:.0f} GiB per rank):"]
    for seq_len, seqs in stages:
        cp, plan = smallest_fitting_cp(cfg, world, ep, seq_len, seq_len * seqs, budget_gib * gib,
                                       zero_stage, checkpointing, micro_batch)
        if plan is None:
            lines.append(f"  seq {seq_len:>8,}: no cp_size divides world {world} with chunks "
                         f">= {min_chunk(cfg)} tokens")
            continue
        halo, gather = exchange_bytes(cfg, seq_len, plan.cp)
        ring = ring_attention_bytes(cfg, seq_len, plan.cp)
        ratio = f", exchange {(halo + gather) / ring:.3f} of ring attention's" if ring else ""
        verdict = f"cp_size={cp}" if cp else f"none up to cp_size={plan.cp}"
        lines.append(f"  seq {seq_len:>8,} x {seqs:>6,} sequences: {verdict}: "
                     f"{plan.total / gib:.1f} GiB per rank (activations "
                     f"{plan.activations / gib:.1f}){ratio}")
    return lines


WORLDS = (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def smallest_layout(cfg: ModelConfig, seq_len: int, tokens: int, budget_bytes: float,
                    max_world: int, checkpointing: str = "block"):
    """The smallest world (of `WORLDS`; EP as large as the experts allow; ZeRO-2, else ZeRO-3)
    with a cp that fits `budget_bytes` per rank: (world, cp, zero_stage, plan), or Nones."""
    for world in (w for w in WORLDS if w <= max_world):
        ep = max(e for e in range(1, world + 1) if world % e == 0 and cfg.n_routed_experts % e == 0)
        for stage in (2, 3):
            cp, plan = smallest_fitting_cp(cfg, world, ep, seq_len, tokens, budget_bytes, stage,
                                           checkpointing)
            if cp is not None:
                return world, cp, stage, plan
    return None, None, None, None


def long_context_table(budget_gib: float = 120, rows=(("flash", 16384, 256), ("flash", 65536, 256),
                                                      ("flash", 1 << 20, 4096),
                                                      ("pro", 65536, 4096),
                                                      ("pro", 1 << 20, 8192))) -> str:
    """Markdown for the README: per preset and stage, the smallest layout within `budget_gib`
    per rank (bf16, block checkpointing, the report's tokens per step), and the CP exchange
    against ring attention over raw K=V."""
    from model.config import get_config

    tokens = {"flash": 75_497_472, "pro": 94_371_840}  # the report's 75.5M / 94.4M per step
    gib = 2 ** 30
    out = [f"| preset | seq_len | smallest layout within {budget_gib:.0f} GiB / rank | total / rank "
           f"| activations | CP exchange / step / rank | vs ring attention |",
           "|---|---|---|---|---|---|---|"]
    for name, seq_len, max_world in rows:
        cfg = get_config(name).replace(max_seq_len=max(seq_len, get_config(name).max_seq_len))
        world, cp, stage, plan = smallest_layout(cfg, seq_len, tokens[name], budget_gib * gib,
                                                 max_world)
        if plan is None:
            out.append(f"| {name} | {seq_len:,} | none up to {max_world} ranks | | | | |")
            continue
        halo, gather = exchange_bytes(cfg, seq_len, cp)
        ring = ring_attention_bytes(cfg, seq_len, cp)
        term = next((t for t in plan.comm if t.name == "cp attention exchange"), None)
        out.append(f"| {name} | {seq_len:,} | world {world} = dp {plan.dp} x cp {cp} (EP "
                   f"{plan.ep}, zero_stage {stage}) | {plan.total / gib:.1f} GiB | "
                   f"{plan.activations / gib:.1f} GiB | "
                   f"{f'{term.bytes / gib:.1f} GiB' if term else '-'} | "
                   f"{f'{(halo + gather) / ring:.3f}' if ring else '-'} |")
    return "\n".join(out)


if __name__ == "__main__":  # python -m train.plan_cp: the long-context table of the README
    print(long_context_table())
