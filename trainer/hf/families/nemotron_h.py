"""NemotronHForCausalLM (dense layers) <-> HybridLM.

Nemotron-H, as transformers 5.25 computes it (modeling_nemotron_h.py): every layer is
x + mixer(norm(x)) with one RMSNorm (weight multiplied in fp32: norm_weight_fp32) and one
mixer, from `layers_block_type` (config.json; legacy `hybrid_override_pattern` M/*/-/E
and the old names mamba / attention as the config class remaps them):
    linear_attention -> mamba2   NemotronHMamba2Mixer, tensors one to one (conv taps flipped):
                                 mamba_num_heads, mamba_head_dim, n_groups, ssm_state_size,
                                 conv_kernel, use_conv_bias, use_bias (in_proj / out_proj),
                                 time_step_limit, gated group norm eps layer_norm_epsilon
    full_attention   -> attn     no RoPE, no bias (NemotronHAttention ignores attention_bias
                                 and sliding_window), GQA, head_dim
    mlp              -> mlp      an MLP-only block: squared-ReLU up/down (mlp_hidden_act relu2),
                                 mlp_bias
so model.block_mlp is false (mixer blocks carry no MLP). The layer's `norm` is the mixer
block's mixer_norm, or the MLP block's mlp_norm; `mixer.up_proj` / `mixer.down_proj` of an
MLP layer are the block's mlp.
NemotronHForCausalLM never ties its head (no _tied_weights_keys): whatever
tie_word_embeddings says, lm_head is its own tensor, so the import is untied (and a tied
Loom model exports with lm_head written as a copy of the embedding: transforms.py).
One layer_norm_epsilon: the Mamba-2 gated norm's when there are mamba2 layers (the block
norms' own eps kept by rescaling the residual stream, transforms.py).
Refused, in one line naming the layer: `moe` layers (Loom has no Nemotron-H
mixture-of-experts layer). Also refused: mamba_hidden_act other than silu, mlp_hidden_act
other than relu2. The multi-token prediction layers (mtp.*) are left out, as the
ForCausalLM class leaves them.
"""
from __future__ import annotations

import re

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.families.base import ConvertError, Family, attention_names, compact_layers
from loom.trainer.hf.families.hybrid import (MAMBA2_NAMES, check_groups, dt_limit, export_form, export_state,
                                             kinds_from_types, map_convs, need_silu, roundtrip_problem)

_TYPES = {"linear_attention": "mamba2", "full_attention": "attn", "mlp": "mlp"}
_LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}
_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_MLP_NORM = "mlp_layer_norm.weight"  # an MLP layer's `norm` (it precedes the MLP)
_TOP = {"model.embeddings.weight": "embed.weight", "model.norm_f.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}


class NemotronH(Family):
    model_types = ("nemotron_h",)
    architecture = "NemotronHForCausalLM"
    target = "nemotron_h"
    kinds = ("mamba2", "attn", "mlp")  # the Loom layer kinds the class expresses
    defaults = {"vocab_size": 131072, "hidden_size": 4096, "tie_word_embeddings": False, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 21504, "mlp_hidden_act": "relu2",
                "mlp_bias": False, "ssm_state_size": 128, "mamba_num_heads": 128, "mamba_head_dim": 64,
                "mamba_hidden_act": "silu", "n_groups": 8, "conv_kernel": 4, "time_step_min": 0.001,
                "time_step_max": 0.1, "time_step_limit": (0.0, float("inf")), "time_step_floor": 1e-4,
                "use_conv_bias": True, "use_bias": False, "layer_norm_epsilon": 1e-5}
    LAYER = {"norm.weight": "mixer_norm.weight", _MLP_NORM: "mlp_norm.weight",
             "mlp.up_proj.weight": "mlp.up_proj.weight", "mlp.up_proj.bias": "mlp.up_proj.bias",
             "mlp.down_proj.weight": "mlp.down_proj.weight", "mlp.down_proj.bias": "mlp.down_proj.bias",
             **{k.replace("self_attn.", "mixer."): v for k, v in attention_names(q_norm=False).items()},
             **{f"mixer.{k}": f"mixer.{v}" for k, v in MAMBA2_NAMES.items()}}

    def get(self, hf: dict, key: str):
        for old, new in (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"),
                         ("time_step_limit", "mamba_dt_limit"), ("use_conv_bias", "mamba_conv_bias")):
            if key == old and new in hf:  # the config class's backward-compatible names
                return hf[new]
        return super().get(hf, key)

    def layer_types(self, hf: dict) -> list[str]:
        types = hf.get("layers_block_type") or hf.get("layer_types")
        if not types and hf.get("hybrid_override_pattern"):
            bad = [c for c in hf["hybrid_override_pattern"] if c not in _PATTERN]
            if bad:
                raise ConvertError(f"config.json: hybrid_override_pattern has {bad[0]!r} (supported: M, *, -, E)")
            types = [_PATTERN[c] for c in hf["hybrid_override_pattern"]]
        types = types or ["linear_attention", "moe", "full_attention", "mlp"]
        return [_LEGACY.get(t, t) for t in types]

    def config_from_hf(self, hf: dict) -> ModelConfig:
        need_silu(self.get(hf, "mamba_hidden_act"), "mamba_hidden_act")
        if self.get(hf, "mlp_hidden_act") != "relu2":
            raise ConvertError(f"config.json: mlp_hidden_act {self.get(hf, 'mlp_hidden_act')!r} is not supported "
                               f"(Loom's non-gated MLP is relu2)")
        kinds = kinds_from_types(self.layer_types(hf), _TYPES, "layers_block_type",
                                 refuse={"moe": "Loom has no Nemotron-H mixture-of-experts layer (only the dense "
                                                "mamba / attention / mlp layers import)"})
        d_model = int(self.need(hf, "hidden_size"))
        n_heads = int(self.get(hf, "num_attention_heads"))
        n_kv = int(self.get(hf, "num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise ConvertError(f"config.json: num_attention_heads ({n_heads}) is not a multiple of "
                               f"num_key_value_heads ({n_kv})")
        limit = self.get(hf, "time_step_limit")
        limit = dt_limit(limit)
        eps = float(self.get(hf, "layer_norm_epsilon"))
        mixers = {}
        if "attn" in kinds:
            mixers["attn"] = {"rope": False}
        if "mamba2" in kinds:
            check_groups(int(self.get(hf, "mamba_num_heads")), int(self.get(hf, "n_groups")), "mamba_num_heads",
                         "n_groups")
            mixers["mamba2"] = {"n_heads": int(self.get(hf, "mamba_num_heads")),
                                "head_dim": int(self.get(hf, "mamba_head_dim")),
                                "d_state": int(self.get(hf, "ssm_state_size")), "n_groups": int(self.get(hf, "n_groups")),
                                "d_conv": int(self.get(hf, "conv_kernel")), "conv_bias": bool(self.get(hf, "use_conv_bias")),
                                "bias": bool(self.get(hf, "use_bias")), "dt_limit": limit, "norm_eps": eps,
                                "dt_min": float(self.get(hf, "time_step_min")),
                                "dt_max": float(self.get(hf, "time_step_max")),
                                "dt_init_floor": float(self.get(hf, "time_step_floor"))}
        head_dim = hf.get("head_dim") or self.defaults["head_dim"]
        return ModelConfig(vocab_size=int(self.need(hf, "vocab_size")), d_model=d_model, n_heads=n_heads,
                           n_kv_heads=n_kv, head_dim=int(head_dim), mlp_hidden=int(self.get(hf, "intermediate_size")),
                           layers=compact_layers(kinds), mixers=mixers,
                           tie_embeddings=False, norm_eps=eps,
                           norm_weight_fp32=True, mlp_kind="relu2", mlp_bias=bool(self.get(hf, "mlp_bias")),
                           block_mlp=False)

    def from_hf(self, name: str) -> str | None:
        if name.startswith(("mtp.", "model.mtp.")):
            return None
        if name.startswith("backbone."):  # what save_pretrained writes (the original checkpoints' prefix)
            name = "model." + name[len("backbone."):]
        if name in _TOP:
            return _TOP[name]
        return super().from_hf(name)

    def to_hf(self, name: str) -> str:
        top = {v: k for k, v in _TOP.items()}
        return top[name] if name in top else super().to_hf(name)

    def tensors_from_hf(self, state: dict) -> dict:
        state = {("model." + k[len("backbone."):]) if k.startswith("backbone.") else k: t for k, t in state.items()}
        mlp_layers = {m.group(1) for k in state if (m := re.fullmatch(r"model\.layers\.(\d+)\.mixer\.up_proj\.weight", k))}
        out = {}
        for k, t in state.items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
            if m and m.group(1) in mlp_layers:
                rest = m.group(2)
                rest = _MLP_NORM if rest == "norm.weight" else re.sub(r"^mixer\.", "mlp.", rest)
                k = f"model.layers.{m.group(1)}.{rest}"
            out[k] = t
        return map_convs(out, to_loom=True)

    def tensors_to_hf(self, state: dict) -> dict:
        out = {}
        for k, t in map_convs(state, to_loom=False).items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
            if m and (m.group(2) == _MLP_NORM or m.group(2).startswith("mlp.")):
                rest = "norm.weight" if m.group(2) == _MLP_NORM else "mixer." + m.group(2)[len("mlp."):]
                k = f"model.layers.{m.group(1)}.{rest}"
            out[k] = t
        return out

    def native_problem(self, cfg: ModelConfig) -> str | None:
        return roundtrip_problem(self, cfg)

    def export_form(self, cfg: ModelConfig) -> ModelConfig:
        return export_form(self, cfg)

    def export_state(self, cfg: ModelConfig, form: ModelConfig, state: dict) -> dict:
        return export_state(cfg, form, state)

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        names = {v: k for k, v in _TYPES.items()}
        out = {"layers_block_type": [names.get(k, k) for k in cfg.layer_kinds()],
               "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "layer_norm_epsilon": cfg.norm_eps,
               "tie_word_embeddings": False, "mlp_hidden_act": "relu2", "mlp_bias": cfg.mlp_bias,
               "mamba_hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0}
        if "mamba2" in opts:
            m = opts["mamba2"]
            heads = m.n_heads or m.expand * cfg.d_model // m.head_dim
            out |= {"mamba_num_heads": heads, "mamba_head_dim": m.head_dim, "ssm_state_size": m.d_state,
                    "n_groups": m.n_groups, "conv_kernel": m.d_conv, "use_conv_bias": m.conv_bias,
                    "use_bias": m.bias, "time_step_limit": list(m.dt_limit), "time_step_min": m.dt_min,
                    "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
                    "expand": max(1, heads * m.head_dim // cfg.d_model)}
            # one layer_norm_epsilon: the gated norm's (export_form rescales the block norms' to it)
            out["layer_norm_epsilon"] = m.norm_eps
        return out
