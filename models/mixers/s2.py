"""`s2`: S2-Attention, heterogeneous per-head block-sparse causal attention.

Legend: B batch, T tokens in this call, S cached + new tokens, D model width,
H query heads, G key/value heads, K head dim; b = block, L = local_blocks,
V = vert_stride.

Each head sees a local window of L blocks (its own included) and every V-th
earlier block with a head-dependent offset; the heads' offsets cover every
residue mod V, so together they see the whole context (kernels/s2 has the
maths). Blocks are document-relative (position_ids // b), so a packed row
equals its documents run separately. The paper's hybrid interleaves dense
layers: `model.layers: [[s2, attn], xN]`.

Offsets (loom.kernels.s2.default_head_offsets): one per KV head when
n_kv_heads >= V (the paper; query heads of a group share the pattern), else
one per query head; construction fails when n_heads < V, since the union could
not cover the context.

Decoding state: {"k", "v": (B, S, G, K) post-RoPE keys and values, "pos":
(B, S) positions, "doc": (B, S) document index}. This implementation keeps the
whole cache; `state_bytes` reports what a KV-efficient cache needs (the local
window plus the blocks of the KV head's own residues, about L*b + S*r/V tokens
per KV head, r residues per KV head).

Context parallelism (ctx.cp, passed to the op; cp_impl=ulysses): the op
runs on the full sequence for H / cp heads after an all-to-all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loom.kernels.s2 import covers_all_residues, default_head_offsets, s2_attention
from loom.models.config import ranged
from loom.models.mixers.attn import AttnConfig, Attention
from loom.models.mixers.base import MixerDims, SeqContext, register
from loom.models.mixers.heads import sink_mass
from loom.models.mixers.attn import continue_docs


@dataclass
class S2Config(AttnConfig):
    block: int = ranged(16, ge=1)  # tokens per sparse block
    local_blocks: int = ranged(4, ge=1)  # blocks of the local window, the query's own included
    vert_stride: int = ranged(4, ge=1)  # every V-th earlier block is visible (per head offset)
    head_shift: int = ranged(0, ge=0)  # added to every head's offset (dkernel's head_sliding_offset)

    def __post_init__(self):
        if self.block < 1 or self.local_blocks < 1 or self.vert_stride < 1:
            raise ValueError(f"block, local_blocks and vert_stride must be >= 1; got {self.block}, "
                             f"{self.local_blocks}, {self.vert_stride}")


@register("s2")
class S2Attention(Attention):
    Config = S2Config
    # Ulysses only: the sharded op trades sequence for heads (kernels/s2 says why).
    cp_impls = ("ulysses",)

    def __init__(self, dims: MixerDims, cfg: S2Config):
        super().__init__(dims, cfg)
        H, G, V = dims.n_heads, dims.n_kv_heads, cfg.vert_stride
        offsets = default_head_offsets(H, G, V, cfg.head_shift)
        if not covers_all_residues(offsets, V):
            raise ValueError(f"s2: n_heads ({H}) < vert_stride ({V}): the heads cannot cover every block; "
                             f"lower vert_stride or add heads")
        # A plain CPU tensor, not a buffer: it is configuration, must survive
        # meta-device construction (to_empty), and s2_attention moves it.
        self.head_offsets = offsets

    def forward(self, x: torch.Tensor, ctx: SeqContext, state=None):
        B, T, _ = x.shape
        c = self.cfg
        q, k, v, gate, conv_cache = self.project(x, ctx, state)
        pos, doc = ctx.position_ids, ctx.seq_ids
        if state is not None:
            doc = torch.cat([state["doc"], continue_docs(state["doc"], pos)], dim=1)
            pos = torch.cat([state["pos"], pos], dim=1)
            k = torch.cat([state["k"], k], dim=1)
            v = torch.cat([state["v"], v], dim=1)
        want_lse = ctx.stats is not None and state is None
        o = s2_attention(q, k, v, block=c.block, local_blocks=c.local_blocks, vert_stride=c.vert_stride,
                         head_offsets=self.head_offsets, seq_ids=doc, position_ids=pos, scale=self.scale,
                         return_lse=want_lse,
                         cp=ctx.cp)
        if want_lse:
            o, lse = o
            H = q.shape[2]
            own = self.head_offsets.to(x.device)[torch.arange(H, device=x.device) // (H // len(self.head_offsets))]
            visible = (pos // c.block < c.local_blocks)[:, :, None] | (own == 0)  # (B, T, H): block 0 seen
            ctx.stats[f"sink_mass/layer{self.dims.layer_idx}"] = sink_mass(
                q, k, lse, pos, self.scale, visible=visible)
        o = self.heads(x, o, ctx, gate)
        y = self.o_proj(o.reshape(B, T, -1))
        new_state = None
        if ctx.want_state:
            if doc is None:
                doc = torch.zeros_like(pos)
            new_state = self.with_conv({"k": k, "v": v, "pos": pos, "doc": doc}, conv_cache)
        return y, new_state

    def _residues_per_kv_head(self) -> list[set[int]]:
        G = self.dims.n_kv_heads
        per = self.head_offsets.shape[0] // G  # pattern heads per KV head (1 or H / G)
        offs = self.head_offsets.tolist()
        return [{(-o) % self.cfg.vert_stride for o in offs[g * per:(g + 1) * per]} for g in range(G)]

    def mixing_flops_per_token(self, seq_len: int) -> float:
        # Visible keys averaged over the queries of a causal sequence and the heads.
        b, L, V = self.cfg.block, self.cfg.local_blocks, self.cfg.vert_stride
        m = torch.arange(math.ceil(seq_len / b), dtype=torch.float64)  # query block
        n_q = torch.clamp(seq_len - m * b, max=b)  # queries in block m
        local = n_q * torch.clamp(m, max=L - 1) * b + n_q * (n_q + 1) / 2
        far = 0.0
        residues = [(-o) % V for o in self.head_offsets.tolist()]
        for r in residues:  # far blocks n <= m - L with n % V == r
            far = far + torch.where(m - L >= r, torch.div(m - L - r, V, rounding_mode="floor") + 1, 0) * n_q * b
        visible = (local.sum() + far.sum() / len(residues)) / seq_len
        return 4 * self.dims.n_heads * self.dims.head_dim * float(visible)

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        # KV-efficient cache: blocks inside the next query's local window, plus
        # each KV head's residue blocks before it (needed by every later query).
        b, L, V = self.cfg.block, self.cfg.local_blocks, self.cfg.vert_stride
        first_local = max(0, seq_len // b - L + 1)  # first block of the next query's window
        tokens = 0
        for residues in self._residues_per_kv_head():
            far = sum(max(0, -(-(first_local - r) // V)) for r in residues)  # n < first_local, n % V == r
            tokens += min(seq_len, (seq_len - first_local * b) + far * b)
        return 2 * tokens * self.dims.head_dim * bytes_per_elem
