"""bf16 inputs through every op (the dtype the mixers feed under autocast): fp32 accumulation
inside the op keeps its error against the fp64 reference within a small multiple of the
error of the same computation written as plain PyTorch in bf16 (STYLE.md rule 6), for the
output and the gradients of q, k, v; no NaNs. Ops: attention (sdpa), sliding-window
(banded), s2 (blocksparse), rat (chunked), linear (chunked), neural memory (chunked).
Fast tier (~10 s).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from loom.kernels.attention import attention, visibility_mask
from loom.kernels.linear import linear_attention
from loom.kernels.linear.reference import linear_attention_reference
from loom.kernels.memory import init_memory_weights, neural_memory
from loom.kernels.memory.reference import neural_memory_naive_chunks
from loom.kernels.rat import rat
from loom.kernels.rat.reference import rat_reference
from loom.kernels.s2 import default_head_offsets, s2_attention, s2_mask
from loom.kernels.swa import sliding_window_attention

BF16, F64 = torch.bfloat16, torch.float64
B, T, H, K = 2, 40, 2, 16
S2 = dict(block=4, local_blocks=2, vert_stride=3)


def plain_attention(q, k, v, mask):
    """Masked softmax attention written plainly, every step in the inputs' dtype. mask (B|1, H|1, T, S)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return (torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vh).transpose(1, 2)


def _ids():
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[1, 13:] = 1
    return ids


def _attention_ops():
    ids = _ids()
    offs = default_head_offsets(H, H, S2["vert_stride"])
    s2m = s2_mask(T, T, head_offsets=offs, seq_ids=ids, **S2)
    return {
        "attention": (lambda q, k, v: attention(q, k, v, seq_ids=ids),
                      lambda q, k, v: plain_attention(q, k, v, visibility_mask(T, T, ids, None, q.device))),
        "swa": (lambda q, k, v: sliding_window_attention(q, k, v, window=7, seq_ids=ids),
                lambda q, k, v: plain_attention(q, k, v, visibility_mask(T, T, ids, 7, q.device))),
        "s2": (lambda q, k, v: s2_attention(q, k, v, seq_ids=ids, head_offsets=offs, **S2),
               lambda q, k, v: plain_attention(q, k, v, s2m)),
    }


def _recurrent_ops():
    g = torch.Generator().manual_seed(3)
    f = 2 * torch.randn(B, T, H, K, generator=g, dtype=F64)
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(13), torch.arange(T - 13)])])
    decay = torch.linspace(0.05, 0.5, H, dtype=F64)
    reset = pos == 0
    gates = (0.2 * torch.rand(B, T, H, generator=g, dtype=F64), 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=F64),
             0.05 * torch.rand(B, T, H, generator=g, dtype=F64))
    torch.manual_seed(0)
    w0 = [w.double() for w in init_memory_weights(H, K, 2, expansion=2)]
    cast = lambda xs, dt: [x.to(dt) for x in xs]  # noqa: E731
    return {
        "rat": (lambda q, k, v: rat(q, k, v, f.to(q.dtype), pos, chunk=4),
                lambda q, k, v: rat_reference(q, k, v, f.to(q.dtype), pos, chunk=4)[0]),
        "linear": (lambda q, k, v: linear_attention(q, k, v, decay.to(q.dtype), block=8, reset=reset, scale=K ** -0.5),
                   lambda q, k, v: linear_attention_reference(q, k, v, decay.to(q.dtype), reset=reset,
                                                              scale=K ** -0.5)[0]),
        "memory": (lambda q, k, v: neural_memory(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                 *cast(gates, q.dtype), cast(w0, q.dtype), chunk_size=8, reset=reset),
                   lambda q, k, v: neural_memory_naive_chunks(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                              *cast(gates, q.dtype), cast(w0, q.dtype), chunk_size=8,
                                                              reset=reset)[0]),
    }


OPS = {**_attention_ops(), **_recurrent_ops()}


def _run(fn, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, generator=g, dtype=F64).to(dtype).requires_grad_() for _ in range(3))
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(out.dtype)
    return (out,) + torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))


@pytest.mark.parametrize("op", list(OPS))
def test_bf16_error_within_plain_bf16_error(op):
    fn, plain = OPS[op]
    ref = _run(plain, F64)
    got = _run(fn, BF16)
    base = _run(plain, BF16)
    for name, r, x, b in zip(("out", "dq", "dk", "dv"), ref, got, base):
        assert x.dtype == BF16, f"{op} {name}: {x.dtype}"
        assert not torch.isnan(x).any(), f"{op} {name}: NaN"
        err = (x.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        rounding = 2 ** -8 * r.abs().max().item()
        assert err <= 2 * base_err + rounding, f"{op} {name}: bf16 op error {err:.3g}, plain bf16 {base_err:.3g}"
