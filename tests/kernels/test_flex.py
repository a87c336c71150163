"""FlexAttention backends on CPU (the CUDA path of attention, swa, s2 and RAT's chunk-state
attention): PyTorch compiles FlexAttention's forward on CPU (inference, no lse) but not its
backward, so here

- the compiled forward equals each op's reference on awkward shapes (T = 63 or 45, head dim 24,
  grouped heads) with packed documents, with and without a cache (T < S);
- the BlockMask equals the dense pattern reduced to its 128 x 128 tiles (s2: per head), and is
  built once per layout (cached);
- the gradients of every input equal the reference's through the eager FlexAttention, which
  evaluates the same mask_mod (forced by requires_grad on CPU), and the lse through it too.
Each compiled call of a new mask compiles for 10-30 s: the fast tier compiles two (s2, RAT;
~60 s in all), the slow tier adds attention, swa and a second s2 shape.
"""
import pytest
import torch

from loom.kernels.attention import attention
from loom.kernels.attention import flex as flex_mod
from loom.kernels.rat import rat
from loom.kernels.s2 import s2_attention, s2_mask
from loom.kernels.s2.flex import s2_block_mask
from loom.kernels.swa import sliding_window_attention

TOL = dict(rtol=2e-5, atol=2e-5)


def packed_ids(B, S):
    """Row 0 one document; row 1 three, the cuts off every tile boundary."""
    ids = torch.zeros(B, S, dtype=torch.long)
    ids[1, 17:] = 1
    ids[1, 40:] = 2
    return ids


def qkv(B, T, S, H, G, K, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g)
    k, v = (torch.randn(B, S, G, K, generator=g) for _ in range(2))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def grads(out, inputs):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("T,S,window", [(63, 63, None), (45, 63, 20)])
def test_attention_and_swa_compiled_forward_equal_reference(T, S, window):
    B, H, G, K = 2, 4, 2, 24
    q, k, v = qkv(B, T, S, H, G, K)
    ids = packed_ids(B, S)
    with torch.no_grad():
        if window is None:
            ref = attention(q, k, v, seq_ids=ids, impl="reference")
            out = attention(q, k, v, seq_ids=ids, impl="flex")
        else:
            ref = sliding_window_attention(q, k, v, window=window, seq_ids=ids, impl="reference")
            out = sliding_window_attention(q, k, v, window=window, seq_ids=ids, impl="flex")
    torch.testing.assert_close(out, ref, **TOL)


def test_attention_flex_gradients_and_lse_through_eager_mask():
    B, T, H, G, K = 2, 63, 4, 2, 24
    ids = packed_ids(B, T)
    q, k, v = qkv(B, T, T, H, G, K, grad=True)
    o, lse = sliding_window_attention(q, k, v, window=9, seq_ids=ids, impl="flex", return_lse=True)
    o_ref, lse_ref = sliding_window_attention(q, k, v, window=9, seq_ids=ids, impl="reference", return_lse=True)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(lse, lse_ref, **TOL)
    for g, g_ref in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
        torch.testing.assert_close(g, g_ref, **TOL)


S2 = dict(block=8, local_blocks=2, vert_stride=3)


@pytest.mark.parametrize("T,S,H,G", [(63, 63, 4, 2), pytest.param(45, 63, 4, 4, marks=pytest.mark.slow)])
def test_s2_compiled_forward_equals_reference(T, S, H, G):
    B, K = 2, 24
    q, k, v = qkv(B, T, S, H, G, K)
    ids = packed_ids(B, S)
    with torch.no_grad():
        ref = s2_attention(q, k, v, seq_ids=ids, impl="reference", **S2)
        out = s2_attention(q, k, v, seq_ids=ids, impl="flex", **S2)
    torch.testing.assert_close(out, ref, **TOL)


def test_s2_gradients_and_lse_through_eager_mask():
    B, T, H, G, K = 2, 63, 4, 2, 24
    ids = packed_ids(B, T)
    q, k, v = qkv(B, T, T, H, G, K, grad=True)
    o, lse = s2_attention(q, k, v, seq_ids=ids, impl="flex", return_lse=True, **S2)
    o_ref, lse_ref = s2_attention(q, k, v, seq_ids=ids, impl="reference", return_lse=True, **S2)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(lse, lse_ref, **TOL)
    for g, g_ref in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
        torch.testing.assert_close(g, g_ref, **TOL)


def test_s2_block_mask_equals_dense_pattern_by_tile_and_is_cached():
    """At 300 tokens (3 x 3 tiles of 128), block 16, stride 4: every head keeps the tiles its
    pattern touches and no other; a second call with an equal layout returns the same object."""
    B, H, T = 2, 4, 300
    offs = torch.tensor([0, 1, 2, 3])
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[1, 150:] = 1
    from loom.kernels.s2.reference import doc_positions

    pos = doc_positions(ids, B, T, None)
    kw = dict(block=16, local_blocks=2, vert_stride=4, head_offsets=offs)
    flex_mod.clear_block_masks()
    bm = s2_block_mask(B, H, T, T, seq_ids=ids, position_ids=pos, device="cpu", **kw)
    dense = s2_mask(T, T, seq_ids=ids, position_ids=pos, **kw)  # (B, H, T, S)
    n = -(-T // 128)
    padded = torch.zeros(B, H, n * 128, n * 128, dtype=torch.bool)
    padded[..., :T, :T] = dense
    tiles = padded.view(B, H, n, 128, n, 128).any(5).any(3)  # (B, H, n, n)
    assert torch.equal(bm.to_dense().bool(), tiles)
    assert not bool(tiles.all())  # the pattern does skip tiles at this size
    assert s2_block_mask(B, H, T, T, seq_ids=ids.clone(), position_ids=pos.clone(), device="cpu", **kw) is bm


def _rat_args(T, grad):
    g = torch.Generator().manual_seed(0)
    B, G, H, K = 2, 1, 2, 8
    q, k = (torch.randn(B, T, G, K, generator=g) for _ in range(2))
    v, f = torch.randn(B, T, H, K, generator=g), 2 * torch.randn(B, T, H, K, generator=g)
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(11), torch.arange(T - 11)])])
    return [x.requires_grad_(grad) for x in (q, k, v, f)], pos


def test_rat_flex_compiled_forward_equals_chunked():
    (q, k, v, f), pos = _rat_args(45, grad=False)
    with torch.no_grad():
        ref = rat(q, k, v, f, pos, chunk=4, impl="chunked")
        out = rat(q, k, v, f, pos, chunk=4, impl="flex")
    torch.testing.assert_close(out, ref, **TOL)


def test_rat_flex_gradients_and_stats_through_eager_mask():
    inputs, pos = _rat_args(45, grad=True)
    o, st = rat(*inputs, pos, chunk=4, impl="flex", return_stats=True)
    o_ref, st_ref = rat(*inputs, pos, chunk=4, impl="chunked", return_stats=True)
    torch.testing.assert_close(o, o_ref, **TOL)
    for name in ("lse", "local", "first"):
        torch.testing.assert_close(st[name], st_ref[name], **TOL)
    for g, g_ref in zip(grads(o, inputs), grads(o_ref, inputs)):
        torch.testing.assert_close(g, g_ref, **TOL)
