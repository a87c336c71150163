"""`rat`: RAT — gated linear recurrence inside chunks of L tokens, softmax attention across chunks.

Legend: B batch, T tokens, D model width, H heads, G q/k groups, K head dim,
L chunk length, C chunk states.

As the paper (arXiv 2507.04416) and its code:
- q, k: G = `groups` head-sized vectors each, tiled to H heads (head h uses
  group h % G); v, the forget gate f and the output gate z: H heads each.
- Inside a chunk (position // L), keys and values follow one gated recurrence
  s_t = g_t s_{t-1} + (1 - g_t) x_t with g = sigmoid(f), per channel, restarted
  at every chunk and document start (loom.kernels.rat).
- RoPE at the CHUNK index (position // L) on q and on the recurrent keys, so a
  query sees earlier chunk summaries at their chunk distance.
- o = softmax attention over the chunk-final states of the document's earlier
  chunks plus the query's own running state; y = o_proj(sigmoid(z) * o).
- The Gated-Attention gate and MoH options (HeadOptions) act on the per-head
  output like for every softmax-attention mixer.
The block is pre-norm, so there is no norm or residual here (the paper's layer has both).

Decoding state (loom.kernels.rat): chunk-final "k" (post-RoPE), "v" of shape
(B, C, H, K) with C ~ T / L, their count "n" (B,), and the fp32 running state
"k_run", "v_run" (B, H, K): about L times smaller than attention's KV cache.

Context parallelism (ctx.cp, passed to the op): the op all-gathers the
chunk states and the running state at piece boundaries (the same for either
cp_impl); every piece of seq_len / (2 cp) tokens must be a multiple of L
(cp_chunk_tokens). Diagnostics (ctx.stats) are not available under cp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loom.kernels.rat import rat
from loom.models.config import ranged
from loom.models.mixers.base import Mixer, MixerDims, SeqContext, register
from loom.models.mixers.heads import HeadOptions, HeadOutput
from loom.models.rope import Rotary


@dataclass
class RatConfig(HeadOptions):
    chunk: int = ranged(16, ge=1)  # L: tokens per chunk (the paper's 1.3B runs use 16)
    groups: int = ranged(2, ge=1)  # G: q/k groups tiled to the heads (the paper's ngroups)
    rope: bool = True  # RoPE at the chunk index; False gives NoPE (extrapolates better in the paper)

    def __post_init__(self):
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {self.chunk}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1; got {self.groups}")


@register("rat")
class RAT(Mixer):
    Config = RatConfig
    cp_impls = ("ring", "ulysses")  # the op gathers chunk states under either

    def __init__(self, dims: MixerDims, cfg: RatConfig):
        super().__init__(dims, cfg)
        D, H, G, K = dims.d_model, dims.n_heads, cfg.groups, dims.head_dim
        if H % G:
            raise ValueError(f"rat: n_heads ({H}) must be a multiple of model.mixers.rat.groups ({G})")
        self.q_proj = nn.Linear(D, G * K, bias=False)
        self.k_proj = nn.Linear(D, G * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.f_proj = nn.Linear(D, H * K, bias=True)  # forget gate; the bias gets the chrono init
        self.z_proj = nn.Linear(D, H * K, bias=False)  # output gate
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.rotary = Rotary(K, dims.rope) if cfg.rope else None
        self.heads = HeadOutput(D, H, K, cfg, dims.layer_idx)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Forget-gate bias b = log(U), U ~ Uniform(1, L - 1): sigmoid(b) in (1/2, (L-1)/L),
        so at init the recurrence remembers on the scale of a chunk (chrono init)."""
        L = self.cfg.chunk
        self.f_proj.bias.uniform_(1.0, max(L - 1.0, 1.0)).log_()

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        H, G, K, L = self.dims.n_heads, self.cfg.groups, self.dims.head_dim, self.cfg.chunk
        q = self.q_proj(x).view(B, T, G, K)
        k = self.k_proj(x).view(B, T, G, K)
        v = self.v_proj(x).view(B, T, H, K)
        f = self.f_proj(x).to(torch.promote_types(x.dtype, torch.float32)).view(B, T, H, K)  # gates in >= fp32
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(torch.div(ctx.position_ids, L, rounding_mode="floor"))
        want_stats = ctx.stats is not None
        out = rat(q, k, v, f, ctx.position_ids, chunk=L, seq_ids=ctx.seq_ids, cos=cos, sin=sin,
                  initial_state=state, return_state=ctx.want_state, return_stats=want_stats, cp=ctx.cp)
        o, *extra = out if isinstance(out, tuple) else (out,)
        new_state = extra.pop() if ctx.want_state else None
        if want_stats:
            attn_stats, i = extra.pop(), self.dims.layer_idx
            ctx.stats[f"rat_forget_mean/layer{i}"] = torch.sigmoid(f.detach()).mean()
            # attention share of the query's own chunk, and of its document's first chunk (the sink)
            ctx.stats[f"rat_local_mass/layer{i}"] = attn_stats["local"].float().mean()
            ctx.stats[f"sink_mass/layer{i}"] = attn_stats["first"].float().mean()
        o = o * torch.sigmoid(self.z_proj(x)).view(B, T, H, K)
        o = self.heads(x, o, ctx)
        y = self.o_proj(o.reshape(B, T, H * K))
        return y, new_state

    def cp_chunk_tokens(self) -> int:
        # the sharded op needs pieces of at least L tokens; whole chunks per piece is the simple rule to state.
        return self.cfg.chunk

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # Scores and weighted sum over the visible chunk states plus the own state
        # (4 FLOPs x K each, per head), and the two gated recurrences (3 FLOPs per channel).
        H, K, L = self.dims.n_heads, self.dims.head_dim, self.cfg.chunk
        visible = max(seq_len / L - 1, 0) / 2 + 1
        return 4 * H * K * visible + 6 * H * K

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        # floor(T / L) chunk-final (k, v) pairs per head, plus the fp32 running (k, v) state.
        H, K = self.dims.n_heads, self.dims.head_dim
        return 2 * (seq_len // self.cfg.chunk) * H * K * bytes_per_elem + 2 * H * K * 4
