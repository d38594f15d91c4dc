"""Triton kernels for the V4 hot paths, each beside its plain-PyTorch reference (`<op>_ref`).

Model and optimizer call only the dispatchers exported here; each picks the Triton kernel for
CUDA tensors (Triton importable, `V4_KERNELS` != "ref") and the reference otherwise, so training
and inference share the same kernels. See v4kernels/README.md for the list, dispatch rule and test
tolerances. This package is a leaf: it never imports `model` or `optim`.

Note: `v4kernels.rms_norm`, `v4kernels.swiglu`, `v4kernels.sparse_attention` and `v4kernels.moe_permute`
are the dispatcher *functions*, which shadow their submodules as package attributes; reach module
internals with `from v4kernels.<module> import <name>`.
"""

from .dispatch import HAS_TRITON, interpreting, kernel_mode, use_triton
from .fp8_quant import fp8_block_dequant, fp8_block_quant, fp8_block_quant_ref
from .grouped_gemm import (grouped_mm, grouped_mm_ref, grouped_swiglu_experts,
                           grouped_swiglu_experts_ref)
from .mhc import hc_split_sinkhorn, hc_split_sinkhorn_ref, sinkhorn_gemm, sinkhorn_ref
from .moe_permute import moe_permute, moe_permute_ref, moe_unpermute, moe_unpermute_ref
from .newton_schulz import gram, gram_ref
from .rms_norm import rms_norm, rms_norm_ref
from .sparse_attention import (hybrid_indices, sparse_attention, sparse_attention_ref,
                               window_indices)
from .swiglu import swiglu, swiglu_ref

mhc_coefficients = hc_split_sinkhorn  # the name for the same entry point

__all__ = [
    "HAS_TRITON", "interpreting", "kernel_mode", "use_triton",
    "rms_norm", "rms_norm_ref",
    "swiglu", "swiglu_ref",
    "hc_split_sinkhorn", "hc_split_sinkhorn_ref", "sinkhorn_gemm", "sinkhorn_ref",
    "mhc_coefficients",
    "sparse_attention", "sparse_attention_ref", "window_indices", "hybrid_indices",
    "grouped_mm", "grouped_mm_ref", "grouped_swiglu_experts", "grouped_swiglu_experts_ref",
    "moe_permute", "moe_permute_ref", "moe_unpermute", "moe_unpermute_ref",
    "gram", "gram_ref",
    "fp8_block_quant", "fp8_block_quant_ref", "fp8_block_dequant",
]
