"""Qwen3_5ForCausalLM (and the text tower of Qwen3_5ForConditionalGeneration) <-> HybridLM.

Qwen3.5's dense text model, as transformers 5.25 computes it (modeling_qwen3_5.py):
- pre-norm blocks, every RMSNorm zero-centred (weight w applied as 1 + w, in fp32;
  q_norm / k_norm too), SwiGLU MLP;
- `layer_types` (default: full_attention every `full_attention_interval` = 4th layer):
  linear_attention -> gdn, full_attention -> attn;
- gdn: Qwen3_5GatedDeltaNet, tensors one to one (hybrid.GDN_NAMES, conv taps flipped),
  linear_num_key_heads / linear_num_value_heads / linear_key_head_dim /
  linear_value_head_dim / linear_conv_kernel_dim, gated norm eps rms_norm_eps;
- attn: gated attention, q_proj packing per head [q_h, gate_h] (gate: elementwise,
  gate_packing: head), per-head zero-centred q/k norm before RoPE, partial rotary
  (partial_rotary_factor, default 0.25: rope_fraction), attention_bias on q, k, v, o.
  Text-only positions make the three M-RoPE sections equal, so mrope_section does not
  change the function.
Refused: hidden_act other than silu (the gdn conv's activation is hidden_act too).
Export: one rms_norm_eps, the GDN gated norm's (no rewrite can change that norm's); a Loom
model with plain norms, other block / q-k norm eps, a separate gate or a tied head is first
rewritten exactly (transforms.py), so recipes/gdn-hybrid*.yaml export to this class.
A Qwen3_5ForConditionalGeneration folder imports its language model (text_config, the
`model.language_model` tensors and the head); the vision tower and the multi-token
prediction (mtp) weights are left out, as Qwen3_5ForCausalLM leaves them.
"""
from __future__ import annotations

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_from_params, rope_to_hf
from loom.trainer.hf.families.base import (ConvertError, Family, attention_names, compact_layers, mlp_names, sizes)
from loom.trainer.hf.families.hybrid import (GDN_NAMES, export_form, export_state, kinds_from_types, map_convs,
                                             need_silu, roundtrip_problem)

MULTIMODAL = "Qwen3_5ForConditionalGeneration"
LINEAR, FULL = "linear_attention", "full_attention"
_SKIP = ("model.visual.", "mtp.", "model.mtp.")


class Qwen3_5(Family):
    model_types = ("qwen3_5_text", "qwen3_5")
    architecture = "Qwen3_5ForCausalLM"
    target = "qwen3_5"
    kinds = ("gdn", "attn")  # the Loom layer kinds the class expresses
    defaults = {"vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "hidden_act": "silu",
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32, "layer_types": None,
                "full_attention_interval": 4, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    LAYER = {"input_layernorm.weight": "mixer_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
             **attention_names(q_norm=True), **mlp_names(),
             **{f"linear_attn.{k}": f"mixer.{v}" for k, v in GDN_NAMES.items()}}

    def check_architecture(self, hf: dict) -> str:
        archs = hf.get("architectures") or []
        accepted = [self.architecture] if hf.get("model_type") == "qwen3_5_text" else [MULTIMODAL]
        if archs and archs != accepted:
            raise ConvertError(f"unsupported architecture {', '.join(archs)} (model_type {hf.get('model_type')!r}); "
                               f"for this model_type loom convert hf imports {accepted[0]}")
        return accepted[0]

    def text_config(self, hf: dict) -> tuple[dict, str | None]:
        if hf.get("model_type") != "qwen3_5":
            return hf, None
        text = dict(hf.get("text_config") or {})
        if "tie_word_embeddings" in hf:
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        return text, (f"{MULTIMODAL}: imported its language model (text_config) only; the vision tower is "
                      f"left out")

    def config_from_hf(self, hf: dict) -> ModelConfig:
        need_silu(self.get(hf, "hidden_act"), "hidden_act")
        n = int(self.need(hf, "num_hidden_layers"))
        every = int(self.get(hf, "full_attention_interval"))
        types = self.get(hf, "layer_types") or [LINEAR if (i + 1) % every else FULL for i in range(n)]
        if len(types) != n:
            raise ConvertError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers {n}")
        kinds = kinds_from_types(types, {LINEAR: "gdn", FULL: "attn"}, "layer_types")
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        params.setdefault("partial_rotary_factor", self.get(hf, "partial_rotary_factor"))
        rope, partial = rope_from_params(params, hf, float(self.get(hf, "rope_theta")))
        eps = float(self.need(hf, "rms_norm_eps"))
        bias = bool(self.get(hf, "attention_bias"))
        mixers = {}
        if "attn" in kinds:
            mixers["attn"] = {"gate": "elementwise", "gate_packing": "head", "qk_norm": True, "qk_norm_eps": eps,
                              "qkv_bias": bias, "out_bias": bias, "rope_fraction": partial}
        if "gdn" in kinds:
            mixers["gdn"] = {"n_v_heads": int(self.get(hf, "linear_num_value_heads")),
                             "n_k_heads": int(self.get(hf, "linear_num_key_heads")),
                             "head_k_dim": int(self.get(hf, "linear_key_head_dim")),
                             "head_v_dim": int(self.get(hf, "linear_value_head_dim")),
                             "conv_size": int(self.get(hf, "linear_conv_kernel_dim")), "norm_eps": eps}
            if mixers["gdn"]["n_v_heads"] % mixers["gdn"]["n_k_heads"]:
                raise ConvertError(f"config.json: linear_num_value_heads ({mixers['gdn']['n_v_heads']}) is not a "
                                   f"multiple of linear_num_key_heads ({mixers['gdn']['n_k_heads']})")
        return ModelConfig(**sizes(self, hf, self.defaults["head_dim"]), layers=compact_layers(kinds),
                           mixers=mixers, tie_embeddings=bool(self.get(hf, "tie_word_embeddings")), norm_eps=eps,
                           rope=rope, norm_zero_centred=True)

    def from_hf(self, name: str) -> str | None:
        if name.startswith(_SKIP):
            return None
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        return super().from_hf(name)

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
        # one rms_norm_eps for every norm: the GDN gated norm's, which no rewrite can change
        # (export_form rescales the block and q/k norms' to it)
        eps = opts["gdn"].norm_eps if "gdn" in opts else cfg.norm_eps
        out = {"model_type": "qwen3_5_text", "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
               "rms_norm_eps": eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
               "layer_types": [FULL if k == "attn" else LINEAR if k == "gdn" else k for k in kinds],
               "attention_dropout": 0.0}
        rope = rope_to_hf(cfg.rope)
        if "attn" in opts:
            a = opts["attn"]
            rope["partial_rotary_factor"] = a.rope_fraction
            out["attention_bias"] = a.qkv_bias
        out["rope_parameters"] = rope
        if "gdn" in opts:
            g = opts["gdn"]
            hv = g.n_v_heads or cfg.n_heads
            head = cfg.head_dim or cfg.d_model // cfg.n_heads
            out |= {"linear_num_value_heads": hv, "linear_num_key_heads": g.n_k_heads or hv,
                    "linear_key_head_dim": g.head_k_dim or head, "linear_value_head_dim": g.head_v_dim or head,
                    "linear_conv_kernel_dim": g.conv_size}
        return out
