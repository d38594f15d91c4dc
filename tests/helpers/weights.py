"""Reading a checkpoint's `model/` directory whole, whatever its files (one `model.safetensors`
from one process, or each rank's `model-rank*` files and the index from several)."""

from __future__ import annotations

from pathlib import Path

import torch


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from model.weights import read_tensors, tensor_files

    files, layout = tensor_files(Path(model_dir))
    return read_tensors(files, layout)[0]
