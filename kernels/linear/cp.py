"""Causal linear attention with decay over a sequence sharded across cp ranks:
a prefix scan of the per-piece states.

Legend: B batch, T full length, H heads, K key dim, V value dim, P tokens of one
piece (T / (2 cp) zigzag, T / cp contiguous), N = T / P pieces in position order.

The recurrence S_t = lambda S_{t-1} (1 - reset_t) + k_t^T v_t is affine in the
state, so a piece's final state is final = carry * S_in + local (see
loom.kernels.linear.linear_attention_state): local is the piece's final state from a
zero start, carry = lambda^P, or 0 if a document starts inside the piece. And
the output of a piece started from S_in is its output from zero plus the
decayed read of S_in:

    o_t = o_t|S_in=0  +  scale * lambda^(t+1) [no reset in 0..t] * q_t S_in

So each rank
  1. runs the single-device op on each of its pieces from zero (o, local);
  2. all-gathers the (local, carry) pairs of every piece (H K V + H numbers per
     row and piece, whatever the sequence length);
  3. scans them in GLOBAL piece order 0..N-1 (zigzag: rank r holds pieces r and
     2 cp - 1 - r), S_in(0) = 0, S_in(c + 1) = carry_c S_in(c) + local_c;
  4. adds the read of S_in(c) to each of its pieces.
The all-gather is differentiable (gather.py: its backward reduce-scatters the
gradient), so the gradients with respect to earlier ranks' k, v and decay flow
back to them. Documents need nothing extra: a reset makes carry 0 and masks
the read of S_in after it.

Bytes one rank sends per layer: forward (cp - 1) * n_local * B (H K V + H) * a,
backward the same through the reduce-scatter (a = 4, or 8 for fp64 inputs;
n_local = 2 zigzag, 1 contiguous).
"""
from __future__ import annotations

import torch

from loom.kernels.context_parallel.gather import all_gather, depend_on
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, global_pieces
from loom.kernels.linear.forms import run_linear

__all__ = ["cp_linear_attention"]


def cp_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, cp: CPContext, *,
                        block: int = 64, reset: torch.Tensor | None = None, scale: float = 1.0,
                        impl: str = "chunked"):
    """`loom.kernels.linear.linear_attention` over a sequence sharded by `cp` (either layout).

    Args:
        q, k: (B, L, H, K); v: (B, L, H, V) this rank's shard (L = T / cp tokens).
        decay: (H,) rates, lambda = exp(-decay).
        cp: the CPContext of the group.
        block: tokens per block of the chunked form.
        reset: (B, L) bool, True at a document's first token (the shard of
            position_ids == 0), or None.
        scale: multiplies q.
        impl: the single-device form each piece runs (forms.py FORMS; the dispatcher
            passes the one it resolved).

    Returns:
        o (B, L, H, V), equal to the shard of the single-device output, and the state
        after the whole sequence (B, H, K, V) (fp32, fp64 for fp64 inputs), the same on
        every rank. Collective: every rank of cp.group calls it.
    Example: o, S = cp_linear_attention(q, k, v, slopes, cp, reset=shard(position_ids) == 0)
    """
    B, L, H, K = q.shape
    V = v.shape[3]
    T = L * cp.world_size
    check_seq_len(T, cp)
    if reset is None:
        reset = torch.zeros(B, L, dtype=torch.bool, device=q.device)
    if tuple(reset.shape) != (B, L):
        raise ValueError(f"cp_linear_attention: reset must be (B, L) = ({B}, {L}); got {tuple(reset.shape)}")
    P = T // cp.n_chunks
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_lam = -decay.to(dt)  # (H,)

    # 1. each local piece from a zero state
    outs, pairs = [], []
    for i in range(L // P):
        sl = slice(i * P, (i + 1) * P)
        o, local = run_linear(impl, q[:, sl], k[:, sl], v[:, sl], decay, block=block, reset=reset[:, sl],
                              return_state=True, scale=scale)
        carry = torch.exp(log_lam * P) * (~reset[:, sl].any(1, keepdim=True))  # (B, H)
        outs.append(o)
        pairs.append(torch.cat([local.reshape(B, -1), carry], dim=1))  # (B, H K V + H)
    # 2. every piece's (local, carry), ordered by global piece index
    gathered = all_gather(torch.stack(pairs), cp)  # (cp, n_local, B, H K V + H)
    by_piece = {}
    for r in range(cp.world_size):
        for i, c in enumerate(global_pieces(T, cp, r)):
            by_piece[c] = gathered[r, i]
    # 3. exclusive prefix scan in position order
    S = torch.zeros(B, H, K, V, dtype=dt, device=q.device)
    incoming = []
    for c in range(cp.n_chunks):
        incoming.append(S)
        local, carry = by_piece[c].split([H * K * V, H], dim=1)
        S = carry[:, :, None, None] * S + local.view(B, H, K, V)
    # 4. add the read of the incoming state
    t = torch.arange(1, P + 1, device=q.device, dtype=dt)
    fixed = []
    for i, c in enumerate(global_pieces(T, cp)):
        sl = slice(i * P, (i + 1) * P)
        fresh = reset[:, sl].cumsum(1) == 0  # (B, P) no document start in 0..t
        q_fac = torch.exp(log_lam[None, None, :] * t[None, :, None]) * fresh[:, :, None]  # (B, P, H)
        read = torch.einsum("bthk,bhkv->bthv", q[:, sl].to(dt) * (scale * q_fac)[..., None], incoming[c])
        fixed.append((outs[i].to(dt) + read).to(v.dtype))
    return depend_on(torch.cat(fixed, dim=1), gathered), S  # the gather's backward runs on every rank
