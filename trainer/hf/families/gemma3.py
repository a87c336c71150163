"""Gemma3ForCausalLM (and the text tower of Gemma3ForConditionalGeneration) <-> HybridLM.

Gemma 3's text model, as transformers 5.25 computes it:
- embeddings times sqrt(hidden_size), the scale rounded to the weights' dtype first
  (embed_scale);
- sandwich norms: x + post_norm(attn(pre_norm(x))), then the same around the MLP
  (input_layernorm -> mixer_norm, post_attention_layernorm -> mixer_post_norm,
  pre_feedforward_layernorm -> mlp_norm, post_feedforward_layernorm -> mlp_post_norm),
  every RMSNorm zero-centred (weight w applied as 1 + w, in fp32);
- GeGLU MLP (hidden_activation gelu_pytorch_tanh);
- per-head q/k RMSNorm (zero-centred, eps rms_norm_eps) before RoPE; attention
  logits scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2;
- layer_types (default: five sliding layers, then one full, `sliding_window_pattern`)
  -> swa (window sliding_window - 1) / attn, each type with its own RoPE
  (rope_parameters {full_attention, sliding_attention}; transformers-4 configs give
  rope_theta + rope_scaling to the full layers and rope_local_base_freq to the local ones).
- final_logit_softcapping c: head logits c tanh(z / c) (model.logit_softcap).
Refused: use_bidirectional_attention (Loom is causal). attn_logit_softcapping is accepted
and ignored, exactly as transformers' Gemma3Attention ignores it (it never passes it to
the attention function).

A Gemma3ForConditionalGeneration folder imports its language model (text_config, the
`language_model` tensors and the head); the vision tower and projector are left out.
"""
from __future__ import annotations

import math

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_to_hf
from loom.trainer.hf.families.base import (FULL, HIDDEN_ACT, SLIDING, ConvertError, Family, attention_config,
                                           attention_names, attention_problem, common_hf, first_opts,
                                           layer_types_to_hf, mlp_kind_from_hf, mlp_names, rope_per_layer_type,
                                           sliding_window_to_hf)

MULTIMODAL = "Gemma3ForConditionalGeneration"
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))


class Gemma3(Family):
    model_types = ("gemma3_text", "gemma3")
    architecture = "Gemma3ForCausalLM"
    target = "gemma3"
    defaults = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                "layer_types": None, "sliding_window_pattern": 6, "final_logit_softcapping": None,
                "attn_logit_softcapping": None, "use_bidirectional_attention": False,
                "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
    LAYER = {"input_layernorm.weight": "mixer_norm.weight", "post_attention_layernorm.weight": "mixer_post_norm.weight",
             "pre_feedforward_layernorm.weight": "mlp_norm.weight",
             "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
             **attention_names(q_norm=True), **mlp_names()}

    def check_architecture(self, hf: dict) -> str:
        archs = hf.get("architectures") or []
        accepted = [self.architecture] if hf.get("model_type") == "gemma3_text" else [MULTIMODAL]
        if archs and archs != accepted:
            raise ConvertError(f"unsupported architecture {', '.join(archs)} (model_type {hf.get('model_type')!r}); "
                               f"for this model_type loom convert hf imports {accepted[0]}")
        return accepted[0]

    def text_config(self, hf: dict) -> tuple[dict, str | None]:
        notes = []
        text = hf
        if hf.get("model_type") == "gemma3":
            text = dict(hf.get("text_config") or {})
            if "tie_word_embeddings" in hf:  # Gemma3Config ties the head to the language model's embedding
                text["tie_word_embeddings"] = hf["tie_word_embeddings"]
            notes.append(f"{MULTIMODAL}: imported its language model (text_config) only; the vision tower and the "
                         f"multimodal projector are left out")
        if self.get(text, "attn_logit_softcapping") is not None:
            notes.append(f"attn_logit_softcapping {self.get(text, 'attn_logit_softcapping')} is not applied, as "
                         f"transformers' Gemma3Attention does not apply it")
        return text, "; ".join(notes) or None

    def config_from_hf(self, hf: dict) -> ModelConfig:
        if self.get(hf, "use_bidirectional_attention"):
            raise ConvertError("config.json: use_bidirectional_attention: true is not supported (Loom's attention "
                               "is causal)")
        cap = self.get(hf, "final_logit_softcapping")
        mlp_kind = mlp_kind_from_hf(self.get(hf, "hidden_activation"), "hidden_activation")
        n = int(self.need(hf, "num_hidden_layers"))
        pattern = int(self.get(hf, "sliding_window_pattern"))
        types = self.get(hf, "layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        full, sliding = rope_per_layer_type(hf, float(self.get(hf, "rope_theta")),
                                            float(self.get(hf, "rope_local_base_freq")))
        bias = bool(self.get(hf, "attention_bias"))
        d_model = int(self.need(hf, "hidden_size"))
        attn = {"qk_norm": True, "qk_norm_eps": float(self.need(hf, "rms_norm_eps")), "qkv_bias": bias,
                "out_bias": bias, "scale": float(self.need(hf, "query_pre_attn_scalar")) ** -0.5}
        return attention_config(self, hf, head_dim_default=self.defaults["head_dim"], types=types,
                                sliding_window=self.get(hf, "sliding_window"), attn=attn, rope=full,
                                sliding_rope=sliding, norm_placement="sandwich", norm_zero_centred=True,
                                mlp_kind=mlp_kind, embed_scale=d_model ** 0.5,
                                logit_softcap=None if cap is None else float(cap))

    def from_hf(self, name: str) -> str | None:
        if name.startswith(_VISION):
            return None
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        return super().from_hf(name)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        problem, opts = attention_problem(
            cfg, self.architecture,
            expect={"qk_norm": True, "qk_norm_width": "head", "qk_norm_eps": cfg.norm_eps,
                    "scale": lambda s: s is None or _scalar(s) is not None},
            model={"norm_placement": "sandwich", "norm_zero_centred": True,
                   "mlp_kind": lambda k: k in ("swiglu", "geglu"), "mlp_bias": False, "block_mlp": True,
                   "embed_scale": lambda e: math.isclose(e, cfg.d_model ** 0.5, rel_tol=1e-12)}, swa_rope=True)
        if problem is None and first_opts(opts).qkv_bias != first_opts(opts).out_bias:
            return "model.mixers.*.qkv_bias and out_bias differ; Gemma 3's attention_bias biases q, k, v and o"
        return problem

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        o = first_opts(opts)
        swa_rope = opts["swa"].rope_config if "swa" in opts and opts["swa"].rope_config is not None else cfg.rope
        return {**common_hf(cfg), "model_type": "gemma3_text", "hidden_activation": HIDDEN_ACT[cfg.mlp_kind],
                "attention_bias": o.qkv_bias,
                "query_pre_attn_scalar": cfg.head_dim if o.scale is None else _scalar(o.scale),
                "sliding_window": sliding_window_to_hf(opts) or 4096, "layer_types": layer_types_to_hf(cfg),
                "rope_parameters": {FULL: rope_to_hf(cfg.rope), SLIDING: rope_to_hf(swa_rope)},
                "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": None,
                "use_bidirectional_attention": False}


def _scalar(scale: float) -> int | None:
    """The integer query_pre_attn_scalar q with q^-1/2 == scale (Gemma3TextConfig holds an int), or None."""
    q = round(scale ** -2)
    return q if q >= 1 and math.isclose(q ** -0.5, scale, rel_tol=1e-12) else None
