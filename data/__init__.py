"""Data for v4lab: corpora -> tokenised, memory-mapped shards -> packed, resumable batches,
plus SFT conversations through `encoding/`. See data/README.md for the design.

Batches are dicts of int64 tensors, each [micro_batch, seq_len]: input_ids, labels, doc_ids,
positions (see `data.packing.to_batch`).
"""

from data.config import DataConfig, DataError, SFTConfig, SourceConfig
from data.packing import Window, to_batch
from data.prepare import ensure_default_assets
from data.pretrain import (PretrainData, build_pretrain_data, build_pretrain_loader,
                           build_val_loader)
from data.sft import SFTData, SFTStats, build_sft_data
from data.tokenizer_train import check_model_compat, train_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "PretrainData",
    "SFTConfig",
    "SFTData",
    "SFTStats",
    "SourceConfig",
    "Window",
    "build_pretrain_data",
    "build_pretrain_loader",
    "build_sft_data",
    "build_val_loader",
    "check_model_compat",
    "ensure_default_assets",
    "to_batch",
    "train_tokenizer",
]
