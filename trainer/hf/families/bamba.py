"""BambaForCausalLM <-> HybridLM.

Bamba, as transformers 5.25 computes it (modeling_bamba.py): Llama-style pre-norm blocks
(input_layernorm -> mixer_norm, pre_ff_layernorm -> mlp_norm, final_layernorm -> norm,
plain RMSNorm) with a SwiGLU feed_forward (mlp_bias) in every layer, and one mixer per
layer from `attn_layer_indices` (the rest are Mamba-2):
    mamba -> mamba2   BambaMixer, tensors one to one (conv taps flipped): mamba_n_heads,
                      mamba_d_head ("auto": mamba_expand * hidden_size / mamba_n_heads),
                      mamba_n_groups, mamba_d_state, mamba_d_conv, mamba_conv_bias,
                      mamba_proj_bias, time_step_limit, gated group norm eps rms_norm_eps
    self_attn -> attn RoPE on half of each head (BambaConfig hard-codes
                      partial_rotary_factor 0.5: rope_fraction 0.5), attention_bias on
                      q, k, v and o, GQA, head_dim (config.json's, which BambaAttention reads,
                      else hidden_size / num_attention_heads)
Refused: hidden_act other than silu (it is also the Mamba conv's activation).
Export: rms_norm_eps is the Mamba gated norm's; NoPE attention (recipes/mamba2-hybrid*.yaml)
becomes heads of twice the width whose rotated half is zero (transforms.py).
z_loss_coefficient is a training loss term, not part of the model, and is not imported.
"""
from __future__ import annotations

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_from_params, rope_to_hf
from loom.trainer.hf.families.base import ConvertError, Family, attention_names, compact_layers, sizes
from loom.trainer.hf.families.hybrid import (MAMBA2_NAMES, check_groups, dt_limit, export_form, export_state,
                                             map_convs, need_silu, roundtrip_problem)

_TOP = {"model.embed_tokens.weight": "embed.weight", "model.final_layernorm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}


class Bamba(Family):
    model_types = ("bamba",)
    architecture = "BambaForCausalLM"
    target = "bamba"
    kinds = ("mamba2", "attn")  # the Loom layer kinds the class expresses
    defaults = {"vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "attn_layer_indices": None, "mamba_n_heads": 128, "mamba_d_head": "auto",
                "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2,
                "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": (0.0, float("inf")),
                "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0}
    LAYER = {"input_layernorm.weight": "mixer_norm.weight", "pre_ff_layernorm.weight": "mlp_norm.weight",
             **attention_names(q_norm=False),
             **{f"feed_forward.{p}_proj.{t}": f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down")
                for t in ("weight", "bias")},
             **{f"mamba.{k}": f"mixer.{v}" for k, v in MAMBA2_NAMES.items()}}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        need_silu(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        attn_at = set(self.get(hf, "attn_layer_indices") or [])
        bad = [i for i in attn_at if not 0 <= int(i) < n]
        if bad:
            raise ConvertError(f"config.json: attn_layer_indices has {bad[0]} outside the {n} layers")
        kinds = ["attn" if i in attn_at else "mamba2" for i in range(n)]
        s = sizes(self, hf, None)
        d_model = s["d_model"]
        heads = int(self.get(hf, "mamba_n_heads"))
        expand = int(self.get(hf, "mamba_expand"))
        d_head = self.get(hf, "mamba_d_head")
        d_head = expand * d_model // heads if d_head == "auto" else int(d_head)
        if d_head * heads != expand * d_model:
            raise ConvertError(f"config.json: mamba_d_head * mamba_n_heads ({d_head * heads}) is not "
                               f"mamba_expand * hidden_size ({expand * d_model})")
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        params["partial_rotary_factor"] = 0.5  # BambaConfig sets it whatever config.json says
        rope, partial = rope_from_params(params, hf, float(self.get(hf, "rope_theta")))
        limit = self.get(hf, "time_step_limit")
        limit = dt_limit(limit)
        eps = float(self.need(hf, "rms_norm_eps"))
        bias = bool(self.get(hf, "attention_bias"))
        mixers = {}
        if "attn" in kinds:
            mixers["attn"] = {"qkv_bias": bias, "out_bias": bias, "rope_fraction": partial}
        if "mamba2" in kinds:
            check_groups(heads, int(self.get(hf, "mamba_n_groups")), "mamba_n_heads", "mamba_n_groups")
            mixers["mamba2"] = {"n_heads": heads, "head_dim": d_head, "d_state": int(self.get(hf, "mamba_d_state")),
                                "n_groups": int(self.get(hf, "mamba_n_groups")),
                                "d_conv": int(self.get(hf, "mamba_d_conv")),
                                "conv_bias": bool(self.get(hf, "mamba_conv_bias")),
                                "bias": bool(self.get(hf, "mamba_proj_bias")), "dt_limit": limit, "norm_eps": eps}
        return ModelConfig(**s, layers=compact_layers(kinds), mixers=mixers,
                           tie_embeddings=bool(self.get(hf, "tie_word_embeddings")), norm_eps=eps, rope=rope,
                           mlp_bias=bool(self.get(hf, "mlp_bias")))

    def from_hf(self, name: str) -> str | None:
        return _TOP[name] if name in _TOP else super().from_hf(name)

    def to_hf(self, name: str) -> str:
        top = {v: k for k, v in _TOP.items()}
        return top[name] if name in top else super().to_hf(name)

    def tensors_from_hf(self, state: dict) -> dict:
        return map_convs(state, to_loom=True)

    def tensors_to_hf(self, state: dict) -> dict:
        return map_convs(state, to_loom=False)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        return roundtrip_problem(self, cfg)

    def export_form(self, cfg: ModelConfig) -> ModelConfig:
        return export_form(self, cfg)

    def export_state(self, cfg: ModelConfig, form: ModelConfig, state: dict) -> dict:
        return export_state(cfg, form, state)

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        kinds = cfg.layer_kinds()
        # one rms_norm_eps, the Mamba gated norm's too: that norm's (export_form rescales the block norms')
        eps = opts["mamba2"].norm_eps if "mamba2" in opts else cfg.norm_eps
        out = {"num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": eps, "hidden_act": "silu",
               "tie_word_embeddings": cfg.tie_embeddings, "mlp_bias": cfg.mlp_bias, "attention_dropout": 0.0,
               "attn_layer_indices": [i for i, k in enumerate(kinds) if k == "attn"],
               "rope_parameters": {**rope_to_hf(cfg.rope), "partial_rotary_factor": 0.5}}
        out["head_dim"] = cfg.head_dim  # not a BambaConfig field, but BambaAttention and its RoPE read it
        if "attn" in opts:
            out["attention_bias"] = opts["attn"].qkv_bias
        if "mamba2" in opts:
            m = opts["mamba2"]
            heads = m.n_heads or m.expand * cfg.d_model // m.head_dim
            if (heads * m.head_dim) % cfg.d_model:
                raise ConvertError(f"the mamba2 inner width {heads * m.head_dim} is not a multiple of d_model; "
                                   f"BambaForCausalLM sets it as mamba_expand * hidden_size")
            out |= {"mamba_n_heads": heads, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
                    "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": heads * m.head_dim // cfg.d_model,
                    "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias, "time_step_limit": list(m.dt_limit)}
        return out
