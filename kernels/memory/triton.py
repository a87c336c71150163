"""The Titans memory chunk update as Triton kernels (the CUDA path of chunked.py's `_block`): the
per-token gradient at the chunk-start weights, then the chunk-end momentum and decay step.

Legend: N = B * H (one memory per batch row and head), C tokens of a chunk block, K head dim,
F = E*K the hidden width of a depth-2 memory, I = D_in, J = D_out the sides of one memory matrix
(depth 1: K x K; depth 2: K x F and F x K); P the input side of the last layer (K or F);
BLOCK_* the tile sizes.

1. Gradient at the chunk start (depth 1 and 2; `_start_fwd_kernel`, `_start_bwd_kernel`,
`ChunkStartGrad`, `chunk_start_grad`). Per token c, row vectors, at the chunk-start weights G
(depth 1: h = k, G2 = G1, no hidden layer; common.py for the memory):

    z1 = k G1,  h = act(z1),  z = h G2,  r = (mean_K z^2 + eps)^-1/2,  o = z r gamma  (o = z: no norm)
    e = 2 (o - v),  a = gamma e,  d = r a - z r^3 <a z>   (d = e: no norm)      <.> = mean over K
    d1 = (d G2^T) * act'(z1)

Outputs h, d1, d: the layer inputs and output-gradients whose outer products are the token's
weight gradients (u_c = k_c^T d1_c and h_c^T d_c). One program takes BLOCK_C tokens with K whole
in registers (the norm needs whole rows of z) and walks P in BLOCK_P tiles, so no (K x F) matrix is
ever held whole: the forward accumulates z over the tiles, then (depth 2) recomputes z1 per tile
for d1. Backward, with gh, gd1, gd the incoming gradients and m = d G2^T:

    gm = gd1 * act'(z1),   gd += gm G2
    ga = r gd - r^3 z <gd z>,   go = 2 gamma ga,   gv = -go,   ggamma = sum_c (e ga + z r go)
    gz = r gamma go - r^3 z <gamma go z> - r^3 (z <gd a> + <a z> gd + a <gd z>) + 3 r^5 <a z> z <gd z>
         (no norm: gz = 2 gd, gv = -2 gd)
    gz1 = (gh + gz G2^T) * act'(z1) + gd1 * m * act''(z1),   gk = gz1 G1^T   (depth 1: gk = gz G1^T)
    gG1 = sum_c k_c^T gz1_c (depth 1: k_c^T gz_c),   gG2 = sum_c (h_c^T gz_c + gm_c^T d_c)

The per-token part is one kernel; the weight gradients, sums over the chunk, are `_outer_sum_kernel`
with (I, J) tiles. Deeper memories (depth >= 3) keep chunked.py's PyTorch form of this step (the
dispatcher says so): each middle (F x F) layer would need its own pass over hidden tiles with the
whole hidden row of the next layer in registers; no recipe uses them.

2. Chunk-end update (any depth; `_fwd_kernel`, `_bwd_dx_kernel`, `_bwd_dd_kernel`, `ChunkEndUpdate`,
`chunk_end_update`). Every layer's momentum S and weights W take one step that sums the chunk's
per-token gradients u_c = x_c^T d_c (x_c the layer input, d_c the loss gradient at its output, from
step 1), with the momentum/decay coefficients of the scan:

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

Steps 1 and 2 are separate launches: step 1 works per token with whole rows, step 2 reduces over
the tokens per (I, J) tile, and one program holding both would need every (I x J) accumulator of
a layer in registers (K x F fp32 is 64 KB at K = 64, F = 256) or recompute the token gradients
in each tile's program. h, d1, d cross global memory once, as the "token" read needs them anyway.
Fixed launch configurations (the autotuner needs a GPU driver); the tests run the kernels
under TRITON_INTERPRET=1. Accumulation in fp32; offsets in int64.

Layout: kernels -> launchers -> autograd.Function -> `chunk_start_grad` / `chunk_end_update`, with
the signatures of chunked.py's PyTorch forms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from loom.kernels.memory.common import NORM_EPS

BLOCK_C = 16
# Every tl.dot uses input_precision="ieee": fp32 products as PyTorch's default fp32 matmul computes
# them; Triton's default ("tf32" on Ampere and later) would round the operands to 10 mantissa bits.
BLOCK_T = 32   # a tiled side: P in the chunk-start kernels; I in the chunk-end forward, J or I in its backward
NUM_WARPS = 4


def _whole(n: int) -> int:
    """A side kept whole in registers: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def _or(t, dummy):
    """A pointer argument the kernel's constexpr flags leave unused: any tensor will do."""
    return dummy if t is None else t


# ----- 1. the gradient at the chunk start (depth 1 and 2) -----

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_NORM_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def _tile(ptr, n, o_r, o_c, m_r, m_c, R, S):
    """The tile at rows o_r and columns o_c (0 outside the masks m_r, m_c) of the n-th row-major
    R x S matrix stored from ptr, in fp32."""
    return tl.load(ptr + n * R * S + o_r[:, None] * S + o_c[None, :], mask=m_r[:, None] & m_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _act(z, GELU: tl.constexpr):
    """(act(z), act'(z), act''(z)): common.act_derivatives, exact-erf GELU or SiLU."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        a, a1, a2 = z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)
    else:
        s = tl.sigmoid(z)
        ds = s * (1.0 - s)
        a, a1, a2 = z * s, s + z * ds, ds * (2.0 + z * (1.0 - 2.0 * s))
    return a, a1, a2


@triton.jit
def _start_fwd_kernel(k_ptr, v_ptr, w1_ptr, wl_ptr, nw_ptr, h_ptr, d1_ptr, d_ptr, z_ptr, C, K, P,
                      DEPTH: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """h, d1, d, z for one tile of C: K whole in registers, P (the last layer's input side) walked in tiles."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    n = i_n.to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_c, m_k = o_c < C, o_k < K
    p_ck, m_ck = n * C * K + o_c[:, None] * K + o_k[None, :], m_c[:, None] & m_k[None, :]
    if DEPTH == 2:
        b_k = tl.load(k_ptr + p_ck, mask=m_ck, other=0.0)                          # (BLOCK_C, BLOCK_K)
    b_z = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        p_cp, m_cp = n * C * P + o_c[:, None] * P + o_p[None, :], m_c[:, None] & m_p[None, :]
        b_wl = _tile(wl_ptr, n, o_p, o_k, m_p, m_k, P, K)  # (BLOCK_P, BLOCK_K)
        if DEPTH == 1:  # x = k, tiled along the contraction
            b_x = tl.load(k_ptr + p_cp, mask=m_cp, other=0.0)
        else:           # x = h = act(k G1), one tile of the hidden width
            b_w1 = _tile(w1_ptr, n, o_k, o_p, m_k, m_p, K, P)  # (BLOCK_K, BLOCK_P)
            b_x, _, _ = _act(tl.dot(b_k, b_w1, input_precision="ieee"), GELU)
            tl.store(h_ptr + p_cp, b_x, mask=m_cp)
        b_z += tl.dot(b_x, b_wl, input_precision="ieee")
    tl.store(z_ptr + p_ck, b_z, mask=m_ck)
    b_v = tl.load(v_ptr + p_ck, mask=m_ck, other=0.0)
    if NORM:
        b_nw = tl.load(nw_ptr + n * K + o_k, mask=m_k, other=0.0)[None, :]
        b_r = tl.rsqrt(tl.sum(b_z * b_z, axis=1)[:, None] / K + _NORM_EPS)
        b_a = b_nw * 2.0 * (b_z * b_r * b_nw - b_v)                                # gamma e
        b_d = b_r * b_a - b_z * b_r * b_r * b_r * (tl.sum(b_a * b_z, axis=1)[:, None] / K)
    else:
        b_d = 2.0 * (b_z - b_v)
    tl.store(d_ptr + p_ck, b_d, mask=m_ck)
    if DEPTH == 2:  # d1 = (d G2^T) * act'(k G1), the hidden tiles again
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < P
            b_wl = _tile(wl_ptr, n, o_p, o_k, m_p, m_k, P, K)
            b_w1 = _tile(w1_ptr, n, o_k, o_p, m_k, m_p, K, P)
            _, b_s, _ = _act(tl.dot(b_k, b_w1, input_precision="ieee"), GELU)
            b_d1 = tl.dot(b_d, tl.trans(b_wl), input_precision="ieee") * b_s
            tl.store(d1_ptr + n * C * P + o_c[:, None] * P + o_p[None, :], b_d1, mask=m_c[:, None] & m_p[None, :])


@triton.jit
def _start_bwd_kernel(k_ptr, v_ptr, w1_ptr, wl_ptr, nw_ptr, z_ptr, d_ptr, gh_ptr, gd1_ptr, gd_ptr,
                      gk_ptr, gv_ptr, gz_ptr, gz1_ptr, gm_ptr, gnw_ptr, C, K, P,
                      DEPTH: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """gk, gv, gz, gz1, gm and this tile's part of ggamma, for one tile of C (tiling as the forward)."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    n = i_n.to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_c, m_k = o_c < C, o_k < K
    p_ck, m_ck = n * C * K + o_c[:, None] * K + o_k[None, :], m_c[:, None] & m_k[None, :]
    b_gd = tl.load(gd_ptr + p_ck, mask=m_ck, other=0.0)
    if DEPTH == 2:  # d1 = m * act'(z1) with m = d G2^T: gm = gd1 * act'(z1) flows back into gd
        b_k = tl.load(k_ptr + p_ck, mask=m_ck, other=0.0)
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < P
            p_cp, m_cp = n * C * P + o_c[:, None] * P + o_p[None, :], m_c[:, None] & m_p[None, :]
            b_wl = _tile(wl_ptr, n, o_p, o_k, m_p, m_k, P, K)
            b_w1 = _tile(w1_ptr, n, o_k, o_p, m_k, m_p, K, P)
            _, b_s, _ = _act(tl.dot(b_k, b_w1, input_precision="ieee"), GELU)
            b_gm = tl.load(gd1_ptr + p_cp, mask=m_cp, other=0.0) * b_s
            tl.store(gm_ptr + p_cp, b_gm, mask=m_cp)
            b_gd += tl.dot(b_gm, b_wl, input_precision="ieee")
    b_z = tl.load(z_ptr + p_ck, mask=m_ck, other=0.0)
    b_v = tl.load(v_ptr + p_ck, mask=m_ck, other=0.0)
    if NORM:  # d = r a - z r^3 <a z> with a = gamma e, e = 2 (z r gamma - v); <.> the mean over K
        b_nw = tl.load(nw_ptr + n * K + o_k, mask=m_k, other=0.0)[None, :]
        b_r = tl.rsqrt(tl.sum(b_z * b_z, axis=1)[:, None] / K + _NORM_EPS)
        b_r3 = b_r * b_r * b_r
        b_e = 2.0 * (b_z * b_r * b_nw - b_v)
        b_a = b_nw * b_e
        b_mu = tl.sum(b_a * b_z, axis=1)[:, None] / K
        b_gdz = tl.sum(b_gd * b_z, axis=1)[:, None] / K
        b_gda = tl.sum(b_gd * b_a, axis=1)[:, None] / K
        b_ga = b_r * b_gd - b_r3 * b_z * b_gdz
        b_go = 2.0 * b_nw * b_ga                                                      # through e = 2 (o - v)
        b_gv = -b_go
        b_gnw = b_e * b_ga + b_z * b_r * b_go
        # z's two paths: the normalised output o = z r gamma, and d's own dependence on z
        b_gz = b_r * b_nw * b_go - b_r3 * b_z * (tl.sum(b_nw * b_go * b_z, axis=1)[:, None] / K)
        b_gz += -b_r3 * (b_z * b_gda + b_mu * b_gd + b_a * b_gdz) + 3.0 * b_r3 * b_r * b_r * b_mu * b_z * b_gdz
        tl.store(gnw_ptr + (n * tl.num_programs(1) + i_c) * K + o_k, tl.sum(b_gnw, axis=0), mask=m_k)
    else:     # d = 2 (z - v)
        b_gz = 2.0 * b_gd
        b_gv = -2.0 * b_gd
    tl.store(gv_ptr + p_ck, b_gv, mask=m_ck)
    tl.store(gz_ptr + p_ck, b_gz, mask=m_ck)
    if DEPTH == 1:  # gk = gz G1^T, tile by tile of its columns
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < P
            b_wl = _tile(wl_ptr, n, o_p, o_k, m_p, m_k, P, K)
            tl.store(gk_ptr + n * C * K + o_c[:, None] * K + o_p[None, :],
                     tl.dot(b_gz, tl.trans(b_wl), input_precision="ieee"), mask=m_c[:, None] & m_p[None, :])
    else:  # gz1 = (gh + gz G2^T) act'(z1) + gd1 m act''(z1),  gk = gz1 G1^T
        b_d = tl.load(d_ptr + p_ck, mask=m_ck, other=0.0)
        b_gk = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < P
            p_cp, m_cp = n * C * P + o_c[:, None] * P + o_p[None, :], m_c[:, None] & m_p[None, :]
            b_wl = _tile(wl_ptr, n, o_p, o_k, m_p, m_k, P, K)
            b_w1 = _tile(w1_ptr, n, o_k, o_p, m_k, m_p, K, P)
            _, b_s, b_s2 = _act(tl.dot(b_k, b_w1, input_precision="ieee"), GELU)
            b_gh = tl.load(gh_ptr + p_cp, mask=m_cp, other=0.0) + tl.dot(b_gz, tl.trans(b_wl), input_precision="ieee")
            b_m = tl.dot(b_d, tl.trans(b_wl), input_precision="ieee")
            b_gz1 = b_gh * b_s + tl.load(gd1_ptr + p_cp, mask=m_cp, other=0.0) * b_m * b_s2
            tl.store(gz1_ptr + p_cp, b_gz1, mask=m_cp)
            b_gk += tl.dot(b_gz1, tl.trans(b_w1), input_precision="ieee")
        tl.store(gk_ptr + p_ck, b_gk, mask=m_ck)


@triton.jit
def _outer_sum_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, out_ptr, C, I, J, TWO: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out = sum_c a_c^T b_c (+ a2_c^T b2_c) for one (I, J) tile: a weight's gradient, summed over the chunk."""
    i_n, i_i, i_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = i_n.to(tl.int64)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_i, m_j = o_i < I, o_j < J
    b_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        p_a, m_a = n * C * I + o_c[:, None] * I + o_i[None, :], m_c[:, None] & m_i[None, :]
        p_b, m_b = n * C * J + o_c[:, None] * J + o_j[None, :], m_c[:, None] & m_j[None, :]
        b_acc += tl.dot(tl.trans(tl.load(a_ptr + p_a, mask=m_a, other=0.0)), tl.load(b_ptr + p_b, mask=m_b, other=0.0),
                        input_precision="ieee")
        if TWO:
            b_acc += tl.dot(tl.trans(tl.load(a2_ptr + p_a, mask=m_a, other=0.0)),
                            tl.load(b2_ptr + p_b, mask=m_b, other=0.0), input_precision="ieee")
    tl.store(out_ptr + n * I * J + o_i[:, None] * J + o_j[None, :], b_acc, mask=m_i[:, None] & m_j[None, :])


def _start_grid(N, C):
    """One program per (memory row, tile of BLOCK_C tokens)."""
    return (N, triton.cdiv(C, BLOCK_C))


def start_grad_forward(activation, k, v, nw, G):
    """k, v (N, C, K); nw (N, K) or None; G = (G1,) with G1 (N, K, K) or (G1, G2) with G1 (N, K, F),
    G2 (N, F, K); all contiguous fp32. Returns h (N, C, F) or None, d1 (N, C, F) or None, d (N, C, K)
    and z (N, C, K), the last layer's pre-norm output (saved for the backward)."""
    N, C, K = k.shape
    depth, P = len(G), G[-1].shape[1]
    d, z = torch.empty_like(k), torch.empty_like(k)
    h, d1 = (k.new_empty(N, C, P) for _ in range(2)) if depth == 2 else (None, None)
    _start_fwd_kernel[_start_grid(N, C)](
        k, v, G[0], G[-1], _or(nw, k), _or(h, k), _or(d1, k), d, z, C, K, P,
        DEPTH=depth, NORM=nw is not None, GELU=activation == "gelu",
        BLOCK_C=BLOCK_C, BLOCK_K=_whole(K), BLOCK_P=BLOCK_T, num_warps=NUM_WARPS)
    return h, d1, d, z


def outer_sum(a, b, a2=None, b2=None):
    """sum_c a[:, c]^T b[:, c] (+ the same of a2, b2): a (N, C, I), b (N, C, J) -> (N, I, J)."""
    N, C, I = a.shape
    J = b.shape[2]
    out = a.new_empty(N, I, J)
    grid = (N, triton.cdiv(I, BLOCK_T), triton.cdiv(J, BLOCK_T))
    _outer_sum_kernel[grid](a, b, _or(a2, a), _or(b2, b), out, C, I, J, TWO=a2 is not None,
                            BLOCK_C=BLOCK_C, BLOCK_I=BLOCK_T, BLOCK_J=BLOCK_T, num_warps=NUM_WARPS)
    return out


def start_grad_backward(activation, k, v, nw, G, z, d, h, gh, gd1, gd):
    """Gradients of k, v, nw (None without a norm) and each G[l], given those of h, d1 (depth 2) and d."""
    N, C, K = k.shape
    depth, P = len(G), G[-1].shape[1]
    gk, gv, gz = torch.empty_like(k), torch.empty_like(v), torch.empty_like(z)
    gz1, gm = (k.new_empty(N, C, P) for _ in range(2)) if depth == 2 else (None, None)
    grid = _start_grid(N, C)
    gnw = None if nw is None else k.new_empty(N, grid[1], K)  # one row per tile of C
    _start_bwd_kernel[grid](
        k, v, G[0], G[-1], _or(nw, k), z, d, _or(gh, k), _or(gd1, k), gd, gk, gv, gz, _or(gz1, k), _or(gm, k),
        _or(gnw, k), C, K, P, DEPTH=depth, NORM=nw is not None, GELU=activation == "gelu",
        BLOCK_C=BLOCK_C, BLOCK_K=_whole(K), BLOCK_P=BLOCK_T, num_warps=NUM_WARPS)
    if depth == 1:
        gG = (outer_sum(k, gz),)
    else:
        gG = (outer_sum(k, gz1), outer_sum(h, gz, gm, d))
    return gk, gv, None if gnw is None else gnw.sum(1), gG


class ChunkStartGrad(torch.autograd.Function):
    """(d,) at depth 1, (h, d1, d) at depth 2, per chunk-block row; N = B * H rows (module docstring)."""

    @staticmethod
    def forward(ctx, activation, k, v, nw, *G):
        h, d1, d, z = start_grad_forward(activation, k, v, nw, G)
        ctx.activation = activation
        ctx.save_for_backward(k, v, nw, z, d, h, *G)
        return (d,) if len(G) == 1 else (h, d1, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        k, v, nw, z, d, h, *G = ctx.saved_tensors
        gh, gd1, gd = (None, None, *grads) if len(G) == 1 else grads
        contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
        gk, gv, gnw, gG = start_grad_backward(ctx.activation, k, v, nw, G, z, d, h, contig(gh), contig(gd1),
                                              contig(gd))
        return None, gk, gv, gnw, *gG


def chunk_start_grad(k, v, G, activation, norm_weight):
    """Drop-in for chunked.py's `chunk_start_grad` at depth 1 and 2 (deeper memories raise).

    k, v (B, H, C, K); G[l] (B or 1, H, D_in, D_out); norm_weight (H, K) or None.
    Returns inputs ([k] or [k, h]) and deltas ([d] or [d1, d]), each (B, H, C, D), fp32."""
    if len(G) > 2:
        raise ValueError(f"the Triton chunk-start gradient supports memory depth 1 and 2; got {len(G)}")
    B, H, C, K = k.shape
    N = B * H
    f32 = lambda t, *shape: t.float().expand(*shape).reshape(N, *shape[2:]).contiguous()  # noqa: E731
    nw = None if norm_weight is None else f32(norm_weight, B, H, K)
    outs = ChunkStartGrad.apply(activation, f32(k, B, H, C, K), f32(v, B, H, C, K), nw,
                                *(f32(g, B, H, *g.shape[2:]) for g in G))
    outs = [o.view(B, H, C, -1) for o in outs]
    return ([k], outs) if len(G) == 1 else ([k, outs[0]], outs[1:])


# ----- 2. the chunk-end update (any depth) -----

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
        b_x = _tile(x_ptr, n, o_c, o_i, m_c, m_i, C, I)  # (BLOCK_C, BLOCK_I)
        b_d = _tile(d_ptr, n, o_c, o_j, m_c, m_j, C, J)  # (BLOCK_C, BLOCK_J)
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
        b_d = _tile(d_ptr, n, o_c, o_j, m_c, m_j, C, J)  # (BLOCK_C, BLOCK_J)
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
        b_x = _tile(x_ptr, n, o_c, o_i, m_c, m_i, C, I)  # (BLOCK_C, BLOCK_I)
        p_g = n * I * J + o_i[:, None] * J + o_j[None, :]                        # (BLOCK_I, BLOCK_J)
        m_g = m_i[:, None] & m_j[None, :]
        b_gs = tl.load(gs_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_gw = tl.load(gw_ptr + p_g, mask=m_g, other=0.0).to(tl.float32)
        b_xs += tl.dot(b_x, b_gs, input_precision="ieee")
        b_xw += tl.dot(b_x, b_gw, input_precision="ieee")
    b_d = _tile(d_ptr, n, o_c, o_j, m_c, m_j, C, J)
    b_cs = tl.load(cs_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_cw = tl.load(cw_ptr + n * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dd = -(b_cs[:, None] * b_xs + b_cw[:, None] * b_xw)
    tl.store(dd_ptr + n * C * J + o_c[:, None] * J + o_j[None, :], b_dd.to(dd_ptr.dtype.element_ty),
             mask=m_c[:, None] & m_j[None, :])
    tl.store(dcs_ptr + n * C + o_c, -tl.sum(b_xs * b_d, axis=1), mask=m_c)
    tl.store(dcw_ptr + n * C + o_c, -tl.sum(b_xw * b_d, axis=1), mask=m_c)


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
