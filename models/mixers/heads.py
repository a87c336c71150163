"""Per-head output options shared by every softmax-attention mixer.

Legend: B batch, T tokens, D model width, H heads, K head dim.

`HeadOutput` sits between the attention op and the output projection:
    o (B, T, H, K)  ->  o * gate * moh_weight  (B, T, H, K)

Gate (Gated Attention, "G1"): Γ = σ(x W_G) computed from the mixer input x,
one value per head ("headwise", W_G: D -> H) or per channel ("elementwise",
W_G: D -> H*K). W_G is `gate_proj`, or rows of the mixer's q_proj when the mixer
packs it there (attn's gate_packing): the mixer then passes the logits x W_G.

MoH (Mixture-of-Head attention): H_s shared heads always on, H_r = H - H_s
routed heads of which each token picks top-k. With router logits from x:
    p   = softmax(x W_r)                         over the H_r routed heads
    g_r = k * p * 1[top-k] / sum_{top-k} p       (mean weight 1 on chosen heads)
    g_s = H_s * softmax(x W_s)   (1 when H_s == 1)
    [a_s, a_r] = 2 * softmax(x W_0)              (two-stage shared/routed balance)
    weight = [a_s g_s ; a_r g_r]
Load balancing (Switch style, as the MoH code): L = H_r * sum_i P_i f_i with
P_i the mean router probability and f_i the share of tokens choosing head i;
`moh_loss_weight * L` is appended to ctx.aux_losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.config import ranged
from loom.models.mixers.base import SeqContext


@dataclass
class HeadOptions:
    """Options under model.mixers.<kind> for every softmax-attention mixer."""

    gate: Literal["none", "headwise", "elementwise"] = "none"
    moh: bool = False
    moh_shared: int = ranged(2, ge=1)
    moh_topk: int = ranged(1, ge=1)
    moh_loss_weight: float = ranged(0.01, ge=0)


class HeadOutput(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, opts: HeadOptions, layer_idx: int,
                 packed_gate: bool = False):
        super().__init__()
        self.opts, self.n_heads, self.head_dim, self.layer_idx = opts, n_heads, head_dim, layer_idx
        self.gate_proj = None
        if opts.gate != "none" and not packed_gate:
            width = n_heads if opts.gate == "headwise" else n_heads * head_dim
            self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.gate_fn = torch.sigmoid  # tests force it to one to check the gate path is otherwise inert
        if opts.moh:
            n_routed = n_heads - opts.moh_shared
            if not (1 <= opts.moh_shared < n_heads) or not (1 <= opts.moh_topk <= n_routed):
                raise ValueError(f"moh needs 1 <= moh_shared < n_heads ({n_heads}) and "
                                 f"1 <= moh_topk <= n_heads - moh_shared ({n_routed}); "
                                 f"got moh_shared={opts.moh_shared}, moh_topk={opts.moh_topk}")
            self.router = nn.Linear(d_model, n_routed, bias=False)
            self.shared_router = nn.Linear(d_model, opts.moh_shared, bias=False) if opts.moh_shared > 1 else None
            self.balance = nn.Linear(d_model, 2, bias=False)

    @property
    def enabled(self) -> bool:
        return self.opts.gate != "none" or self.opts.moh

    @property
    def row_losses(self) -> bool:
        """MoH appends a load-balancing loss over the whole row (Mixer.row_losses)."""
        return self.opts.moh

    def moh_weights(self, x: torch.Tensor, ctx: SeqContext | None) -> torch.Tensor:
        """(B, T, H) per-head weights; appends the balance loss to ctx.aux_losses."""
        o = self.opts
        n_routed = self.n_heads - o.moh_shared
        p = F.softmax(self.router(x).float(), dim=-1)  # (B, T, H_r)
        top_p, top_i = p.topk(o.moh_topk, dim=-1)
        chosen = torch.zeros_like(p).scatter(-1, top_i, 1.0)  # (B, T, H_r) 0/1
        g_r = o.moh_topk * p * chosen / top_p.sum(-1, keepdim=True)
        if self.shared_router is not None:
            g_s = o.moh_shared * F.softmax(self.shared_router(x).float(), dim=-1)
        else:
            g_s = torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        a = 2 * F.softmax(self.balance(x).float(), dim=-1)  # (B, T, 2)
        w = torch.cat([a[..., :1] * g_s, a[..., 1:] * g_r], dim=-1)
        if ctx is not None:
            P = p.flatten(0, 1).mean(0)
            f = chosen.flatten(0, 1).mean(0)
            ctx.aux_losses.append(o.moh_loss_weight * n_routed * (P * f).sum())
            if ctx.stats is not None:
                ctx.stats[f"moh_usage/layer{self.layer_idx}"] = f.detach() / o.moh_topk
                ctx.stats[f"moh_balance/layer{self.layer_idx}"] = (f.detach().min() / f.detach().max().clamp_min(1e-9))
        return w

    def forward(self, x: torch.Tensor, o: torch.Tensor, ctx: SeqContext | None,
                gate_logits: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) mixer input; o: (B, T, H, K) attention output; gate_logits:
        (B, T, H, 1 or K) x W_G when the mixer packs W_G in its q_proj, else None."""
        if self.opts.gate != "none":
            logits = self.gate_proj(x) if gate_logits is None else gate_logits
            g = self.gate_fn(logits).reshape(*x.shape[:-1], self.n_heads, -1)  # (B, T, H, 1 or K)
            if ctx is not None and ctx.stats is not None:
                ctx.stats[f"gate_mean/layer{self.layer_idx}"] = g.detach().float().mean()
            o = o * g.to(o.dtype)
        if self.opts.moh:
            o = o * self.moh_weights(x, ctx).to(o.dtype)[..., None]
        return o


@torch.no_grad()
def sink_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, position_ids: torch.Tensor,
              scale: float, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Mean share of attention each query puts on the first token of its document.

    q: (B, T, H, K); k: (B, T, G, K) (same tokens); lse: (B, T, H) fp32;
    position_ids: (B, T); visible: (B, T, H) bool, whether the first token is
    visible to the query at all (sparse and windowed patterns), default all.
    Returns a detached scalar tensor (a diagnostic: no graph is kept).
    """
    B, T, H, K = q.shape
    rep = H // k.shape[2]
    start = (torch.arange(T, device=q.device)[None] - position_ids).clamp_min(0)  # (B, T)
    k0 = torch.gather(k, 1, start[:, :, None, None].expand(B, T, k.shape[2], K)).repeat_interleave(rep, 2)
    s0 = (q.float() * k0.float()).sum(-1) * scale  # (B, T, H)
    share = torch.exp(s0 - lse)
    if visible is not None:
        share = share * visible
    return share.mean()
