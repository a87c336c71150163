"""KL(teacher || student) of the next-token distributions, chunk by chunk.

Legend: N tokens, D width, V vocabulary, c tokens of one chunk, T temperature.

chunked_kl(h_s, w_s, h_t, w_t, mask, temperature, chunk) -> the SUM over tokens with
mask set of  KL(p_t || p_s) = sum_v p_t (log p_t - log p_s),  p = softmax(z / T),
z_s = h_s w_s^T and z_t = h_t w_t^T (each optionally soft-capped, c tanh(z / c), first).

As the fused cross-entropy (kernels/loss/fused.py), only c x V logits of each model
exist at a time and the gradients are computed in the forward pass:

    d KL / d (z_s / T) = p_s - p_t        so  d KL / d z_s = (p_s - p_t) / T
    d h_s = g w_s (c, D),  d w_s += g^T h_s (V, D)     with g = d KL / d z_s (x the cap's slope)

The teacher's side (h_t, w_t) takes no gradient. `dense_kl` is the same sum from
full logits (tests, the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunked_kl", "dense_kl"]


def _cap(z: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(capped logits, d capped / d z or None)."""
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, 1 - t * t


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, mask, temperature: float, chunk: int, cap_s, cap_t):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h_s.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h_s.device)
        dh = torch.zeros_like(h_s) if want_dh else None
        dw = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if want_dw else None
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            ws, wt = w_s.to(acc), w_t.detach().to(acc)
            for a in range(0, h_s.shape[0], chunk):
                keep = mask[a:a + chunk]
                if not bool(keep.any()):
                    continue
                hs_c = h_s[a:a + chunk].to(acc)
                zs, slope = _cap(hs_c @ ws.t(), cap_s)
                zt, _ = _cap(h_t[a:a + chunk].detach().to(acc) @ wt.t(), cap_t)
                log_ps = F.log_softmax(zs / temperature, dim=-1)
                log_pt = F.log_softmax(zt / temperature, dim=-1)
                pt = log_pt.exp()
                row = (pt * (log_pt - log_ps)).sum(-1)
                total += torch.where(keep, row, torch.zeros_like(row)).sum()
                if not (want_dh or want_dw):
                    continue
                g = (log_ps.exp_() - pt).div_(temperature).mul_(keep[:, None])
                if slope is not None:
                    g.mul_(slope)
                if want_dh:
                    dh[a:a + chunk] = (g @ ws).to(h_s.dtype)
                if want_dw:
                    dw.addmm_(g.t(), hs_c)
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w_s.dtype
        return total.to(torch.float32) if acc == torch.float32 else total

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        gh = dh * grad_out.to(dh.dtype) if dh is not None else None
        gw = (dw * grad_out).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None, None, None


def _check(h_s, w_s, h_t, w_t, mask, temperature) -> None:
    if h_s.dim() != 2 or h_s.shape != h_t.shape or w_s.shape != w_t.shape or h_s.shape[1] != w_s.shape[1] \
            or mask.shape != h_s.shape[:1]:
        raise ValueError(f"chunked_kl expects h_s, h_t (N, D), w_s, w_t (V, D), mask (N,); got {tuple(h_s.shape)}, "
                         f"{tuple(w_s.shape)}, {tuple(h_t.shape)}, {tuple(w_t.shape)}, {tuple(mask.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def chunked_kl(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, chunk: int = 1024, cap_s: float | None = None,
               cap_t: float | None = None) -> torch.Tensor:
    """Sum over masked tokens of KL(softmax(z_t / T) || softmax(z_s / T)); gradients reach h_s and w_s."""
    _check(h_s, w_s, h_t, w_t, mask, temperature)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedKL.apply(h_s, w_s, h_t, w_t, mask.bool(), float(temperature), int(chunk), cap_s, cap_t)


def dense_kl(h_s, w_s, h_t, w_t, mask, temperature: float = 1.0, cap_s=None, cap_t=None) -> torch.Tensor:
    """The same sum from all N x V logits at once (autograd; the reference)."""
    _check(h_s, w_s, h_t, w_t, mask, temperature)
    zs, _ = _cap(h_s @ w_s.t(), cap_s)
    zt, _ = _cap(h_t.detach() @ w_t.detach().t(), cap_t)
    log_ps, log_pt = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    return (F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1) * mask).sum()
