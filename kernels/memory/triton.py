"""The Titans memory chunk-end update as Triton kernels (the CUDA path of chunked.py's `_block`).

Legend: N = B * H (one memory per batch row and head), C tokens of a chunk block, I = D_in,
J = D_out the sides of one memory matrix (depth 1: K x K; depth 2: K x E*K and E*K x K);
BLOCK_* the tile sizes.

At the end of a chunk block every layer's momentum S and weights W take one step that sums
the chunk's per-token gradients u_c = x_c^T d_c (x_c the layer input, d_c the loss gradient at
its output, both at the chunk-start weights), with the momentum/decay coefficients of the scan:

    S_end = pS * S - sum_c cS_c x_c^T d_c                  (momentum: decay products p_end / p_c)
    W_end = bW * W + bS * S - sum_c cW_c x_c^T d_c         (weights: decay of W, momentum carried in)

(chunked.py `_coefficients`; with momentum_step="chunk", cS = cW = theta). The PyTorch form
materialises the scaled copies of x and runs two matmuls plus four elementwise passes over the
(I x J) matrices; the kernel reads x and d once per (I, J) tile, keeps both sums in fp32
registers and writes S_end and W_end directly. Backward, with gS, gW the incoming gradients:

    dS = pS gS + bS gW,   dW = bW gW,   dpS = <gS, S>,   dbW = <gW, W>,   dbS = <gW, S>   (torch)
    dx_c = -(cS_c d_c gS^T + cW_c d_c gW^T)                  (kernel _bwd_dx: J tiled, I whole)
    dd_c = -(cS_c x_c gS + cW_c x_c gW),
    dcS_c = -<x_c gS, d_c>,  dcW_c = -<x_c gW, d_c>         (kernel _bwd_dd: I tiled, J whole)

The gradient at the chunk start (keys through the MLP at G and the hand-written backprop to
d_c) stays in batched matmuls (cuBLAS on CUDA); this kernel fuses what follows it.
Fixed launch configurations (the autotuner needs a GPU driver); the tests run the kernels
under TRITON_INTERPRET=1. Accumulation in fp32; offsets in int64.

Layout: kernels -> launchers -> autograd.Function (`ChunkEndUpdate`) -> `chunk_end_update`,
which has the signature of chunked.py's PyTorch form.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C = 16
# Every tl.dot uses input_precision="ieee": fp32 products as PyTorch's default fp32 matmul computes
# them; Triton's default ("tf32" on Ampere and later) would round the operands to 10 mantissa bits.
BLOCK_T = 32   # the tiled side of a matrix (I in the forward, J or I in the backward)
NUM_WARPS = 4


@triton.jit
def _fwd_kernel(x_ptr, d_ptr, cs_ptr, cw_ptr, ps_ptr, bw_ptr, bs_ptr, s_ptr, w_ptr, s_out_ptr, w_out_ptr,
                C, I, J, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    i_n, i_i, i_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = i_n.to(tl.int64)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_i, m_j = o_i < I, o_j < J
    b_acc_s = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    b_acc_w = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_x = tl.load(x_ptr + n * C * I + o_c[:, None] * I + o_i[None, :], mask=m_c[:, None] & m_i[None, :],
                      other=0.0).to(tl.float32)                                  # (BLOCK_C, BLOCK_I)
        b_d = tl.load(d_ptr + n * C * J + o_c[:, None] * J + o_j[None, :], mask=m_c[:, None] & m_j[None, :],
                      other=0.0).to(tl.float32)                                  # (BLOCK_C, BLOCK_J)
        b_cs = tl.load(cs_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_cw = tl.load(cw_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_acc_s += tl.dot(tl.trans(b_x * b_cs[:, None]), b_d, input_precision="ieee")
        b_acc_w += tl.dot(tl.trans(b_x * b_cw[:, None]), b_d, input_precision="ieee")
    p_m = n * I * J + o_i[:, None] * J + o_j[None, :]
    m_m = m_i[:, None] & m_j[None, :]
    b_s = tl.load(s_ptr + p_m, mask=m_m, other=0.0).to(tl.float32)
    b_w = tl.load(w_ptr + p_m, mask=m_m, other=0.0).to(tl.float32)
    ps, bw, bs = tl.load(ps_ptr + n), tl.load(bw_ptr + n), tl.load(bs_ptr + n)
    tl.store(s_out_ptr + p_m, (ps * b_s - b_acc_s).to(s_out_ptr.dtype.element_ty), mask=m_m)
    tl.store(w_out_ptr + p_m, (bw * b_w + bs * b_s - b_acc_w).to(w_out_ptr.dtype.element_ty), mask=m_m)


@triton.jit
def _bwd_dx_kernel(d_ptr, cs_ptr, cw_ptr, gs_ptr, gw_ptr, dx_ptr, C, I, J,
                   BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """dx (C x I) for one tile of C: the whole of I in registers, J walked in tiles."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    n = i_n.to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_i = tl.arange(0, BLOCK_I)
    m_c, m_i = o_c < C, o_i < I
    b_ds = tl.zeros([BLOCK_C, BLOCK_I], dtype=tl.float32)
    b_dw = tl.zeros([BLOCK_C, BLOCK_I], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < J
        b_d = tl.load(d_ptr + n * C * J + o_c[:, None] * J + o_j[None, :], mask=m_c[:, None] & m_j[None, :],
                      other=0.0).to(tl.float32)                                  # (BLOCK_C, BLOCK_J)
        p_g = n * I * J + o_i[None, :] * J + o_j[:, None]                        # (BLOCK_J, BLOCK_I): g^T
        m_g = m_j[:, None] & m_i[None, :]
        b_gs = tl.load(gs_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_gw = tl.load(gw_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_ds += tl.dot(b_d, b_gs, input_precision="ieee")
        b_dw += tl.dot(b_d, b_gw, input_precision="ieee")
    b_cs = tl.load(cs_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_cw = tl.load(cw_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dx = -(b_cs[:, None] * b_ds + b_cw[:, None] * b_dw)
    tl.store(dx_ptr + n * C * I + o_c[:, None] * I + o_i[None, :], b_dx.to(dx_ptr.dtype.element_ty),
             mask=m_c[:, None] & m_i[None, :])


@triton.jit
def _bwd_dd_kernel(x_ptr, d_ptr, cs_ptr, cw_ptr, gs_ptr, gw_ptr, dd_ptr, dcs_ptr, dcw_ptr, C, I, J,
                   BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """dd (C x J), dcS, dcW (C) for one tile of C: the whole of J in registers, I walked in tiles."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    n = i_n.to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_j = tl.arange(0, BLOCK_J)
    m_c, m_j = o_c < C, o_j < J
    b_xs = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)   # x gS
    b_xw = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)   # x gW
    for i0 in range(0, I, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_i = o_i < I
        b_x = tl.load(x_ptr + n * C * I + o_c[:, None] * I + o_i[None, :], mask=m_c[:, None] & m_i[None, :],
                      other=0.0).to(tl.float32)                                  # (BLOCK_C, BLOCK_I)
        p_g = n * I * J + o_i[:, None] * J + o_j[None, :]                        # (BLOCK_I, BLOCK_J)
        m_g = m_i[:, None] & m_j[None, :]
        b_gs = tl.load(gs_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_gw = tl.load(gw_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_xs += tl.dot(b_x, b_gs, input_precision="ieee")
        b_xw += tl.dot(b_x, b_gw, input_precision="ieee")
    b_d = tl.load(d_ptr + n * C * J + o_c[:, None] * J + o_j[None, :], mask=m_c[:, None] & m_j[None, :],
                  other=0.0).to(tl.float32)
    b_cs = tl.load(cs_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_cw = tl.load(cw_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dd = -(b_cs[:, None] * b_xs + b_cw[:, None] * b_xw)
    tl.store(dd_ptr + n * C * J + o_c[:, None] * J + o_j[None, :], b_dd.to(dd_ptr.dtype.element_ty),
             mask=m_c[:, None] & m_j[None, :])
    tl.store(dcs_ptr + n * C + o_c, -tl.sum(b_xs * b_d, axis=1), mask=m_c)
    tl.store(dcw_ptr + n * C + o_c, -tl.sum(b_xw * b_d, axis=1), mask=m_c)


def _whole(n: int) -> int:
    """A side kept whole in registers: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def end_update_forward(x, d, cs, cw, ps, bw, bs, S, W):
    """x (N, C, I), d (N, C, J), cs, cw (N, C), ps, bw, bs (N,), S, W (N, I, J), all contiguous fp32.
    Returns S_end, W_end (N, I, J)."""
    N, C, I = x.shape
    J = d.shape[2]
    S_end, W_end = torch.empty_like(S), torch.empty_like(W)
    grid = (N, triton.cdiv(I, BLOCK_T), triton.cdiv(J, BLOCK_T))
    _fwd_kernel[grid](x, d, cs, cw, ps, bw, bs, S, W, S_end, W_end, C, I, J,
                      BLOCK_C=BLOCK_C, BLOCK_I=BLOCK_T, BLOCK_J=BLOCK_T, num_warps=NUM_WARPS)
    return S_end, W_end


def end_update_backward(x, d, cs, cw, gS, gW):
    """dx (N, C, I), dd (N, C, J), dcs, dcw (N, C) of the two chunk-end sums."""
    N, C, I = x.shape
    J = d.shape[2]
    dx, dd = torch.empty_like(x), torch.empty_like(d)
    dcs, dcw = torch.empty_like(cs), torch.empty_like(cw)
    grid = (N, triton.cdiv(C, BLOCK_C))
    _bwd_dx_kernel[grid](d, cs, cw, gS, gW, dx, C, I, J,
                         BLOCK_C=BLOCK_C, BLOCK_I=_whole(I), BLOCK_J=BLOCK_T, num_warps=NUM_WARPS)
    _bwd_dd_kernel[grid](x, d, cs, cw, gS, gW, dd, dcs, dcw, C, I, J,
                         BLOCK_C=BLOCK_C, BLOCK_I=BLOCK_T, BLOCK_J=_whole(J), num_warps=NUM_WARPS)
    return dx, dd, dcs, dcw


class ChunkEndUpdate(torch.autograd.Function):
    """(S_end, W_end) of one layer; tensors flattened to N = B * H rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, d, cs, cw, ps, bw, bs, S, W):
        S_end, W_end = end_update_forward(x, d, cs, cw, ps, bw, bs, S, W)
        ctx.save_for_backward(x, d, cs, cw, ps, bw, bs, S, W)
        return S_end, W_end

    @staticmethod
    def backward(ctx, gS, gW):
        x, d, cs, cw, ps, bw, bs, S, W = ctx.saved_tensors
        gS, gW = gS.contiguous(), gW.contiguous()
        dx, dd, dcs, dcw = end_update_backward(x, d, cs, cw, gS, gW)
        dS = ps[:, None, None] * gS + bs[:, None, None] * gW
        dW = bw[:, None, None] * gW
        dps, dbw, dbs = (gS * S).sum((1, 2)), (gW * W).sum((1, 2)), (gW * S).sum((1, 2))
        return dx, dd, dcs, dcw, dps, dbw, dbs, dS, dW


def chunk_end_update(x, d, end, p_end, beta_end, bS_end, S_l, W_l):
    """Drop-in for chunked.py's PyTorch chunk-end step of one layer.

    x (B, H, C, I), d (B, H, C, J); end (B, H, C, 2) [columns cS, cW] or (B, H, C, 1) [shared];
    p_end, beta_end, bS_end (B, H, 1, 1); S_l, W_l (B or 1, H, I, J).
    Returns S_end, W_end (B, H, I, J) in fp32."""
    B, H, C, I = x.shape
    J = d.shape[-1]
    N = B * H
    f32 = lambda t, *shape: t.float().expand(*shape).reshape(N, *shape[2:]).contiguous()  # noqa: E731
    cs, cw = end[..., 0], end[..., -1]
    S_end, W_end = ChunkEndUpdate.apply(
        f32(x, B, H, C, I), f32(d, B, H, C, J), f32(cs, B, H, C), f32(cw, B, H, C),
        f32(p_end.reshape(B, H), B, H), f32(beta_end.reshape(B, H), B, H), f32(bS_end.reshape(B, H), B, H),
        f32(S_l, B, H, I, J), f32(W_l, B, H, I, J))
    return S_end.view(B, H, I, J), W_end.view(B, H, I, J)
