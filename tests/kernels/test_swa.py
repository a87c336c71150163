"""loom.kernels.swa: the banded sliding-window path against the dense masked
reference (fp64, forward, lse and gradients of q, k, v), awkward lengths, GQA,
queries after a cache (S > T), documents, several chunks, fp32 and bf16 error budgets,
a row past the int32 index threshold, and the dispatcher. Cost: ~2 s."""
import math

import pytest
import torch

from loom.kernels.attention.reference import visibility_mask
from loom.kernels.swa import banded_swa, select_swa_impl, sliding_window_attention, swa_reference

# (B, T, S, H, G, K, window)
SHAPES = [
    (2, 100, 100, 4, 2, 16, 7),
    (1, 1, 1, 2, 1, 8, 3),
    (2, 17, 17, 4, 4, 8, 16),
    (2, 63, 63, 6, 2, 12, 5),
    (1, 63, 63, 2, 2, 8, 200),  # window longer than the sequence
    (2, 100, 100, 4, 2, 8, 0),  # the token alone
    (2, 17, 40, 4, 4, 8, 5),  # queries after a cache
    (2, 1, 70, 4, 2, 8, 9),  # one decoding step
    (1, 300, 300, 2, 1, 20, 40),
]


def rand(B, T, S, H, G, K, dtype=torch.float64):
    q = torch.randn(B, T, H, K, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, G, K, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, G, K, dtype=dtype, requires_grad=True)
    return q, k, v


def docs_of(B, S, lens):
    """(B, S) document ids from a list of lengths (the last one takes the rest)."""
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((S - sum(lens),), len(lens))])
    return ids[:S].expand(B, S).clone()


def lse_reference(q, k, window, seq_ids):
    """fp64 log-sum-exp of the masked scores: (B, T, H)."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    mask = visibility_mask(T, S, seq_ids, window, q.device)
    s = torch.einsum("bthk,bshk->bhts", q, k.repeat_interleave(H // G, 2)) / math.sqrt(K)
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1).transpose(1, 2)


def grads(out, inputs, cot):
    return torch.autograd.grad(out, inputs, cot)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_docs", [False, True])
def test_banded_equals_reference(shape, with_docs):
    B, T, S, H, G, K, w = shape
    q, k, v = rand(B, T, S, H, G, K)
    seq = docs_of(B, S, [S // 3, S // 4]) if with_docs else None
    o, lse = sliding_window_attention(q, k, v, window=w, seq_ids=seq, impl="banded", return_lse=True)
    ref = swa_reference(q, k, v, window=w, seq_ids=seq)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_reference(q, k, w, seq), rtol=0, atol=1e-12)
    do, dl = torch.randn_like(o), torch.randn_like(lse)
    got = grads((o, lse), (q, k, v), (do, dl))
    want = grads((ref, lse_reference(q, k, w, seq)), (q, k, v), (do, dl))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("block,chunk", [(16, 1), (8, 3), (32, None)])
def test_block_and_chunk_sizes_do_not_matter(block, chunk):
    q, k, v = rand(2, 113, 113, 4, 2, 8)
    seq = docs_of(2, 113, [40, 30])
    o, _ = banded_swa(q, k, v, window=21, seq_ids=seq, block=block, chunk=chunk)
    ref = swa_reference(q, k, v, window=21, seq_ids=seq)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-12)
    do = torch.randn_like(o)
    for a, b in zip(grads(o, (q, k, v), do), grads(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_packed_equals_separate_documents():
    lens = [13, 40, 1, 29]
    q, k, v = rand(1, sum(lens), sum(lens), 4, 2, 8)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    o = sliding_window_attention(q, k, v, window=9, seq_ids=seq)
    do = torch.randn_like(o)
    dq, dk, dv = grads(o, (q, k, v), do)
    s = 0
    for n in lens:
        part = [t[:, s:s + n].detach().requires_grad_() for t in (q, k, v)]
        alone = sliding_window_attention(*part, window=9)
        torch.testing.assert_close(o[:, s:s + n], alone, rtol=0, atol=1e-12)
        for full, mine in zip((dq, dk, dv), grads(alone, part, do[:, s:s + n])):
            torch.testing.assert_close(full[:, s:s + n], mine, rtol=0, atol=1e-12)
        s += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_within_budget(dtype):
    """fp32/bf16 banded vs an fp64 truth: within a small multiple of the error that
    PyTorch's own SDPA in that dtype makes on the same problem, per output and gradient."""
    q, k, v = rand(2, 257, 257, 4, 2, 32)
    do = torch.randn(2, 257, 4, 32, dtype=torch.float64)
    truth = swa_reference(q, k, v, window=50)
    t_grads = grads(truth, (q, k, v), do)
    q32, k32, v32 = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    mine = sliding_window_attention(q32, k32, v32, window=50, impl="banded")
    base = swa_reference(q32, k32, v32, window=50)
    assert not mine.isnan().any()
    assert (mine.double() - truth).abs().max() <= 4 * (base.double() - truth).abs().max() + torch.finfo(dtype).eps
    for a, b, t in zip(grads(mine, (q32, k32, v32), do.to(dtype)), grads(base, (q32, k32, v32), do.to(dtype)), t_grads):
        assert (a.double() - t).abs().max() <= 4 * (b.double() - t).abs().max() + torch.finfo(dtype).eps


def test_long_row_past_int32_offsets():
    """A 2^17 + 5 token row: the last queries equal the reference computed on
    the only keys they can see (int64 index arithmetic throughout)."""
    T, w, n = (1 << 17) + 5, 24, 40
    q, k, v = (torch.randn(1, T, 1, 4, dtype=torch.float64) for _ in range(3))
    o = sliding_window_attention(q, k, v, window=w)
    ref = swa_reference(q[:, -n:], k[:, -(n + w):], v[:, -(n + w):], window=w)
    torch.testing.assert_close(o[:, -n:], ref, rtol=0, atol=1e-12)


def test_dispatch_and_errors():
    q, k, v = rand(1, 5, 5, 2, 1, 4)
    assert select_swa_impl(q, 5, None, False) == "banded"
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=2, impl="sdpa"),
                               sliding_window_attention(q, k, v, window=2), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown sliding-window impl"):
        sliding_window_attention(q, k, v, window=2, impl="triton")
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="seq_ids"):
        sliding_window_attention(q, k, v, window=2, seq_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="incompatible"):
        sliding_window_attention(q, k[:, :3], v[:, :3], window=2)
