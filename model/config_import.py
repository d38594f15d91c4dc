"""Reading a `config.json` into `ModelConfig` keyword arguments, strictly.

Why strict: the dataclass defaults of `ModelConfig` are the Flash release, so a key missing from
a config.json would otherwise silently become Flash's value: a different model that still
builds, trains and exits 0. Every key of an imported file is therefore one of:

- required: all absent ones are reported together, in one error naming the file;
- optional: absent means the default below, and the defaults taken are logged (one warning on
  the `v4lab.model` logger naming each key and value);
- fixed: an architecture choice this implementation hard-wires (`hidden_act`, ...); absent is
  fine, any value but the implemented one is an error (the model would not be the file's);
- ignored (`IGNORED`): metadata known not to affect the model (`architectures`,
  `torch_dtype`, `transformers_version`, transformers' runtime flags, and transformers'
  re-spellings `layer_types` / `mlp_layer_types` / `compress_rates` / `rope_parameters`, which
  are read only when the released key they re-spell is absent, see `rewrite_transformers_keys`);
- anything else is unused and reported with `warnings.warn` naming it, because if it matters the
  model built is not the one the file describes (e.g. `n_routed_experts_score`, an expert-pruning
  field of a forked reference code).

Namings (detected by key: `hidden_size` or `dim`):

Hugging Face (the release's config.json; also our exports). Required: every key of `HF_NAMES`
except the optional ones. Optional, with defaults:
    rms_norm_eps 1e-6, hc_eps 1e-6, num_nextn_predict_layers 1 (the reference code's defaults),
    max_position_embeddings 1048576 (the release's context), bos_token_id 0, eos_token_id 1
    (the release's tokenizer), expert_dtype None (experts stored like the other weights; Flash's
    config.json has none), quantization_config none (unquantised weights), rope_scaling none
    (no YaRN: rope_factor 1, original_seq_len 0); inside rope_scaling `factor` and
    `original_max_position_embeddings` are required and beta_fast 32, beta_slow 1 (YaRN's
    published values) optional. `initializer_range` is init_std (0.02 when absent, no log: it
    only matters for a fresh initialisation).

Reference inference (the release's inference/config.json; our `to_dict()`): keys are our field
names. Optional, with defaults: norm_eps 1e-6, hc_eps 1e-6, n_mtp_layers 1, max_seq_len 1048576,
bos_token_id 0, eos_token_id 1, expert_dtype None, beta_fast 32, beta_slow 1, quantization none
(or `dtype` + `scale_fmt` as in the release). Our own settings, which no released file carries,
default without a log: csa_mode "sparse" (the release's attention), init_std 0.02, seed 0.

A config.json with a "v4lab" block (what `save_pretrained` and export write) is read from that
block alone: it is our full config, and must name every `ModelConfig` field.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

log = logging.getLogger("v4lab.model")

# our field -> Hugging Face key
HF_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "head_dim": "head_dim", "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
    "window_size": "sliding_window", "compress_ratios": "compress_ratios",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim",
    "index_topk": "index_topk", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size", "n_hash_layers": "num_hash_layers",
    "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit", "n_mtp_layers": "num_nextn_predict_layers",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta", "max_seq_len": "max_position_embeddings",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "expert_dtype": "expert_dtype",
}
_COMMON_OPTIONAL = {"hc_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": None}
HF_OPTIONAL = {**_COMMON_OPTIONAL, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
               "max_position_embeddings": 1048576}
INFERENCE_OPTIONAL = {**_COMMON_OPTIONAL, "norm_eps": 1e-6, "n_mtp_layers": 1,
                      "max_seq_len": 1048576, "beta_fast": 32.0, "beta_slow": 1.0}
YARN_OPTIONAL = {"beta_fast": 32.0, "beta_slow": 1.0}
OWN_DEFAULTS = {"csa_mode": "sparse", "init_std": 0.02, "seed": 0}
# architecture choices this implementation hard-wires: key -> the only value it implements
FIXED = {"num_key_value_heads": 1, "attention_bias": False, "mlp_bias": False,
         "hidden_act": "silu", "norm_topk_prob": True, "topk_method": "noaux_tc",
         "attention_dropout": 0.0, "tie_word_embeddings": False}
IGNORED = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "pad_token_id", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "partial_rotary_factor",  # transformers derives it from qk_rope_head_dim / head_dim
    "layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
    "max_batch_size",  # reference inference: KV-cache allocation at run time
})


class _Reader:
    """Takes keys out of one config dict, remembering what was missing, defaulted and used."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.defaults: list[str] = []

    def required(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.raw:
            self.missing.append(self.prefix + key)
            return None
        return self.raw[key]

    def optional(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key in self.raw:
            return self.raw[key]
        self.defaults.append(f"{self.prefix}{key}={default!r}")
        return default

    def silent(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.raw.get(key, default)

    def fixed(self) -> None:
        for key, value in FIXED.items():
            self.used.add(key)
            if key in self.raw and self.raw[key] != value:
                raise ValueError(f"{self.source}: {key}={self.raw[key]!r}: DeepSeek-V4 (and this "
                                 f"implementation) uses {value!r}")

    def unused(self, ignored: frozenset[str] = frozenset()) -> list[str]:
        return [self.prefix + k for k in self.raw if k not in self.used and k not in ignored]


def _finish(readers: list[_Reader], source: str, naming: str) -> None:
    """One error for every missing key; one log line for the defaults; one warning for the
    unused keys."""
    missing = [k for r in readers for k in r.missing]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {', '.join(missing)} ({naming} "
                         f"naming; model/config_import.py lists the required and optional keys)")
    defaults = [k for r in readers for k in r.defaults]
    if defaults:
        log.warning("%s: optional key(s) absent, defaults taken: %s", source, ", ".join(defaults))
    unused = [k for r in readers for k in r.unused(IGNORED if r.prefix == "" else frozenset())]
    if unused:
        warnings.warn(f"{source}: key(s) not used by this implementation: {', '.join(unused)} "
                      f"(the model built ignores them)", UserWarning, stacklevel=4)


def from_hf(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig keywords from Hugging Face naming (module docstring)."""
    r = _Reader(raw, source)
    kw = {ours: (r.optional(theirs, HF_OPTIONAL[theirs]) if theirs in HF_OPTIONAL
                 else r.required(theirs)) for ours, theirs in HF_NAMES.items()}
    r.fixed()
    kw["tie_word_embeddings"] = False  # FIXED: any other value was refused
    kw["init_std"] = r.silent("initializer_range", OWN_DEFAULTS["init_std"])
    kw.update(csa_mode=OWN_DEFAULTS["csa_mode"], seed=OWN_DEFAULTS["seed"])
    readers = [r]
    rope = r.optional("rope_scaling", None)
    if rope is None:  # no YaRN, as the reference code does for original_seq_len 0
        kw.update(rope_factor=1.0, original_seq_len=0, **YARN_OPTIONAL)
    else:
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_scaling={rope!r}: expected an object")
        y = _Reader(rope, source, prefix="rope_scaling.")
        kind = y.silent("type", y.silent("rope_type", "yarn"))
        if kind != "yarn":
            raise ValueError(f"{source}: rope_scaling type {kind!r}: only 'yarn' is implemented")
        kw.update(rope_factor=y.required("factor"),
                  original_seq_len=y.required("original_max_position_embeddings"),
                  beta_fast=y.optional("beta_fast", YARN_OPTIONAL["beta_fast"]),
                  beta_slow=y.optional("beta_slow", YARN_OPTIONAL["beta_slow"]))
        readers.append(y)
    quant = r.optional("quantization_config", None)
    kw["quantization"] = dict(quant) if quant else {}
    _finish(readers, source, "Hugging Face")
    return kw


def from_inference(raw: dict[str, Any], fields: list[str], source: str) -> dict[str, Any]:
    """ModelConfig keywords from reference-inference naming (our field names)."""
    r = _Reader(raw, source)
    kw: dict[str, Any] = {}
    for name in fields:
        if name in INFERENCE_OPTIONAL:
            kw[name] = r.optional(name, INFERENCE_OPTIONAL[name])
        elif name in OWN_DEFAULTS:
            kw[name] = r.silent(name, OWN_DEFAULTS[name])
        elif name not in ("quantization", "tie_word_embeddings"):
            kw[name] = r.required(name)
    r.fixed()
    kw["tie_word_embeddings"] = False  # FIXED: any other value was refused
    if "quantization" in raw:  # ours (`to_dict()`)
        kw["quantization"] = dict(r.silent("quantization", {}) or {})
    elif "dtype" in raw:  # the release's
        kw["quantization"] = {"quant_method": r.silent("dtype", None),
                              "scale_fmt": r.silent("scale_fmt", None)}
    else:
        kw["quantization"] = r.optional("dtype", None) or {}  # None: unquantised
    _finish([r], source, "reference-inference")
    return kw


def from_own(block: Any, fields: list[str], source: str) -> dict[str, Any]:
    """The "v4lab" block our writers add: every field, nothing else. (A field added to
    ModelConfig later needs a default here, so that older checkpoints keep loading.)"""
    if not isinstance(block, dict):
        raise ValueError(f"{source}: field 'v4lab' must be an object, got {type(block).__name__}")
    missing = [f for f in fields if f not in block]
    unknown = [k for k in block if k not in fields]
    if missing or unknown:
        raise ValueError(f"{source}: field 'v4lab' "
                         + (f"lacks {', '.join(missing)}" if missing else "")
                         + ("; " if missing and unknown else "")
                         + (f"has unknown key(s) {', '.join(unknown)}" if unknown else "")
                         + " (it must hold every ModelConfig field)")
    return dict(block)


_HF_RATIO_KEYS = {"sliding_attention": None, "compressed_sparse_attention":
                  "compressed_sparse_attention", "heavily_compressed_attention":
                  "heavily_compressed_attention"}


def rewrite_transformers_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A config.json written by transformers' DeepseekV4Config has `layer_types`,
    `compress_rates`, `mlp_layer_types` and `rope_parameters` instead of the released
    `compress_ratios`, `num_hash_layers` and `rope_scaling`; rebuild those (only where the
    released key is absent)."""
    raw = dict(raw)
    if "compress_ratios" not in raw and "layer_types" in raw:
        rates = raw.get("compress_rates") or {}
        ratios = []
        for t in raw["layer_types"]:
            if t not in _HF_RATIO_KEYS:
                raise ValueError(f"{source}: unknown layer type {t!r} in layer_types")
            ratios.append(0 if _HF_RATIO_KEYS[t] is None else int(rates.get(
                t, 4 if t == "compressed_sparse_attention" else 128)))
        raw["compress_ratios"] = ratios + [0] * int(raw.get("num_nextn_predict_layers", 1))
    if "num_hash_layers" not in raw and "mlp_layer_types" in raw:
        raw["num_hash_layers"] = sum(t == "hash_moe" for t in raw["mlp_layer_types"])
    compress = (raw.get("rope_parameters") or {}).get("compress")
    if "rope_scaling" not in raw and isinstance(compress, dict) and compress.get(
            "rope_type", compress.get("type")) == "yarn":
        raw["rope_scaling"] = {k: compress[k] for k in ("factor", "beta_fast", "beta_slow",
                                                        "original_max_position_embeddings")
                               if k in compress}
    return raw
