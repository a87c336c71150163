"""OlmoHybridForCausalLM <-> HybridLM.

OLMo-hybrid, as transformers 5.25 computes it (modeling_olmo_hybrid.py):
- `layer_types` (default: full_attention every 4th layer, and the last one if none is):
  linear_attention -> gdn, full_attention -> attn;
- attention layers are OLMo 3's post-norm blocks (x + norm(attn(x)), x + norm(mlp(x)):
  post_attention_layernorm -> mixer_post_norm, post_feedforward_layernorm ->
  mlp_post_norm), q and k normalised over the whole projection (qk_norm_width full)
  before RoPE; attention_bias biases q, k, v and o;
- GDN layers are pre-norm (input_layernorm -> mixer_norm, post_attention_layernorm ->
  mlp_norm): model.norm_placements {gdn: pre} beside norm_placement post;
- every RMSNorm multiplies by its weight in fp32 (norm_weight_fp32);
- gdn: OlmoHybridGatedDeltaNet, q/k/v_proj concatenated into in_proj_qkv (split back on
  export), g_proj -> in_proj_z, a_proj, b_proj, o_norm (eps 1e-5) -> norm, o_proj ->
  out_proj, conv taps flipped; linear_allow_neg_eigval: beta = 2 sigmoid (beta: sigmoid2);
- RoPE on the attention layers from rope_parameters; a rope_theta of null (the released
  checkpoints) is NoPE (attn rope: false).
Refused: hidden_act other than silu (the GDN conv's activation), partial rotary.
"""
from __future__ import annotations

import re

import torch

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_from_params, rope_to_hf
from loom.trainer.hf.families.base import ConvertError, Family, attention_names, compact_layers, mlp_names, sizes
from loom.trainer.hf.families.hybrid import (export_form, export_state, kinds_from_types, map_convs, need_silu,
                                             roundtrip_problem)

LINEAR, FULL = "linear_attention", "full_attention"
_GDN_PRE_MLP = "gdn_pre_mlp_layernorm.weight"  # a GDN layer's post_attention_layernorm (it precedes the MLP)
_GDN = {"linear_attn.in_proj_qkv.weight": "mixer.in_proj_qkv.weight", "linear_attn.g_proj.weight": "mixer.in_proj_z.weight",
        "linear_attn.a_proj.weight": "mixer.in_proj_a.weight", "linear_attn.b_proj.weight": "mixer.in_proj_b.weight",
        "linear_attn.conv1d.weight": "mixer.conv1d.weight", "linear_attn.dt_bias": "mixer.dt_bias",
        "linear_attn.A_log": "mixer.A_log", "linear_attn.o_norm.weight": "mixer.norm.weight",
        "linear_attn.o_proj.weight": "mixer.out_proj.weight"}


def _module_names(state: dict) -> dict:
    """The checkpoint layout (transformers' conversion_mapping for olmo_hybrid, which
    save_pretrained writes back): attention_layer_norm = input_layernorm,
    feedforward_layer_norm = post_attention_layernorm, and the GDN conv as q/k/v_conv1d
    (concatenated along the channels) -> the module names."""
    out = {}
    for k, t in state.items():
        k = k.replace(".attention_layer_norm.", ".input_layernorm.").replace(
            ".feedforward_layer_norm.", ".post_attention_layernorm.")
        m = re.fullmatch(r"(model\.layers\.\d+\.linear_attn\.)([qkv])_conv1d\.weight", k)
        if m:
            if m.group(2) != "q":
                continue
            parts = [state.get(f"{m.group(1)}{p}_conv1d.weight") for p in "qkv"]
            if any(p is None for p in parts):
                raise ConvertError(f"checkpoint lacks one of {m.group(1)}q/k/v_conv1d.weight")
            k, t = f"{m.group(1)}conv1d.weight", torch.cat(parts)
        out[k] = t
    return out


def _disk_names(state: dict) -> dict:
    """The inverse of _module_names: the layout save_pretrained writes."""
    out = {}
    for k, t in state.items():
        k = k.replace(".input_layernorm.", ".attention_layer_norm.").replace(
            ".post_attention_layernorm.", ".feedforward_layer_norm.")
        m = re.fullmatch(r"(model\.layers\.\d+\.linear_attn\.)conv1d\.weight", k)
        if m:
            key = state[f"{m.group(1)}q_proj.weight"].shape[0]
            value = state[f"{m.group(1)}v_proj.weight"].shape[0]
            for p, part in zip("qkv", t.split([key, key, value])):
                out[f"{m.group(1)}{p}_conv1d.weight"] = part.contiguous()
            continue
        out[k] = t
    return out


class OlmoHybrid(Family):
    model_types = ("olmo_hybrid",)
    architecture = "OlmoHybridForCausalLM"
    target = "olmo_hybrid"
    kinds = ("gdn", "attn")  # the Loom layer kinds the class expresses
    defaults = {"vocab_size": 100352, "hidden_size": 3840, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 30, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "attention_bias": False, "layer_types": None, "linear_conv_kernel_dim": 4,
                "linear_allow_neg_eigval": True, "rope_theta": 10000.0}
    LAYER = {"post_attention_layernorm.weight": "mixer_post_norm.weight",
             "post_feedforward_layernorm.weight": "mlp_post_norm.weight", "input_layernorm.weight": "mixer_norm.weight",
             _GDN_PRE_MLP: "mlp_norm.weight", **attention_names(q_norm=True), **mlp_names(), **_GDN}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        need_silu(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        types = self.get(hf, "layer_types")
        if not types:
            types = [FULL if i % 4 == 3 else LINEAR for i in range(n)]
            if FULL not in types:
                types[-1] = FULL
        if len(types) != n:
            raise ConvertError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers {n}")
        kinds = kinds_from_types(types, {LINEAR: "gdn", FULL: "attn"}, "layer_types")
        s = sizes(self, hf, None)
        heads = s["n_heads"]
        hk = int(hf.get("linear_num_key_heads") or heads)
        hv = int(hf.get("linear_num_value_heads") or heads)
        k_dim = int(hf.get("linear_key_head_dim") or int(0.75 * s["d_model"] / hk))
        v_dim = int(hf.get("linear_value_head_dim") or 2 * k_dim)
        if hv % hk:
            raise ConvertError(f"config.json: linear_num_value_heads ({hv}) is not a multiple of "
                               f"linear_num_key_heads ({hk})")
        params = hf.get("rope_parameters")
        nope = (isinstance(params, dict) and "rope_theta" in params and params["rope_theta"] is None) or (
            not params and "rope_theta" in hf and hf["rope_theta"] is None)
        eps = float(self.need(hf, "rms_norm_eps"))
        bias = bool(self.get(hf, "attention_bias"))
        attn = {"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": eps, "qkv_bias": bias, "out_bias": bias}
        rope_kw = {}
        if nope:
            attn["rope"] = False
        else:
            rope, partial = rope_from_params(params or hf.get("rope_scaling") or {}, hf,
                                             float(hf.get("rope_theta") or self.defaults["rope_theta"]))
            if partial != 1.0:
                raise ConvertError(f"config.json: partial_rotary_factor {partial} is not supported by "
                                   f"{self.architecture}")
            rope_kw["rope"] = rope
        mixers = {}
        if "attn" in kinds:
            mixers["attn"] = attn
        if "gdn" in kinds:
            mixers["gdn"] = {"n_v_heads": hv, "n_k_heads": hk, "head_k_dim": k_dim, "head_v_dim": v_dim,
                             "conv_size": int(self.get(hf, "linear_conv_kernel_dim")), "norm_eps": 1e-5,
                             "beta": "sigmoid2" if self.get(hf, "linear_allow_neg_eigval") else "sigmoid"}
        return ModelConfig(**s, layers=compact_layers(kinds), mixers=mixers,
                           tie_embeddings=bool(self.get(hf, "tie_word_embeddings")), norm_eps=eps,
                           norm_placement="post", norm_placements={"gdn": "pre"} if "gdn" in kinds else {},
                           norm_weight_fp32=True, **rope_kw)

    def tensors_from_hf(self, state: dict) -> dict:
        state = _module_names(state)
        gdn_layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.linear_attn\.", k))}
        out = {}
        for k, t in state.items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
            if m and int(m.group(1)) in gdn_layers:
                i, rest = m.groups()
                if rest == "post_attention_layernorm.weight":
                    k = f"model.layers.{i}.{_GDN_PRE_MLP}"
                elif rest in ("linear_attn.k_proj.weight", "linear_attn.v_proj.weight"):
                    continue
                elif rest == "linear_attn.q_proj.weight":
                    parts = [state.get(f"model.layers.{i}.linear_attn.{p}_proj.weight") for p in "qkv"]
                    if any(p is None for p in parts):
                        raise ConvertError(f"checkpoint lacks one of layer {i}'s linear_attn q/k/v_proj tensors")
                    k, t = f"model.layers.{i}.linear_attn.in_proj_qkv.weight", torch.cat(parts)
            out[k] = t
        return map_convs(out, to_loom=True)

    def tensors_to_hf(self, state: dict) -> dict:
        out = {}
        for k, t in map_convs(state, to_loom=False).items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
            if m and m.group(2) == _GDN_PRE_MLP:
                out[f"model.layers.{m.group(1)}.post_attention_layernorm.weight"] = t
            elif m and m.group(2) == "linear_attn.in_proj_qkv.weight":
                i = m.group(1)
                value = state[f"model.layers.{i}.linear_attn.g_proj.weight"].shape[0]  # HV V rows, as in_proj_z
                key = (t.shape[0] - value) // 2
                for p, part in zip("qkv", t.split([key, key, value])):
                    out[f"model.layers.{i}.linear_attn.{p}_proj.weight"] = part.contiguous()
            else:
                out[k] = t
        return _disk_names(out)

    def native_problem(self, cfg: ModelConfig) -> str | None:
        return roundtrip_problem(self, cfg)

    def export_form(self, cfg: ModelConfig) -> ModelConfig:
        return export_form(self, cfg)

    def export_state(self, cfg: ModelConfig, form: ModelConfig, state: dict) -> dict:
        return export_state(cfg, form, state)

    def hf_config(self, cfg: ModelConfig) -> dict:
        opts = mixer_options(cfg)
        out = {"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
               "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
               "pad_token_id": None, "eos_token_id": None,  # the class's defaults are OLMo's vocabulary ids
               "layer_types": [FULL if k == "attn" else LINEAR if k == "gdn" else k for k in cfg.layer_kinds()]}
        if "attn" in opts:
            out["attention_bias"] = opts["attn"].qkv_bias
            out["rope_parameters"] = rope_to_hf(cfg.rope) if opts["attn"].rope else {"rope_type": "default",
                                                                                     "rope_theta": None}
        if "gdn" in opts:
            g = opts["gdn"]
            hv = g.n_v_heads or cfg.n_heads
            head = cfg.head_dim or cfg.d_model // cfg.n_heads
            out |= {"linear_num_value_heads": hv, "linear_num_key_heads": g.n_k_heads or hv,
                    "linear_key_head_dim": g.head_k_dim or head, "linear_value_head_dim": g.head_v_dim or head,
                    "linear_conv_kernel_dim": g.conv_size, "linear_allow_neg_eigval": g.beta == "sigmoid2"}
        return out
