"""What the Hugging Face importers and exporters share: the error type, required
config.json fields, and RoPE parameters in both directions.

transformers >= 5 writes `rope_parameters` ({rope_type, rope_theta, factor, ...};
per layer type for Gemma 3 and OLMo 3: {"full_attention": {...},
"sliding_attention": {...}}); 4.x wrote `rope_theta` + `rope_scaling`. Both are read.
"""
from __future__ import annotations

import math

from loom.models.rope import RopeConfig


class ConvertError(ValueError):
    """A checkpoint that cannot be converted exactly; the message is one line."""


def require(hf: dict, key: str, where: str = "config.json"):
    """hf[key], or ConvertError naming the missing field."""
    if hf.get(key) is None:
        raise ConvertError(f"{where}: missing {key!r}")
    return hf[key]


def rope_from_params(params: dict, hf: dict, theta: float) -> tuple[RopeConfig, float]:
    """(RopeConfig, partial_rotary_factor) from one rope parameter mapping (`rope_parameters`
    of transformers >= 5, or `rope_scaling` of 4.x; for one layer type when the config has
    several), mapped only when HybridLM's RoPE is the same function of the position. `hf` is
    the whole config (max_position_embeddings, legacy top-level keys); `theta` the base
    when the mapping has no rope_theta."""
    theta = float(params.get("rope_theta") or theta)
    kind = params.get("rope_type") or params.get("type") or "default"
    partial = float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
    original = params.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))

    def need(key: str) -> float:
        return float(require(params, key, "config.json rope scaling"))

    if kind == "default":
        return RopeConfig(base=theta), partial
    if kind == "linear":
        return RopeConfig(base=theta, scaling="linear", factor=need("factor")), partial
    if kind in ("llama3", "yarn") and original is None:
        raise ConvertError(f"config.json: {kind} rope scaling needs original_max_position_embeddings")
    if kind == "llama3":
        return RopeConfig(base=theta, scaling="llama3", factor=need("factor"),
                          original_max_len=int(original),
                          low_freq_factor=need("low_freq_factor"),
                          high_freq_factor=need("high_freq_factor")), partial
    if kind == "yarn":
        return _yarn_from_hf(hf, params, theta, original), partial
    if kind == "dynamic":
        raise ConvertError("config.json: rope scaling 'dynamic' (NTK re-scaled with the sequence length, only past "
                           "max_position_embeddings) has no exact equivalent; Loom's 'ntk' is static. Set the "
                           "rope type to default in config.json to import it with plain RoPE (what transformers "
                           "computes up to max_position_embeddings)")
    raise ConvertError(f"config.json: rope scaling {kind!r} is not supported "
                       f"(supported: default, linear, yarn, llama3)")


def _yarn_from_hf(hf: dict, params: dict, theta: float, original: int) -> RopeConfig:
    factor = params.get("factor")
    if factor is None:  # transformers: the ratio of the extended to the pretrained length
        factor = require(hf, "max_position_embeddings") / original
    factor = float(factor)
    if params.get("truncate", True) is not True:
        raise ConvertError("config.json: yarn with truncate: false is not supported")
    rope = RopeConfig(base=theta, scaling="yarn", factor=factor, original_max_len=int(original),
                      beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    # HybridLM scales cos/sin by mscale(factor); transformers lets configs override it.
    attn_factor = params.get("attention_factor")
    if attn_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
        attn_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    if attn_factor is not None and not math.isclose(attn_factor, mscale(factor), rel_tol=0, abs_tol=1e-12):
        raise ConvertError(f"config.json: yarn attention factor {attn_factor:g} differs from 0.1 ln(factor) + 1 "
                           f"= {mscale(factor):g}, the only one HybridLM implements")
    return rope


def rope_to_hf(rope: RopeConfig) -> dict:
    """transformers' rope_parameters (v5) for a RopeConfig; rope_theta included."""
    r = rope
    if r.scaling == "none":
        return {"rope_type": "default", "rope_theta": r.base}
    if r.scaling == "linear":
        return {"rope_type": "linear", "factor": r.factor, "rope_theta": r.base}
    if r.scaling == "yarn":
        return {"rope_type": "yarn", "factor": r.factor, "original_max_position_embeddings": r.original_max_len,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "rope_theta": r.base}
    if r.scaling == "llama3":
        return {"rope_type": "llama3", "factor": r.factor, "original_max_position_embeddings": r.original_max_len,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor, "rope_theta": r.base}
    raise ConvertError(f"model.rope.scaling {r.scaling!r} has no transformers equivalent")
