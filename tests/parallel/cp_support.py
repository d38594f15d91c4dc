"""Shared pieces of the context-parallel tests: a model whose window and compression ratio do not
divide the sequence or the chunks, packed rows with document boundaries inside chunks (and a
document shorter than a chunk), and one rank's loss and gradients through the CP forward."""

from __future__ import annotations

import dataclasses

import torch

SEQ = 136  # 2·cp·chunk for cp 1, 2, 4 (chunk 68, 34, 17); not a multiple of 12 or 16
DOC_LENGTHS = (37, 5, 50, 29, 80)


def cp_config(**kw):
    from model.config import get_config

    base = dict(window_size=12, compress_ratios=(0, 4, 12, 4, 0), index_topk=3, vocab_size=512)
    base.update(kw)
    return dataclasses.replace(get_config("tiny"), **base)


def packed_rows(batch: int = 2, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids, document ids (contiguous runs, every row shifted differently) and positions."""
    from model.loss import next_token_labels
    from model.packing import positions_from_doc_ids

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 512, (batch, seq), generator=g)
    docs = []
    for b in range(batch):
        row, d = [], 0
        while len(row) < seq + 13 * b:
            row += [d] * DOC_LENGTHS[d % len(DOC_LENGTHS)]
            d += 1
        docs.append(row[13 * b: 13 * b + seq])
    doc = torch.tensor(docs)
    doc = torch.cat((torch.zeros(batch, 1, dtype=torch.long),
                     (doc[:, 1:] != doc[:, :-1]).long().cumsum(1)), dim=1)
    return dict(input_ids=ids, doc_ids=doc, positions=positions_from_doc_ids(doc),
                labels=next_token_labels(ids, doc))


def build_model(cfg, mode: str):
    from model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg).float()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the init's exact zeros (sink, ape), as after training
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.set_csa_mode(mode, indexer_loss=True)
    return model


def loss_and_grads(rank: int, world: int, mode: str, cfg_kw: dict | None = None,
                   batch_seed: int = 0) -> dict:
    """One rank of a CP group of `world` (1: the plain forward, no CP): the loss share and every
    parameter's gradient of it, as numpy."""
    from model.context_parallel import ContextParallel
    from model.loss import LossWeights, token_sums

    model = build_model(cp_config(**(cfg_kw or {})), mode)
    cp = ContextParallel(world, rank) if world > 1 else None
    model.context_parallel = cp
    b = packed_rows(seed=batch_seed)
    out = model(b["input_ids"], doc_ids=b["doc_ids"], positions=b["positions"])
    terms = token_sums(out, b["labels"], b["doc_ids"], LossWeights(mtp=0.3, balance=0.1,
                                                                   indexer=1.0), cp)
    terms.total.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
             if p.grad is not None}
    return dict(loss=terms.total.item(), lm=terms.lm.item(), mtp=terms.mtp.item(),
                balance=terms.balance.item(), indexer=terms.indexer.item(), grads=grads)
