"""RAT's intra-chunk gated recurrence as a Triton kernel (the CUDA path of step 1 in chunked.py).

Legend: B batch, T tokens, D channels (all of [k ; v] x H x K, flattened), BLOCK_D channels per program.

    s_t = a_t * s_{t-1} + b_t          (a_t = 0 where a chunk or document starts; s = 0 before t = 0)

One program owns BLOCK_D channels of one row and walks the T tokens in order, keeping s in
registers: one read of a and b and one write of s per element, where the doubling scan of
chunked.py makes ceil(log2 L) passes over memory. The backward pass is the same walk from the
right on the incoming gradient:

    lam_t = ds_t + a_{t+1} lam_{t+1},    db_t = lam_t,    da_t = lam_t s_{t-1}

Exact for any run length (no `span` needed). Accumulation in fp32 whatever the storage dtype.
Offsets are int64 (row * T * D passes 2^31 at long contexts). Fixed launch configuration
(BLOCK_D = 128, 4 warps): the autotuner needs a GPU driver, so the interpreter tests
(TRITON_INTERPRET=1) run exactly what a GPU runs.

Layout: kernel -> launcher -> autograd.Function (`TritonSegmentScan`, a drop-in for
chunked.SegmentScan).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128
NUM_WARPS = 4


@triton.jit
def _scan_fwd_kernel(a_ptr, b_ptr, s_ptr, T, D, BLOCK: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    base = i_b.to(tl.int64) * T * D
    b_s = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(T):
        p = base + t * D + o_d
        b_a = tl.load(a_ptr + p, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(b_ptr + p, mask=m_d, other=0.0).to(tl.float32)
        b_s = b_a * b_s + b_x
        tl.store(s_ptr + p, b_s.to(s_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _scan_bwd_kernel(a_ptr, s_ptr, ds_ptr, da_ptr, db_ptr, T, D, BLOCK: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    base = i_b.to(tl.int64) * T * D
    b_lam = tl.zeros([BLOCK], dtype=tl.float32)
    b_a_next = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        p = base + t * D + o_d
        b_ds = tl.load(ds_ptr + p, mask=m_d, other=0.0).to(tl.float32)
        b_lam = b_ds + b_a_next * b_lam
        tl.store(db_ptr + p, b_lam.to(db_ptr.dtype.element_ty), mask=m_d)
        m_prev = m_d & ((tl.zeros([BLOCK], dtype=tl.int32) + t) > 0)   # s_{-1} = 0
        b_prev = tl.load(s_ptr + p - D, mask=m_prev, other=0.0).to(tl.float32)
        tl.store(da_ptr + p, (b_lam * b_prev).to(da_ptr.dtype.element_ty), mask=m_d)
        b_a_next = tl.load(a_ptr + p, mask=m_d, other=0.0).to(tl.float32)


def _grid(B: int, D: int):
    return (B, triton.cdiv(D, BLOCK_D))


def scan_forward(a_BTD: torch.Tensor, b_BTD: torch.Tensor) -> torch.Tensor:
    """s (B, T, D) from contiguous a, b (B, T, D)."""
    B, T, D = b_BTD.shape
    s = torch.empty_like(b_BTD)
    _scan_fwd_kernel[_grid(B, D)](a_BTD, b_BTD, s, T, D, BLOCK=BLOCK_D, num_warps=NUM_WARPS)
    return s


def scan_backward(a_BTD, s_BTD, ds_BTD) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) (B, T, D) of the scan, given its output s and the incoming gradient ds."""
    B, T, D = s_BTD.shape
    da, db = torch.empty_like(a_BTD), torch.empty_like(s_BTD)
    _scan_bwd_kernel[_grid(B, D)](a_BTD, s_BTD, ds_BTD, da, db, T, D, BLOCK=BLOCK_D, num_warps=NUM_WARPS)
    return da, db


class TritonSegmentScan(torch.autograd.Function):
    """s = scan(a, b); a (B, T, ...) broadcastable to b (B, T, ...). Same contract as
    chunked.SegmentScan (`span` is accepted and unused: the sequential walk is exact)."""

    @staticmethod
    def forward(ctx, a, b, span: int):
        shape = b.shape
        a_full = a.expand(shape).contiguous().view(shape[0], shape[1], -1)  # (B, T, D)
        s = scan_forward(a_full, b.contiguous().view(shape[0], shape[1], -1))
        ctx.save_for_backward(a_full, s)
        ctx.a_shape = a.shape
        return s.view(shape)

    @staticmethod
    def backward(ctx, ds):
        a_full, s = ctx.saved_tensors
        da, db = scan_backward(a_full, s, ds.contiguous().view(s.shape))
        shape = ds.shape
        return da.view(shape).sum_to_size(ctx.a_shape), db.view(shape), None
