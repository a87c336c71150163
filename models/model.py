"""HybridLM: embedding -> blocks (each with its own mixer kind) -> norm -> head.

Legend: B batch, T tokens, D model width, V vocabulary.

By default a block is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x))
(blocks.py: post-norm and sandwich placements, MLP kinds, MLP-only and
mixer-only blocks). The mixer of layer i is `cfg.layer_kinds()[i]`, built from
the registry with the options under `model.mixers.<kind>`, or the kind `mlp`
for an MLP-only block. Parameter, FLOP and cache accounting walk the same list.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loom.kernels.loss import linear_cross_entropy
from loom.models.config import ConfigError, build, nearest, ranged
from loom.models.blocks import MLP_ONLY, PLACEMENTS, Block
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.norms import NormStyle, RMSNorm
from loom.models.rope import RopeConfig


@dataclass
class ModelConfig:
    vocab_size: int | None = ranged(None, ge=1)  # None: taken from the tokenizer, rounded up to a multiple of 64
    d_model: int = ranged(256, ge=1)
    n_heads: int = ranged(4, ge=1)
    n_kv_heads: int | None = ranged(None, ge=1)  # None: = n_heads (MHA)
    head_dim: int | None = ranged(None, ge=2)  # None: d_model // n_heads
    mlp_hidden: int | None = ranged(None, ge=1)  # None: 8/3 d_model rounded up to a multiple of 64
    layers: list[Any] = field(default_factory=lambda: ["attn", "x4"])
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    tie_embeddings: bool = True
    norm_eps: float = ranged(1e-5, gt=0)
    init_std: float = ranged(0.02, gt=0)
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Block and norm layout (models/blocks.py, models/norms.py); the defaults are Llama's.
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"  # post: OLMo 2/3; sandwich: Gemma 2/3
    # layer kind -> its own placement, overriding norm_placement (OLMo-hybrid: attn post, gdn pre)
    norm_placements: dict[str, str] = field(default_factory=dict)
    norm_zero_centred: bool = False  # RMSNorm weight stored as w, applied as 1 + w (Gemma)
    norm_weight_fp32: bool = False  # RMSNorm multiplies by its weight before rounding to the dtype (OLMo)
    mlp_kind: Literal["swiglu", "geglu", "relu2"] = "swiglu"  # geglu: tanh GELU (Gemma); relu2: Nemotron-H
    mlp_bias: bool = False
    block_mlp: bool = True  # false: mixer blocks have no MLP (MLPs come from `mlp` entries in model.layers)
    embed_scale: float = ranged(1.0, gt=0)  # embeddings times this, rounded to their dtype first (Gemma: sqrt(d_model))
    # head logits z -> c tanh(z / c) (Gemma 2/3 final_logit_softcapping)
    logit_softcap: float | None = ranged(None, gt=0)

    @property
    def norm_style(self) -> NormStyle:
        return NormStyle(zero_centred=self.norm_zero_centred, weight_fp32=self.norm_weight_fp32)

    def layer_kinds(self) -> list[str]:
        return expand_layers(self.layers)

    def resolved(self) -> "ModelConfig":
        """Fill derived sizes; validate layers and mixer options (ConfigError naming the key)."""
        n_kv = self.n_kv_heads or self.n_heads
        head_dim = self.head_dim or self.d_model // self.n_heads
        hidden = self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_heads % n_kv:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({n_kv})")
        kinds = self.layer_kinds()
        for kind in kinds:
            if kind not in MIXERS and kind != MLP_ONLY:
                raise ConfigError(f"unknown mixer kind {kind!r} in model.layers{nearest(kind, [*MIXERS, MLP_ONLY])}")
        for kind in self.mixers:
            if kind not in MIXERS:
                raise ConfigError(f"unknown mixer kind {kind!r} in model.mixers{nearest(kind, MIXERS)}")
        for kind, placement in self.norm_placements.items():
            if kind not in kinds:
                raise ConfigError(f"model.norm_placements: {kind!r} is not a layer kind of model.layers")
            if placement not in PLACEMENTS:
                raise ConfigError(f"model.norm_placements.{kind} must be one of {PLACEMENTS}; got {placement!r}")
        mixer_options(self)
        return ModelConfig(**{**self.__dict__, "n_kv_heads": n_kv, "head_dim": head_dim, "mlp_hidden": hidden})


def expand_layers(spec: list[Any]) -> list[str]:
    """`[[rat, swa], x6, attn]` -> 12 alternating layers then attn. A string
    `xN` repeats the item before it N times in total."""
    out: list[str] = []
    prev: list[str] | None = None
    for item in spec:
        if isinstance(item, str) and re.fullmatch(r"x\d+", item):
            if prev is None:
                raise ConfigError(f"model.layers: repeat {item!r} has nothing before it")
            if int(item[1:]) < 1:
                raise ConfigError(f"model.layers: repeat {item!r} must be x1 or more (xN: N copies in total); "
                                  "remove the item to have none")
            out.extend(prev * (int(item[1:]) - 1))
            prev = None
            continue
        prev = expand_layers(item) if isinstance(item, list) else [str(item)]
        out.extend(prev)
    if not out:
        raise ConfigError("model.layers is empty")
    return out


def mixer_options(cfg: ModelConfig) -> dict[str, Any]:
    """Typed options per kind used in the model, from cfg.mixers."""
    return {kind: build(MIXERS[kind].Config, cfg.mixers.get(kind), f"model.mixers.{kind}")
            for kind in (set(cfg.layer_kinds()) - {MLP_ONLY}) | set(cfg.mixers)}


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (B, T, D), after the final norm
    aux_loss: torch.Tensor  # scalar: sum of the mixers' weighted auxiliary losses
    state: list[Any] | None  # per-layer decoding state when requested


class HybridLM(nn.Module):
    """Example:
        cfg = ModelConfig(vocab_size=256, layers=[["attn"], "x2"]).resolved()
        model = HybridLM(cfg)
        out = model(input_ids)                    # input_ids: (B, T)
        loss = model.loss(out.hidden, labels)     # chunked cross-entropy
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size must be set (the trainer fills it from the tokenizer)")
        cfg = cfg.resolved()
        self.cfg = cfg
        kinds = cfg.layer_kinds()
        opts = mixer_options(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(kind, MixerDims(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, i, len(kinds),
                                  cfg.rope, cfg.init_std, cfg.norm_style), opts.get(kind), cfg.mlp_hidden,
                  cfg.norm_eps, cfg.norm_placements.get(kind, cfg.norm_placement), cfg.mlp_kind, cfg.mlp_bias, cfg.block_mlp, cfg.norm_style)
            for i, kind in enumerate(kinds))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_style)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation, in one place:
        - every nn.Linear and the embedding: N(0, init_std); biases 0;
        - output projections (names ending in o_proj, out_proj, down_proj):
          N(0, init_std / sqrt(2 * n_layers)), so the residual stream's
          variance does not grow with depth;
        - norms: weight 1 (stored 0 when zero-centred);
        - then each mixer's `reset_parameters()` for its special parameters
          (gate biases, decay rates, memory initial weights, ...).
        """
        std, n = self.cfg.init_std, len(self.blocks)
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                out = name.rsplit(".", 1)[-1] in ("o_proj", "out_proj", "down_proj")
                nn.init.normal_(mod.weight, 0.0, std / math.sqrt(2 * n) if out else std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()
        for block in self.blocks:
            block.mixer.reset_parameters()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None, state: list[Any] | None = None,
                want_state: bool = False, cp: Any = None, stats: dict | None = None) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput.

        position_ids: (B, T) position of each token inside its document; a packed
            row restarts them at 0 per document. Default: 0..T-1 (or continuing
            the cache length with `state`).
        seq_ids: (B, T) document index of each token. Default: derived from
            position_ids, a new document at each position 0 (so a packed row
            never attends across documents).
        state: per-layer decoding state from a previous call with
            want_state=True; the tokens continue those rows.
        cp: the context-parallel handle (a kernels CPContext) when the inputs are
            this process's shard of a longer sequence (training only: no state;
            pass seq_ids, which a shard's positions cannot tell).
        stats: a dict that mixers fill with diagnostics (evaluation).
        """
        B, T = input_ids.shape
        if cp is not None and (state is not None or want_state):
            raise ValueError("context parallelism is a training-time sharding: no decoding state in or out "
                             "(decode with parallel.cp=1)")
        if position_ids is None:
            start = 0 if state is None else state_length(state)
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        elif seq_ids is None and cp is None:
            seq_ids = seq_ids_from_position_ids(position_ids)
        ctx = SeqContext(position_ids=position_ids, seq_ids=seq_ids, want_state=want_state, cp=cp, stats=stats)
        x = self.embed(input_ids)
        if self.cfg.embed_scale != 1.0:  # transformers' Gemma rounds the fp32 scale to the weights' dtype
            x = x * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(x.dtype)
        new_state = [] if want_state else None
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state[i]["mixer"]
            x, s = block(x, ctx, layer_state)
            if want_state:
                new_state.append({"mixer": s, "length": T + (0 if state is None else state[i]["length"])})
        aux = torch.stack(ctx.aux_losses).sum() if ctx.aux_losses else x.new_zeros(())
        return ModelOutput(self.norm(x), aux, new_state)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> fp32 logits (..., V), soft-capped when model.logit_softcap is set."""
        z = F.linear(hidden, self.head_weight).float()
        return z if self.cfg.logit_softcap is None else softcap(z, self.cfg.logit_softcap)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
             reduction: str = "mean") -> torch.Tensor:
        """Chunked cross-entropy. hidden (B, T, D), labels (B, T) with -100 ignored.

        Logits exist for at most `chunk` tokens at a time; each chunk's
        gradients are computed in its forward pass (loom.kernels.loss, fused),
        so the head matmuls cost what full cross-entropy costs. With model.logit_softcap
        the logits pass through c tanh(z / c) first: each chunk is then recomputed in
        backward instead (torch.utils.checkpoint), one extra head matmul."""
        if self.cfg.logit_softcap is not None:
            return self._softcapped_loss(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), chunk, reduction)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.head_weight, labels.reshape(-1),
                                    reduction=reduction, chunk=chunk)

    def _softcapped_loss(self, h: torch.Tensor, y: torch.Tensor, chunk: int, reduction: str) -> torch.Tensor:
        def piece(h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.logits(h_c), y_c, ignore_index=-100, reduction="sum")

        total = sum(checkpoint(piece, h[a:a + chunk], y[a:a + chunk], use_reentrant=False)
                    if torch.is_grad_enabled() else piece(h[a:a + chunk], y[a:a + chunk])
                    for a in range(0, h.shape[0], chunk))
        if reduction == "sum":
            return total
        return total / (y != -100).sum().clamp_min(1)

    # ----- accounting -----
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (parameters used in matmuls, including
        the LM head) + 3 x the forward mixing FLOPs (attention scores etc.)."""
        matmul_params = self.num_params(non_embedding=True) + self.head_weight.numel() * (self.lm_head is None)
        mixing = sum(b.mixer.mixing_flops_per_token(seq_len) for b in self.blocks)
        return 6 * matmul_params + 3 * mixing

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> dict[str, int]:
        """Decoding-cache bytes per sequence after `seq_len` tokens, per layer."""
        return {f"{i}:{b.kind}": b.mixer.state_bytes(seq_len, bytes_per_elem) for i, b in enumerate(self.blocks)}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the per-layer state. input_ids: (B, T) -> (B, T + new)."""
        out = self(input_ids, want_state=True)
        state, tokens = out.state, [input_ids]
        nxt = self.logits(out.hidden[:, -1]).argmax(-1, keepdim=True)
        for _ in range(max_new_tokens - 1):
            tokens.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            out = self(nxt, state=state, want_state=True)
            state = out.state
            nxt = self.logits(out.hidden[:, -1]).argmax(-1, keepdim=True)
        else:
            tokens.append(nxt)
        return torch.cat(tokens, dim=1)


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(z / cap): logits squashed smoothly into (-cap, cap)."""
    return torch.tanh(z / cap) * cap


def seq_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token within its row.

    position_ids (B, T) -> seq_ids (B, T) int64: 0 for the row's first document,
    then +1 at each position_ids == 0 (a row that begins inside a document has
    -1 there), the same document starts at which the recurrent mixers reset.
    """
    return (position_ids == 0).to(torch.int64).cumsum(dim=-1) - 1


def state_length(state: list[Any]) -> int:
    return state[0]["length"]

