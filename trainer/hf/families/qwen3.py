"""Qwen3ForCausalLM <-> HybridLM.

The Llama layout plus an RMSNorm on each query and key head (over head_dim, eps
rms_norm_eps) before RoPE; `attention_bias` biases q, k, v and o. Layer kinds come
from `layer_types` (Qwen3Config: when absent, layers >= max_window_layers slide if
use_sliding_window; `sliding_window` counts only when use_sliding_window is true):
full_attention -> attn, sliding_attention -> swa with window sliding_window - 1.
"""
from __future__ import annotations

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_from_params
from loom.trainer.hf.families.base import (FULL, HIDDEN_ACT, SLIDING, ConvertError, Family, attention_config,
                                           attention_problem, common_hf, first_opts, layer_types_to_hf,
                                           llama_layer_names, mlp_kind_from_hf, sliding_window_to_hf)


class Qwen3(Family):
    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    target = "qwen3"
    defaults = {"head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": 28, "layer_types": None, "rope_theta": 10000.0}
    LAYER = llama_layer_names(q_norm=True)

    def config_from_hf(self, hf: dict) -> ModelConfig:
        mlp_kind = mlp_kind_from_hf(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        window = self.get(hf, "sliding_window") if self.get(hf, "use_sliding_window") else None
        types = self.get(hf, "layer_types") or [
            SLIDING if window is not None and i >= int(self.get(hf, "max_window_layers")) else FULL for i in range(n)]
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope, partial = rope_from_params(params, hf, float(self.get(hf, "rope_theta")))
        if partial != 1.0:
            raise ConvertError(f"config.json: partial_rotary_factor {partial} is not supported by Qwen3ForCausalLM")
        bias = bool(self.get(hf, "attention_bias"))
        eps = float(self.need(hf, "rms_norm_eps"))
        attn = {"qk_norm": True, "qk_norm_eps": eps, "qkv_bias": bias, "out_bias": bias}
        return attention_config(self, hf, head_dim_default=self.defaults["head_dim"], types=types,
                                sliding_window=window, attn=attn, rope=rope, mlp_kind=mlp_kind)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        problem, opts = attention_problem(
            cfg, self.architecture,
            expect={"qk_norm": True, "qk_norm_width": "head", "qk_norm_eps": cfg.norm_eps, "scale": None},
            model={"norm_placement": "pre", "norm_zero_centred": False, "norm_weight_fp32": False,
                   "mlp_kind": lambda k: k in ("swiglu", "geglu"), "mlp_bias": False, "block_mlp": True, "embed_scale": 1.0, "logit_softcap": None})
        if problem is None and first_opts(opts).qkv_bias != first_opts(opts).out_bias:
            return "model.mixers.*.qkv_bias and out_bias differ; Qwen3's attention_bias biases q, k, v and o together"
        return problem

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        window = sliding_window_to_hf(opts)
        return {**common_hf(cfg), "hidden_act": HIDDEN_ACT[cfg.mlp_kind], "attention_bias": first_opts(opts).qkv_bias,
                "use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": len(cfg.layer_kinds()), "layer_types": layer_types_to_hf(cfg)}

