"""Olmo3ForCausalLM <-> HybridLM.

OLMo 3 is post-norm: x + norm(attn(x)), then x + norm(mlp(x)), with no norm before
a sublayer (post_attention_layernorm -> mixer_post_norm, post_feedforward_layernorm
-> mlp_post_norm), and its RMSNorm multiplies by the weight before rounding
(norm_weight_fp32). q and k are normalised over the whole projection (H*K and G*K,
qk_norm_width "full") before RoPE. `layer_types` (default: three sliding layers,
then one full) picks swa (window sliding_window - 1) or attn; RoPE is per layer type
(`rope_parameters` {full_attention, sliding_attention}; a transformers-4 `rope_scaling`
and `rope_theta` apply to the full-attention layers only, as Olmo3Config resolves them). Olmo3Config has
no head_dim field: it is hidden_size // num_attention_heads unless config.json adds one.
"""
from __future__ import annotations

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.families.base import (FULL, HIDDEN_ACT, SLIDING, Family, attention_config, attention_names,
                                           attention_problem, common_hf, first_opts, layer_types_to_hf,
                                           mlp_kind_from_hf, mlp_names, rope_per_layer_type,
                                           sliding_window_to_hf)
from loom.trainer.hf.common import rope_to_hf


class Olmo3(Family):
    model_types = ("olmo3",)
    architecture = "Olmo3ForCausalLM"
    target = "olmo3"
    defaults = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
                "sliding_window": 4096, "layer_types": None, "rope_theta": 500000.0}
    LAYER = {"post_attention_layernorm.weight": "mixer_post_norm.weight",
             "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
             **attention_names(q_norm=True), **mlp_names()}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        mlp_kind = mlp_kind_from_hf(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        types = self.get(hf, "layer_types") or [SLIDING if (i + 1) % 4 else FULL for i in range(n)]
        # Olmo3Config hands a legacy rope_theta to the full-attention layers only: the sliding
        # ones keep the class default (its convert_rope_params_to_dict pops the key once)
        full, sliding = rope_per_layer_type(hf, float(self.get(hf, "rope_theta")), self.defaults["rope_theta"])
        bias = bool(self.get(hf, "attention_bias"))
        attn = {"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": float(self.need(hf, "rms_norm_eps")),
                "qkv_bias": bias, "out_bias": bias}
        return attention_config(self, hf, head_dim_default=None, types=types,
                                sliding_window=self.get(hf, "sliding_window"), attn=attn, rope=full,
                                sliding_rope=sliding, norm_placement="post", norm_weight_fp32=True,
                                mlp_kind=mlp_kind)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        problem, opts = attention_problem(
            cfg, self.architecture,
            expect={"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": cfg.norm_eps, "scale": None},
            model={"norm_placement": "post", "norm_zero_centred": False, "norm_weight_fp32": True,
                   "mlp_kind": lambda k: k in ("swiglu", "geglu"), "mlp_bias": False, "block_mlp": True,
                   "embed_scale": 1.0, "logit_softcap": None}, swa_rope=True)
        if problem is None and first_opts(opts).qkv_bias != first_opts(opts).out_bias:
            return "model.mixers.*.qkv_bias and out_bias differ; OLMo 3's attention_bias biases q, k, v and o"
        return problem

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        swa_rope = opts["swa"].rope_config if "swa" in opts and opts["swa"].rope_config is not None else cfg.rope
        return {**common_hf(cfg), "hidden_act": HIDDEN_ACT[cfg.mlp_kind], "attention_bias": first_opts(opts).qkv_bias,
                "sliding_window": sliding_window_to_hf(opts) or 4096, "layer_types": layer_types_to_hf(cfg),
                "rope_parameters": {FULL: rope_to_hf(cfg.rope), SLIDING: rope_to_hf(swa_rope)}}


