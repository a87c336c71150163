"""What the hybrid families (Qwen3.5, OLMo-hybrid, Nemotron-H, Bamba) share.

- Conv tap order: transformers' depthwise conv1d.weight is (C, 1, W) with tap W-1-j
  multiplying x_{t-j}; Loom's gdn / mamba2 conv1d.weight is (C, W) with tap j multiplying
  x_{t-j}: ours = theirs[:, 0].flip(-1) (conv_from_hf / conv_to_hf, both directions).
- The GDN and Mamba-2 layers' tensors map one to one onto the mixers' (GDN_NAMES,
  MAMBA2_NAMES; tests/models/test_gdn_parity.py and test_mamba2_parity.py use the same
  tables and conv mapping).
- Export check by round trip (roundtrip_problem): a ModelConfig is expressible in a
  family's class when importing the config.json that hf_config writes for it gives back
  the same model (every field, every used mixer option that changes the function),
  so a new option of a mixer is refused until the family maps it. The model compared is
  export_form's: the model rewritten exactly into the class's conventions (transforms.py:
  zero-centred norms, an untied head, norm eps, gate packing, NoPE heads), so only a
  difference no exact rewrite removes is refused.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from loom.models import ModelConfig
from loom.models.blocks import MLP_ONLY
from loom.models.model import mixer_options
from loom.trainer.hf.common import ConvertError
from loom.trainer.hf.families.transforms import class_form, class_state

# transformers suffix under the layer's mixer module -> Loom suffix under blocks.{i}.mixer.
GDN_NAMES = {f"{p}.weight": f"{p}.weight" for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                                                     "conv1d", "norm", "out_proj")} | {
    "dt_bias": "dt_bias", "A_log": "A_log"}
MAMBA2_NAMES = {"in_proj.weight": "in_proj.weight", "in_proj.bias": "in_proj.bias", "conv1d.weight": "conv1d.weight",
                "conv1d.bias": "conv1d.bias", "dt_bias": "dt_bias", "A_log": "A_log", "D": "D",
                "norm.weight": "norm.weight", "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"}
# options that only set initialisation or the CPU kernel's blocking, not the function computed
_NOT_FUNCTION = {"chunk", "impl", "dt_min", "dt_max", "dt_init_floor", "A_init_range"}
_MODEL_FIELDS = ("d_model", "n_heads", "n_kv_heads", "head_dim", "tie_embeddings", "norm_eps", "norm_zero_centred",
                 "norm_weight_fp32", "mlp_kind", "mlp_bias", "embed_scale", "logit_softcap")


def conv_from_hf(t: torch.Tensor) -> torch.Tensor:
    """transformers' (C, 1, W) oldest-tap-first conv weight -> Loom's (C, W) newest-first."""
    return t[:, 0].flip(-1).contiguous()


def conv_to_hf(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1)[:, None, :].contiguous()


def map_convs(state: dict, to_loom: bool) -> dict:
    """Every `...conv1d.weight` of the mixers in a checkpoint-named state dict, in the other tap order."""
    f = conv_from_hf if to_loom else conv_to_hf
    return {k: f(t) if k.endswith("conv1d.weight") and t.dim() == (3 if to_loom else 2) else t
            for k, t in state.items()}


def layer_index(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def kinds_from_types(types: list, table: dict[str, str], field: str, refuse: dict[str, str] | None = None) -> list[str]:
    """HF layer type names -> Loom kinds; a type outside `table` refused in one line naming the layer."""
    kinds = []
    for i, t in enumerate(types):
        if refuse and t in refuse:
            raise ConvertError(f"config.json: {field}[{i}] is {t!r} (layer {i}): {refuse[t]}")
        if t not in table:
            raise ConvertError(f"config.json: {field}[{i}] is {t!r} (supported: {', '.join(table)})")
        kinds.append(table[t])
    return kinds


def dt_limit(value) -> list[float]:
    """time_step_limit as config.json holds it: null, or two numbers, transformers writing
    infinity as {"__float__": "Infinity"}."""
    if value is None:
        return [0.0, float("inf")]
    out = [float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v) for v in value]
    if len(out) != 2:
        raise ConvertError(f"config.json: time_step_limit {value!r} must be two numbers")
    return out


def check_groups(heads: int, groups: int, heads_field: str, groups_field: str) -> None:
    if groups < 1 or heads % groups:
        raise ConvertError(f"config.json: {groups_field} ({groups}) must divide {heads_field} ({heads})")


def need_silu(value, field: str) -> None:
    if value not in ("silu", "swish"):
        raise ConvertError(f"config.json: {field} {value!r} is not supported (the conv of Loom's gdn / mamba2 "
                           f"mixers is followed by SiLU)")


def _function_options(kind: str, opts, cfg: ModelConfig) -> dict:
    """The options that change the function, sizes left at 0 ("the model's") filled in."""
    o = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _NOT_FUNCTION}
    if kind == "gdn":
        o["n_v_heads"] = o["n_v_heads"] or cfg.n_heads
        o["n_k_heads"] = o["n_k_heads"] or o["n_v_heads"]
        o["head_k_dim"] = o["head_k_dim"] or cfg.head_dim
        o["head_v_dim"] = o["head_v_dim"] or cfg.head_dim
    if kind == "mamba2":
        o["n_heads"] = o["n_heads"] or o["expand"] * cfg.d_model // o["head_dim"]
        o.pop("expand")  # the inner width is n_heads * head_dim
    return o


def _class_import(fam, cfg: ModelConfig) -> ModelConfig:
    """The model that importing the config.json fam.hf_config writes for cfg gives."""
    hf = {"model_type": fam.model_types[0], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": len(cfg.layer_kinds()),
          "num_attention_heads": cfg.n_heads, **fam.hf_config(cfg)}
    return fam.config_from_hf(hf).resolved()


def export_form(fam, cfg: ModelConfig) -> ModelConfig:
    """cfg rewritten exactly into fam's class's conventions (transforms.class_form); cfg
    itself when the class cannot even write its config.json."""
    cfg = cfg.resolved()
    try:
        return class_form(cfg, _class_import(fam, cfg))
    except (ConvertError, KeyError, ValueError):
        return cfg


def export_state(cfg: ModelConfig, form: ModelConfig, state: dict) -> dict:
    """A HybridLM state dict of cfg -> the same function's tensors in export_form's model."""
    return class_state(cfg, form, state)


def roundtrip_problem(fam, cfg: ModelConfig) -> str | None:
    """Why `cfg` is not `fam`'s class: the first field the class's config.json cannot carry
    once the model is rewritten into the class's conventions (export_form)."""
    name = fam.architecture
    other = [(i, k) for i, k in enumerate(cfg.layer_kinds()) if k not in fam.kinds]
    if other:
        return f"layer {other[0][0]} is {other[0][1]!r}; {name} has {', '.join(fam.kinds)} layers only"
    try:
        cfg = export_form(fam, cfg)
        back = _class_import(fam, cfg)
    except (ConvertError, KeyError, ValueError) as e:
        return f"{name} cannot express this model ({str(e).splitlines()[0]})"
    kinds, kinds2 = cfg.layer_kinds(), back.layer_kinds()
    if kinds != kinds2:
        i = next((i for i, (a, b) in enumerate(zip(kinds, kinds2)) if a != b), min(len(kinds), len(kinds2)))
        have = kinds[i] if i < len(kinds) else None
        return f"layer {i} is {have!r}; {name} has layers of kinds {sorted(set(kinds2))} only in this layout"
    for key in _MODEL_FIELDS:
        if getattr(cfg, key) != getattr(back, key):
            return f"model.{key} is {getattr(cfg, key)!r}; {name} needs {getattr(back, key)!r}"
    mixers = [k for k in dict.fromkeys(kinds) if k != MLP_ONLY]
    has_mlp = cfg.block_mlp and mixers or MLP_ONLY in kinds
    if has_mlp and cfg.mlp_hidden != back.mlp_hidden:
        return f"model.mlp_hidden is {cfg.mlp_hidden}; {name} needs {back.mlp_hidden}"
    if any(k != MLP_ONLY for k in kinds) and cfg.block_mlp != back.block_mlp:
        return f"model.block_mlp is {cfg.block_mlp!r}; {name} needs {back.block_mlp!r}"
    for kind in dict.fromkeys(kinds):
        a, b = (c.norm_placements.get(kind, c.norm_placement) for c in (cfg, back))
        if a != b:
            return f"the norm placement of {kind!r} layers is {a!r}; {name} needs {b!r}"
    opts, opts2 = mixer_options(cfg), mixer_options(back)
    for kind in mixers:
        o, o2 = _function_options(kind, opts[kind], cfg), _function_options(kind, opts2[kind], back)
        for key in o:
            if o[key] != o2[key]:
                return f"model.mixers.{kind}.{key} is {o[key]!r}; {name} needs {o2[key]!r}"
    uses_model_rope = any(getattr(opts[k], "rope", False) and getattr(opts[k], "rope_config", None) is None
                          for k in mixers)
    if uses_model_rope and cfg.rope != back.rope:
        return f"model.rope is {cfg.rope}; {name} cannot express it"
    return None
