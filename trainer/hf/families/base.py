"""The shape every family adapter has, and what the attention families share.

A family adapter (one file per transformers family, torchtitan's state_dict_adapter
habit) holds both directions of one mapping, derived from the config class's fields:

    config_from_hf(hf)   config.json -> ModelConfig; ConvertError (one line, naming the
                         field) for any value HybridLM cannot compute exactly
    from_hf(name)        a checkpoint tensor name -> the HybridLM name (None: not imported)
    native_problem(cfg)  why a ModelConfig is not expressible in the family's class, or None
    hf_config(cfg)       the family's config.json fields for a ModelConfig it expresses
    to_hf(name)          a HybridLM tensor name -> the checkpoint name
    tensors_from_hf / tensors_to_hf   tensor rewrites around the renaming (the hybrid
                         families: conv tap order, q/k/v merges); identity by default
    export_form / export_state   the equivalent model (config, tensors) the export writes, in
                         the class's conventions (the hybrid families: transforms.py); identity
                         by default

Layer names: HF `model.layers.{i}.<suffix>` <-> Loom `blocks.{i}.<suffix>`, one table
per family (`LAYER`: hf suffix -> loom suffix), read in both directions.

Sliding windows: transformers' `sliding_window` N lets a query see itself and the
N - 1 tokens before it (masking_utils.sliding_window_overlay: kv > q - N), Loom's swa
`window` counts the tokens behind the query: window = N - 1.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.models.rope import RopeConfig
from loom.trainer.hf.common import ConvertError, rope_from_params, rope_to_hf

SLIDING, FULL = "sliding_attention", "full_attention"
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_SKIP = re.compile(r".*rotary_emb\..*inv_freq")  # non-persistent RoPE buffers of old checkpoints
ROPE_FIELDS = {"none": [], "linear": ["factor"], "ntk": ["factor"],
               "yarn": ["factor", "original_max_len", "beta_fast", "beta_slow"],
               "llama3": ["factor", "original_max_len", "low_freq_factor", "high_freq_factor"]}


class Family(ABC):
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values handled
    architecture: ClassVar[str] = ""  # the *ForCausalLM class (import and native export)
    target: ClassVar[str] = ""  # `loom convert to-hf --target` name
    defaults: ClassVar[dict[str, Any]] = {}  # the config class's values for keys config.json omits
    LAYER: ClassVar[dict[str, str]] = {}  # hf suffix under model.layers.{i}. -> loom suffix under blocks.{i}.

    # ----- config.json -> Loom -----
    def get(self, hf: dict, key: str):
        """hf[key] when present (an explicit null included), else the config class's default."""
        return hf[key] if key in hf else self.defaults.get(key)

    def need(self, hf: dict, key: str):
        value = self.get(hf, key)
        if value is None:
            raise ConvertError(f"config.json: missing {key!r}")
        return value

    def check_architecture(self, hf: dict) -> str:
        archs = hf.get("architectures") or []
        if archs and archs != [self.architecture]:
            raise ConvertError(f"unsupported architecture {', '.join(archs)} (model_type {hf.get('model_type')!r}); "
                               f"for this model_type loom convert hf imports {self.architecture}")
        return self.architecture

    def text_config(self, hf: dict) -> tuple[dict, str | None]:
        """(the language model's config, a note for the user or None); multimodal families override."""
        return hf, None

    @abstractmethod
    def config_from_hf(self, hf: dict) -> ModelConfig:
        """The ModelConfig of a (text) config.json; ConvertError naming a field Loom cannot express."""

    def from_hf(self, name: str) -> str | None:
        if _SKIP.fullmatch(name):
            return None
        if name in _TOP:
            return _TOP[name]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and m.group(2) in self.LAYER:
            return f"blocks.{m.group(1)}.{self.LAYER[m.group(2)]}"
        raise ConvertError(f"unexpected tensor {name!r} in the checkpoint (no HybridLM equivalent in "
                           f"{self.architecture})")

    def tensors_from_hf(self, state: dict) -> dict:
        """Checkpoint-named tensors rewritten before renaming (merges, splits, conv tap order);
        the default keeps them."""
        return state

    def tensors_to_hf(self, state: dict) -> dict:
        """The inverse of tensors_from_hf, after to_hf renamed a HybridLM state dict."""
        return state

    # ----- Loom -> config.json -----
    def to_hf(self, name: str) -> str:
        top = {v: k for k, v in _TOP.items()}
        if name in top:
            return top[name]
        back = {v: k for k, v in self.LAYER.items()}
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m and m.group(2) in back:
            return f"model.layers.{m.group(1)}.{back[m.group(2)]}"
        raise ConvertError(f"tensor {name!r} has no {self.architecture} equivalent")

    @abstractmethod
    def native_problem(self, cfg: ModelConfig) -> str | None:
        """Why `cfg` cannot be exported as this family's class (one line naming the option), or None."""

    @abstractmethod
    def hf_config(self, cfg: ModelConfig) -> dict:
        """The config.json of this family's class for an expressible `cfg`."""

    def export_form(self, cfg: ModelConfig) -> ModelConfig:
        """The model the export writes for `cfg`: an equivalent one in the class's conventions
        (the hybrid families rewrite exactly: hybrid.export_form); `cfg` itself by default."""
        return cfg

    def export_state(self, cfg: ModelConfig, form: ModelConfig, state: dict) -> dict:
        """cfg's HybridLM state dict as export_form's model's (the same function); `state` by default."""
        return state


# ----- helpers the attention families share -----

def llama_layer_names(q_norm: bool) -> dict[str, str]:
    """The pre-norm Llama layout (Qwen3, Mistral), with Qwen3's per-head q/k norms."""
    names = {"input_layernorm.weight": "mixer_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight"}
    names |= attention_names(q_norm) | mlp_names()
    return names


def attention_names(q_norm: bool) -> dict[str, str]:
    names = {f"self_attn.{p}_proj.{t}": f"mixer.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")}
    if q_norm:
        names |= {"self_attn.q_norm.weight": "mixer.q_norm.weight", "self_attn.k_norm.weight": "mixer.k_norm.weight"}
    return names


def mlp_names() -> dict[str, str]:
    return {f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}  # Loom mlp_kind -> transformers activation


def mlp_kind_from_hf(act: str, field: str) -> str:
    """The gated MLP of a transformers activation name (ACT2FN: gelu_pytorch_tanh is
    F.gelu(approximate="tanh") and gelu_new the same tanh formula written out; silu and
    swish F.silu)."""
    kinds = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
    if act not in kinds:
        raise ConvertError(f"config.json: {field} {act!r} is not supported (HybridLM's gated MLPs use silu or "
                           f"gelu_pytorch_tanh)")
    return kinds[act]


def sizes(fam: Family, hf: dict, head_dim_default: int | None) -> dict:
    """vocab, widths and heads. head_dim_default None: hidden_size // num_attention_heads."""
    d_model = int(fam.need(hf, "hidden_size"))
    n_heads = int(fam.need(hf, "num_attention_heads"))
    n_kv = fam.get(hf, "num_key_value_heads") or n_heads
    if n_heads % int(n_kv):
        raise ConvertError(f"config.json: num_attention_heads ({n_heads}) is not a multiple of "
                           f"num_key_value_heads ({n_kv})")
    head_dim = hf.get("head_dim") or head_dim_default or d_model // n_heads
    return dict(vocab_size=int(fam.need(hf, "vocab_size")), d_model=d_model, n_heads=n_heads,
                n_kv_heads=int(n_kv), head_dim=int(head_dim), mlp_hidden=int(fam.need(hf, "intermediate_size")))


def layer_kinds(types: list[str], sliding_window: int | None, n_layers: int) -> tuple[list[str], int | None]:
    """HF layer_types -> (Loom kinds per layer, swa window or None)."""
    if len(types) != n_layers:
        raise ConvertError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers {n_layers}")
    bad = [(i, t) for i, t in enumerate(types) if t not in (SLIDING, FULL)]
    if bad:
        raise ConvertError(f"config.json: layer_types[{bad[0][0]}] is {bad[0][1]!r} (supported: {SLIDING}, {FULL})")
    if SLIDING in types:
        if sliding_window is None:
            raise ConvertError("config.json: layer_types has sliding_attention layers but sliding_window is null "
                               "(transformers cannot build their mask either)")
        if int(sliding_window) < 1:
            raise ConvertError(f"config.json: sliding_window {sliding_window} must be >= 1")
    window = int(sliding_window) - 1 if SLIDING in types else None
    return ["swa" if t == SLIDING else "attn" for t in types], window


def compact_layers(kinds: list[str]) -> list:
    """[a, b, a, b] -> [[a, b], "x2"]; the shortest repeating unit, else the list itself."""
    n = len(kinds)
    for p in range(1, n):
        if n % p == 0 and kinds == kinds[:p] * (n // p):
            return [kinds[0], f"x{n}"] if p == 1 else [kinds[:p], f"x{n // p}"]
    return list(kinds)


def rope_dict(rope: RopeConfig) -> dict:
    """A RopeConfig as the plain mapping a recipe holds (only the fields its scaling uses)."""
    return {"base": rope.base, "scaling": rope.scaling, **{k: getattr(rope, k) for k in ROPE_FIELDS[rope.scaling]}}


def full_rope(hf: dict, params: dict, theta: float, field: str) -> RopeConfig:
    """RopeConfig of one layer type's parameters, refusing partial rotary (not in these families)."""
    rope, partial = rope_from_params(params, hf, theta)
    if partial != 1.0:
        raise ConvertError(f"config.json: {field} partial_rotary_factor {partial} is not supported by this family")
    return rope


def rope_per_layer_type(hf: dict, full_theta: float, sliding_theta: float) -> tuple[RopeConfig, RopeConfig]:
    """(full, sliding) RoPE of a config whose rope_parameters may be per layer type
    (Gemma 3, OLMo 3), as their config classes resolve them: transformers 4 keys
    `rope_scaling` apply to the full-attention layers only."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) or v is None for v in params.values()):
        unknown = [k for k in params if k not in (FULL, SLIDING)]
        if unknown:
            raise ConvertError(f"config.json: rope_parameters has a layer type {unknown[0]!r}")
        full = full_rope(hf, params.get(FULL) or {}, full_theta, f"rope_parameters.{FULL}")
        sliding = full_rope(hf, params.get(SLIDING) or {}, sliding_theta, f"rope_parameters.{SLIDING}")
        return full, sliding
    if params:
        raise ConvertError("config.json: rope_parameters must be given per layer type "
                           f"({FULL!r}, {SLIDING!r}) for this family")
    full = full_rope(hf, hf.get("rope_scaling") or {}, full_theta, "rope_scaling")
    sliding = full_rope(hf, {}, sliding_theta, "rope_parameters")
    return full, sliding


def attention_config(fam: Family, hf: dict, *, head_dim_default: int | None, types: list[str],
                     sliding_window: int | None, attn: dict, rope: RopeConfig,
                     sliding_rope: RopeConfig | None = None, **model: Any) -> ModelConfig:
    """The ModelConfig of an attention-only family: sizes, layer kinds from layer_types,
    the same options on attn and swa (swa adds its window and, when it differs, its RoPE)."""
    n_layers = int(fam.need(hf, "num_hidden_layers"))
    kinds, window = layer_kinds(types, sliding_window, n_layers)
    mixers = {}
    if "attn" in kinds and attn:
        mixers["attn"] = dict(attn)
    if "swa" in kinds:
        mixers["swa"] = {**attn, "window": window}
        if sliding_rope is not None and (sliding_rope != rope or "attn" not in kinds):
            mixers["swa"]["rope_config"] = rope_dict(sliding_rope)
    return ModelConfig(**sizes(fam, hf, head_dim_default), layers=compact_layers(kinds), mixers=mixers,
                       tie_embeddings=bool(fam.get(hf, "tie_word_embeddings")),
                       norm_eps=float(fam.need(hf, "rms_norm_eps")), rope=rope, **model)


# ----- Loom -> HF: what an attention family's class can express -----

def attention_problem(cfg: ModelConfig, name: str, expect: dict, model: dict,
                      swa_rope: bool = False) -> tuple[str | None, dict]:
    """(why cfg is not `name`, or None; the attention options). `expect`: mixer option ->
    required value (a callable(value) -> bool also accepted); `model`: ModelConfig field ->
    required value. swa_rope: the class gives sliding layers their own RoPE."""
    kinds = cfg.layer_kinds()
    other = [(i, k) for i, k in enumerate(kinds) if k not in ("attn", "swa")]
    if other:
        return f"layer {other[0][0]} is {other[0][1]!r}; {name} has attention and sliding-window layers only", {}
    for key, want in model.items():
        have = getattr(cfg, key)
        ok = want(have) if callable(want) else have == want
        if not ok:
            return f"model.{key} is {have!r}; {name} needs {want if not callable(want) else 'another value'}", {}
    opts = mixer_options(cfg)
    common = {"gate": "none", "moh": False, "conv_size": lambda v: v <= 1, "rope": True, "rope_fraction": 1.0}
    for kind in dict.fromkeys(kinds):
        o = opts[kind]
        for key, want in {**common, **expect}.items():
            have = getattr(o, key)
            ok = want(have) if callable(want) else have == want
            if not ok:
                return f"model.mixers.{kind}.{key} is {have!r}; {name} cannot express it", {}
        if o.rope_config is not None and not (kind == "swa" and swa_rope) and o.rope_config != cfg.rope:
            return f"model.mixers.{kind}.rope_config is set; {name} has one RoPE for these layers", {}
    if "attn" in opts and "swa" in opts:
        a, s = opts["attn"], opts["swa"]
        for f in ("qkv_bias", "out_bias", "qk_norm", "qk_norm_width", "qk_norm_eps", "scale"):
            if getattr(a, f) != getattr(s, f):
                return f"model.mixers.attn.{f} and model.mixers.swa.{f} differ; {name} has one value for both", {}
    if cfg.rope.scaling == "ntk":
        return "model.rope.scaling is 'ntk' (static); transformers' NTK scaling ('dynamic') changes with length", {}
    return None, opts


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    return [SLIDING if k == "swa" else FULL for k in cfg.layer_kinds()]


def sliding_window_to_hf(opts: dict) -> int | None:
    return opts["swa"].window + 1 if "swa" in opts else None


def first_opts(opts: dict):
    return opts.get("attn") or opts["swa"]


def common_hf(cfg: ModelConfig) -> dict:
    """config.json fields every attention family shares."""
    return {"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
            "rope_parameters": rope_to_hf(cfg.rope)}

