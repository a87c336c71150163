"""Mamba-2's state space duality (SSD) layer: the defining recurrence (tests only).

Legend: B batch, T tokens, H heads, P head dim, G groups (H % G == 0), N state size.

Per head h, with its group g(h) = h // (H / G) and dt already discretised
(`discretize`: softplus(dt_raw + dt_bias), clamped to dt_limit):

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T          (P, N) per head
    y_t = h_t C_t + D_h x_t

B_t, C_t are the (N,) vectors of the head's group. A document start drops the
state from before it (h_{t-1} := 0). This is the simple-GLA recurrence with
q = C, k = B, v = dt x and a per-token, per-head log decay dt A.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["discretize", "ssd_reference"]


def discretize(dt, dt_bias=None, softplus: bool = True, limit=(0.0, float("inf"))):
    """dt (B, T, H) raw -> the step size of each token and head, as Mamba-2 and transformers'
    torch_forward compute it: dt + dt_bias, then softplus, then clamped to [limit[0], limit[1]]."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if softplus:
        dt = F.softplus(dt)
    lo, hi = limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def ssd_reference(x, dt, A, B, C, *, D=None, starts=None, initial_state=None):
    """Token loop over discretised inputs. x: (B, T, H, P); dt: (B, T, H) (after `discretize`);
    A: (H,); B, C: (B, T, G, N); D: (H,) or None; starts: (B, T) bool, True where a document
    starts (its state from before is dropped); initial_state: (B, H, P, N).
    Returns y (B, T, H, P) and the final state (B, H, P, N), in x's dtype."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    rep = H // G
    Bh = B.repeat_interleave(rep, dim=2)  # (B, T, H, N): head h reads group h // rep
    Ch = C.repeat_interleave(rep, dim=2)
    h = x.new_zeros(Bt, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        if starts is not None:
            h = h * (~starts[:, t]).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)  # (B, H)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D[:, None] * x
    return y, h
