"""`ModelConfig`: every shape and numeric switch of a DeepSeek-V4 model, with presets and
import/export of the released `config.json` files.

Layer kinds come from `compress_ratios` (one entry per layer, then one per MTP block):
0 is sliding-window attention only (SWA); 4 is CSA (overlapped compressor plus lightning indexer,
as in the reference code, where `overlap = ratio == 4`); any other ratio is HCA (non-overlapped
compressor, dense over the compressed entries).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import config_import

CSA_RATIO = 4
SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
CSA_MODES = ("dense", "sparse")


@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    norm_eps: float = 1e-6
    max_seq_len: int = 1048576  # HF max_position_embeddings
    bos_token_id: int = 0
    eos_token_id: int = 1
    # attention (shared-KV MQA, low-rank queries, grouped output)
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    # lightning indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    csa_mode: str = "sparse"  # "dense": all visible compressed entries; "sparse": indexer top-k
    # RoPE: theta for SWA layers, compress_rope_theta + YaRN for compressed layers
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # MTP
    n_mtp_layers: int = 1
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # init and released quantisation metadata (kept so export round-trips)
    init_std: float = 0.02
    seed: int = 0
    tie_word_embeddings: bool = False
    quantization: dict[str, Any] = field(default_factory=dict)
    expert_dtype: str | None = None

    def __post_init__(self) -> None:
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank",
                     "o_groups", "o_lora_rank", "window_size", "n_routed_experts",
                     "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters",
                     "index_n_heads", "index_head_dim", "index_topk", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                fail(name, "must be a positive integer")
        for name in ("n_hash_layers", "n_mtp_layers", "n_shared_experts"):
            if int(getattr(self, name)) < 0:
                fail(name, "must be >= 0")
        if len(self.compress_ratios) != self.n_layers + self.n_mtp_layers:
            fail("compress_ratios", f"needs n_layers + n_mtp_layers = "
                 f"{self.n_layers + self.n_mtp_layers} entries, got {len(self.compress_ratios)}")
        for i, r in enumerate(self.compress_ratios):
            if r < 0 or 0 < r < CSA_RATIO:
                fail("compress_ratios", f"entry {i} is {r}; use 0 (SWA), {CSA_RATIO} (CSA) or a "
                     f"larger ratio (HCA)")
        if self.n_heads % self.o_groups:
            fail("n_heads", f"must be divisible by o_groups={self.o_groups}")
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= self.head_dim:
            fail("rope_head_dim", f"must be even and in (0, head_dim={self.head_dim}]")
        if self.rope_head_dim > self.index_head_dim:
            fail("rope_head_dim", f"must not exceed index_head_dim={self.index_head_dim}")
        if self.n_activated_experts > self.n_routed_experts:
            fail("n_activated_experts", f"exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_hash_layers > self.n_layers:
            fail("n_hash_layers", f"exceeds n_layers={self.n_layers}")
        if self.score_func not in SCORE_FUNCS:
            fail("score_func", f"unknown score function; choose one of {SCORE_FUNCS}")
        if self.csa_mode not in CSA_MODES:
            fail("csa_mode", f"choose one of {CSA_MODES}")
        if self.rope_factor < 1:
            fail("rope_factor", "must be >= 1 (1 disables YaRN)")
        if self.original_seq_len < 0:
            fail("original_seq_len", "must be >= 0 (0 disables YaRN, as in the reference code)")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "DeepSeek-V4 keeps a separate output head")

    # ------------------------------------------------------------------ derived
    def layer_kind(self, layer_id: int) -> str:
        """'swa', 'csa' or 'hca' for block `layer_id` (MTP blocks follow the main layers)."""
        r = self.compress_ratios[layer_id]
        return "swa" if r == 0 else "csa" if r == CSA_RATIO else "hca"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    # ------------------------------------------------------------------ released config.json
    @classmethod
    def from_released(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a `config.json` dict: our "v4lab" block if present, else Hugging
        Face naming (also transformers' own spelling) or reference-inference naming, detected
        by key. Strict about missing and unused keys; config_import.py says which keys are
        required, which optional (and their defaults), which ignored."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        if "v4lab" in raw:
            kw = config_import.from_own(raw["v4lab"], fields, source)
        elif "hidden_size" in raw:
            kw = config_import.from_hf(config_import.rewrite_transformers_keys(raw, source),
                                       source)
        elif "dim" in raw:
            kw = config_import.from_inference(raw, fields, source)
        else:
            raise ValueError(f"{source}: neither Hugging Face ('hidden_size') nor "
                             f"reference-inference ('dim') naming; cannot read it as a "
                             f"DeepSeek-V4 config")
        assert set(kw) == set(fields), sorted(set(fields) ^ set(kw))  # no dataclass default
        cfg = _build(cls, kw, source)
        if "v4lab" in raw:  # the Hugging Face keys beside it must say the same (hand edits)
            _check_hf_agrees(cfg, raw, source)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model config not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_released(raw, path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` content (`DeepseekV4ForCausalLM`)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"],
                               "model_type": "deepseek_v4"}
        for ours, theirs in config_import.HF_NAMES.items():
            out[theirs] = getattr(self, ours)
        out["compress_ratios"] = list(self.compress_ratios)
        out.update(num_key_value_heads=1, hidden_act="silu", attention_bias=False,
                   attention_dropout=0.0, norm_topk_prob=True, topk_method="noaux_tc",
                   initializer_range=self.init_std, tie_word_embeddings=False, use_cache=True,
                   torch_dtype="bfloat16")
        if self.rope_factor > 1 and self.original_seq_len > 0:  # else no YaRN (rope.py)
            out["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                   "original_max_position_embeddings": self.original_seq_len,
                                   "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        if self.quantization:
            out["quantization_config"] = dict(self.quantization)
        if self.expert_dtype:
            out["expert_dtype"] = self.expert_dtype
        return out




def _check_hf_agrees(cfg: ModelConfig, raw: dict[str, Any], source: str) -> None:
    """The "v4lab" block wins over the Hugging Face keys written beside it; a disagreement
    (someone edited one of them) is an error rather than a silently ignored edit."""
    expected = cfg.to_hf_dict()
    differ = [f"{key}={raw[key]!r} (v4lab: {expected[key]!r})"
              for key in config_import.HF_NAMES.values()
              if key in raw and key in expected
              and (list(raw[key]) if isinstance(raw[key], (list, tuple)) else raw[key])
              != (list(expected[key]) if isinstance(expected[key], (list, tuple))
                  else expected[key])]
    if differ:
        raise ValueError(f"{source}: the Hugging Face keys disagree with the 'v4lab' block: "
                         f"{', '.join(differ)}; edit both or remove one")


def _build(cls, kw: dict[str, Any], source: str) -> ModelConfig:
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:  # TypeError: e.g. null where a number belongs
        raise ValueError(f"{source}: {e}") from None


# ---------------------------------------------------------------------- presets
def _tiny() -> ModelConfig:
    """A few million parameters: trains on a laptop CPU. Layers: SWA, CSA, HCA, CSA; MTP is SWA.
    Layer 0 is hash-routed."""
    return ModelConfig(
        vocab_size=8192, dim=256, n_layers=4, max_seq_len=4096,
        n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=128,
        window_size=16, compress_ratios=(0, 4, 16, 4, 0),
        index_n_heads=4, index_head_dim=32, index_topk=16,
        rope_factor=4.0, original_seq_len=1024,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=256,
        n_hash_layers=1, route_scale=1.0,
    )


def _small() -> ModelConfig:
    """About 1B total / 0.2B activated parameters: one GPU. The released vocabulary and layer
    pattern (SWA, SWA, then alternating CSA/HCA), at a smaller width."""
    return ModelConfig(
        vocab_size=129280, dim=1024, n_layers=12, max_seq_len=65536,
        n_heads=16, head_dim=128, rope_head_dim=64, q_lora_rank=384, o_groups=4, o_lora_rank=256,
        window_size=128, compress_ratios=(0, 0) + (4, 128) * 5 + (0,),
        index_n_heads=16, index_head_dim=64, index_topk=256,
        n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, moe_inter_dim=512,
        n_hash_layers=1, route_scale=1.5,
    )


def _flash() -> ModelConfig:
    return ModelConfig(quantization=dict(_RELEASED_QUANT), expert_dtype="fp4")


def _pro() -> ModelConfig:
    return ModelConfig(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), n_routed_experts=384,
        moe_inter_dim=3072, route_scale=2.5, quantization=dict(_RELEASED_QUANT),
        expert_dtype="fp4",
    )


_RELEASED_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                   "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}

PRESETS = {"tiny": _tiny, "small": _small, "flash": _flash, "pro": _pro}


def get_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """A preset by name (`tiny`, `small`, `flash`, `pro`) or a released `config.json` path."""
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    elif name_or_path.endswith(".json") or os.path.exists(name_or_path):
        cfg = ModelConfig.from_json(name_or_path)
    else:
        raise ValueError(f"unknown model preset {name_or_path!r}: choose one of "
                         f"{sorted(PRESETS)} or give the path to a config.json")
    return cfg.replace(**overrides) if overrides else cfg
