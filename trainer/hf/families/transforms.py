"""Exact rewrites of a HybridLM into the conventions of a transformers class.

A Loom model that a class cannot store as it is may still compute a function the
class can. The export then writes an equivalent HybridLM (the same logits in exact
arithmetic; fp32 rounding aside) whose config.json the class reads: `class_form`
moves each field below to the value the class has (`want`: the class's import of the
config.json written for the model), and `class_state` rewrites the tensors with it.
Shapes: H query heads, G key/value heads, K head dim, W gate width per head, D d_model.

  norm_zero_centred   weights stored as w (applied w) <-> stored w - 1 (applied 1 + w): every
                      RMSNorm that follows the model's NormStyle (block, final and q/k norms;
                      the GDN / Mamba-2 gated norms are their own) shifted by one
  norm_weight_fp32    no tensor: the weight multiplies after or before rounding to the compute
                      dtype (the same in fp32; bf16 / fp16 round once differently)
  tie_embeddings      True -> False: lm_head.weight is a copy of embed.weight
  norm_eps            the block / final norms' eps: the residual stream scaled by
                      c = sqrt(eps' / eps) (embedding and every sublayer's output projection
                      times c, the head untied first), since RMSNorm(c x; eps') = RMSNorm(x; eps)
                      and in pre-norm blocks every reader of the stream is such a norm
                      (pre-norm attn / gdn / mamba2 / mlp layouts only)
  mixers.attn.qk_norm_eps    the q and k rows of the projections times sqrt(eps' / eps)
  mixers.attn.gate_packing   q_proj / gate_proj rows regrouped (separate, head, group)
  mixers.attn.rope false -> a class that always rotates the first fraction f of each head
                      (Bamba: f = 1/2): heads widened to K' = K / (1 - f) with the rotated
                      dims' q / k / v weights zero (a rotated zero is zero) and q times
                      sqrt(K' / K) for the wider head's scale; o_proj reads the last K dims
Exact in fp32 (Loom checkpoints hold fp32 master weights; a half-precision source rounds the
rescaled tensors once more in its dtype).
Whatever still differs is a real difference: roundtrip_problem (hybrid.py) names it.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from loom.models import HybridLM, ModelConfig
from loom.models.blocks import MLP_ONLY
from loom.models.model import mixer_options
from loom.models.norms import RMSNorm
from loom.models.rope import RopeConfig

# the tensors that write into the residual stream, per layer kind (under blocks.{i}.)
_WRITERS = {"attn": ("mixer.o_proj",), "gdn": ("mixer.out_proj",), "mamba2": ("mixer.out_proj",), MLP_ONLY: ()}


def class_form(cfg: ModelConfig, want: ModelConfig) -> ModelConfig:
    """cfg with every field that an exact rewrite reaches set to want's value."""
    cfg = cfg.resolved()
    fields, mixers = {}, {k: dict(v) for k, v in cfg.mixers.items()}
    for key in ("norm_zero_centred", "norm_weight_fp32"):
        if getattr(cfg, key) != getattr(want, key):
            fields[key] = getattr(want, key)
    if cfg.tie_embeddings and not want.tie_embeddings:
        fields["tie_embeddings"] = False
    if cfg.norm_eps != want.norm_eps and _residual_scalable(cfg):
        fields |= {"norm_eps": want.norm_eps, "tie_embeddings": False}
    opts, wopts = mixer_options(cfg), mixer_options(want)
    if "attn" in opts and "attn" in wopts:
        a, w = opts["attn"], wopts["attn"]
        new = mixers.setdefault("attn", {})
        if a.qk_norm and w.qk_norm and a.qk_norm_eps != w.qk_norm_eps and a.conv_size <= 1:
            new["qk_norm_eps"] = w.qk_norm_eps
        if a.gate != "none" and a.gate_packing != w.gate_packing and not (a.qkv_bias and w.gate_packing == "separate"):
            new["gate_packing"] = w.gate_packing  # a packed gate's bias has no place in gate_proj
        width = _padded_head(cfg, a, w)
        if width is not None:
            new |= {"rope": True, "rope_fraction": w.rope_fraction, "rope_config": None,
                    "scale": None}
            fields |= {"head_dim": width, "rope": RopeConfig()}  # any RoPE: it rotates zeros
    return dataclasses.replace(cfg, mixers=mixers, **fields).resolved()


def class_state(cfg: ModelConfig, form: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cfg's HybridLM state dict -> the same function's tensors in form (class_form(cfg, ...))."""
    cfg, state = cfg.resolved(), dict(state)
    if cfg.tie_embeddings and not form.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"].clone()
    if form.norm_eps != cfg.norm_eps:
        c = math.sqrt(form.norm_eps / cfg.norm_eps)
        writers = ["embed.weight"] + [f"blocks.{i}.{w}.{t}" for i, k in enumerate(cfg.layer_kinds())
                                      for w in (*_WRITERS[k], "mlp.down_proj") for t in ("weight", "bias")]
        for name in writers:
            if name in state:
                state[name] = state[name] * c
    opts, fopts = mixer_options(cfg), mixer_options(form)
    if "attn" in opts:
        for i, kind in enumerate(cfg.layer_kinds()):
            if kind == "attn":
                _attention_layer(state, f"blocks.{i}.mixer.", cfg, form, opts["attn"], fopts["attn"])
    shifts = _norm_shifts(cfg, form)
    for name, shift in shifts.items():
        state[name] = state[name] + shift
    return state


def _residual_scalable(cfg: ModelConfig) -> bool:
    """Pre-norm blocks throughout, of mixers whose only reader of the stream is their norm."""
    kinds = cfg.layer_kinds()
    placements = {cfg.norm_placements.get(k, cfg.norm_placement) for k in kinds}
    return placements == {"pre"} and all(k in _WRITERS for k in kinds)


def _padded_head(cfg: ModelConfig, a, w) -> int | None:
    """K' for a NoPE attention into a class that rotates a fraction of every head, or None."""
    if a.rope or not w.rope or w.rope_fraction >= 1.0 or a.gate != "none" or a.qk_norm or a.conv_size > 1:
        return None
    if any(k not in ("attn", "mamba2", MLP_ONLY) for k in cfg.layer_kinds()):  # head_dim also sizes gdn
        return None
    K = cfg.head_dim
    width = round(K / (1.0 - w.rope_fraction))
    return width if width - int(width * w.rope_fraction) == K else None


def _norm_shifts(cfg: ModelConfig, form: ModelConfig) -> dict[str, float]:
    """RMSNorm weight name -> what to add (the stored weight's offset changes with zero-centring)."""
    if cfg.norm_zero_centred == form.norm_zero_centred:
        return {}
    with torch.device("meta"):
        before, after = HybridLM(cfg), HybridLM(form)
    after_norms = dict(after.named_modules())
    return {f"{n}.weight": float(m.zero_centred) - float(after_norms[n].zero_centred)
            for n, m in before.named_modules()
            if isinstance(m, RMSNorm) and m.zero_centred != after_norms[n].zero_centred}


def _split_q(t: torch.Tensor, packing: str, H: int, G: int, K: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj rows (H (K + W), ...) of a packing -> q rows (H K, ...), gate rows (H W, ...)."""
    rest = t.shape[1:]
    if packing == "head":
        q, g = t.view(H, K + W, *rest).split([K, W], dim=1)
    else:  # group: per KV group [q of its R heads (R K), their gates (R W)]
        R = H // G
        q, g = t.view(G, R * (K + W), *rest).split([R * K, R * W], dim=1)
    return q.reshape(H * K, *rest), g.reshape(H * W, *rest)


def _join_q(q: torch.Tensor, g: torch.Tensor, packing: str, H: int, G: int, K: int, W: int) -> torch.Tensor:
    rest = q.shape[1:]
    if packing == "head":
        return torch.cat([q.view(H, K, *rest), g.view(H, W, *rest)], dim=1).reshape(H * (K + W), *rest)
    R = H // G
    return torch.cat([q.view(G, R * K, *rest), g.view(G, R * W, *rest)], dim=1).reshape(H * (K + W), *rest)


def _attention_layer(state: dict, p: str, cfg: ModelConfig, form: ModelConfig, a, f) -> None:
    """One attention layer's q/k/v/o and gate tensors (prefix p) from a's options to f's."""
    H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    W = 0 if a.gate == "none" else (1 if a.gate == "headwise" else K)
    c = math.sqrt(f.qk_norm_eps / a.qk_norm_eps) if a.qk_norm and f.qk_norm_eps != a.qk_norm_eps else 1.0
    if form.head_dim != K:
        c = (a.scale or K ** -0.5) / form.head_dim ** -0.5  # the wider head's scale, applied to q
    for t in ("weight", "bias"):
        name = f"{p}q_proj.{t}"
        if name not in state:
            continue
        qg = state[name]
        if a.gate_packing == "separate" or W == 0:
            q = qg
            g = state.pop(f"{p}heads.gate_proj.weight") if t == "weight" and W else None
            g = qg.new_zeros(H * W) if t == "bias" and W else g
        else:
            q, g = _split_q(qg, a.gate_packing, H, G, K, W)
        q = q * c
        if f.gate_packing == "separate" or W == 0:
            state[name] = q
            if t == "weight" and W:
                state[f"{p}heads.gate_proj.weight"] = g
        else:
            state[name] = _join_q(q, g, f.gate_packing, H, G, K, W)
        kname = f"{p}k_proj.{t}"
        if c != 1.0 and form.head_dim == K and kname in state:
            state[kname] = state[kname] * c
    if form.head_dim != K:  # heads widened: zero rotated dims in front of each head
        pad = form.head_dim - K
        for proj, heads in (("q_proj", H), ("k_proj", G), ("v_proj", G)):
            for t in ("weight", "bias"):
                name = f"{p}{proj}.{t}"
                if name in state:
                    x = state[name].view(heads, K, *state[name].shape[1:])
                    x = torch.cat([x.new_zeros(heads, pad, *x.shape[2:]), x], dim=1)
                    state[name] = x.reshape(heads * form.head_dim, *x.shape[2:])
        o = state[f"{p}o_proj.weight"]
        o = o.view(o.shape[0], H, K)
        state[f"{p}o_proj.weight"] = torch.cat([o.new_zeros(o.shape[0], H, pad), o], dim=2).reshape(o.shape[0], -1)
