"""MistralForCausalLM <-> HybridLM.

The Llama layout without biases; `sliding_window` (MistralConfig default 4096, an
explicit null turns it off) applies to every layer: each is swa with window
sliding_window - 1, or attn when it is null. MistralConfig ignores `layer_types`
(transformers warns and builds every layer the same), and so does this import.
head_dim null: hidden_size // num_attention_heads.
"""
from __future__ import annotations

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_from_params
from loom.trainer.hf.families.base import (FULL, HIDDEN_ACT, SLIDING, ConvertError, Family, attention_config,
                                           attention_problem, common_hf, llama_layer_names, mlp_kind_from_hf,
                                           sliding_window_to_hf)


class Mistral(Family):
    model_types = ("mistral",)
    architecture = "MistralForCausalLM"
    target = "mistral"
    defaults = {"head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096, "rope_theta": 10000.0}
    LAYER = llama_layer_names(q_norm=False)

    def config_from_hf(self, hf: dict) -> ModelConfig:
        mlp_kind = mlp_kind_from_hf(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        window = self.get(hf, "sliding_window")
        types = [SLIDING if window is not None else FULL] * n
        rope, partial = rope_from_params(hf.get("rope_parameters") or hf.get("rope_scaling") or {}, hf,
                                         float(self.get(hf, "rope_theta")))
        if partial != 1.0:
            raise ConvertError(f"config.json: partial_rotary_factor {partial} is not supported by MistralForCausalLM")
        return attention_config(self, hf, head_dim_default=None, types=types, sliding_window=window, attn={},
                                rope=rope, mlp_kind=mlp_kind)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        if len(set(cfg.layer_kinds())) > 1:
            return "model.layers mixes attn and swa; MistralForCausalLM runs every layer the same way"
        return attention_problem(
            cfg, self.architecture,
            expect={"qk_norm": False, "qkv_bias": False, "out_bias": False, "scale": None},
            model={"norm_placement": "pre", "norm_zero_centred": False, "norm_weight_fp32": False,
                   "mlp_kind": lambda k: k in ("swiglu", "geglu"), "mlp_bias": False, "block_mlp": True,
                   "embed_scale": 1.0, "logit_softcap": None})[0]

    def hf_config(self, cfg: ModelConfig) -> dict:
        return {**common_hf(cfg), "hidden_act": HIDDEN_ACT[cfg.mlp_kind],
                "sliding_window": sliding_window_to_hf(mixer_options(cfg))}
