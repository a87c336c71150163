"""ShortConv (models/mixers/conv.py: in-place tap accumulation, taps into an earlier document
subtracted at document starts) against the per-token definition, values and every gradient."""
import pytest
import torch

from loom.models.mixers.conv import ShortConv


def per_token(x, cache, w, bias, pos):
    """y_t = sum_{j < W, j <= pos_t} w[:, j] * cat(cache, x)[t + W-1 - j] (+ bias), token by token."""
    B, T, C = x.shape
    W = w.shape[1]
    xx = torch.cat([cache, x], dim=1)
    rows = []
    for b in range(B):
        ys = []
        for t in range(T):
            y = torch.zeros(C, dtype=x.dtype)
            for j in range(W):
                if j <= int(pos[b, t]):
                    y = y + w[:, j] * xx[b, t + W - 1 - j]
            ys.append(y if bias is None else y + bias)
        rows.append(torch.stack(ys))
    return torch.stack(rows)


def positions(T: int, docs: list[int], start: int = 0) -> torch.Tensor:
    out = [torch.arange(n) for n in docs]
    return torch.cat([torch.arange(start, start + T - sum(docs)), *out]) if sum(docs) < T else torch.cat(out)[:T]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("taps", [2, 4])
def test_short_conv_equals_per_token_definition(bias, taps):
    """Packed documents (one of one token), a cache, a row continuing mid-document: fp64 values and
    the gradients of x, the cache, the weight and the bias."""
    torch.manual_seed(0)
    conv = ShortConv(6, taps, bias=bias).double()
    conv.reset_parameters()
    T = 23
    x = torch.randn(2, T, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(1), torch.arange(2), torch.arange(15)]),
                       torch.arange(7, 7 + T)])
    cache = torch.randn(2, taps - 1, 6, dtype=torch.float64, requires_grad=True)
    y, new_cache = conv(x, pos, cache)
    ref = per_token(x, cache, conv.weight, conv.bias, pos)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_cache, x[:, T - (taps - 1):], rtol=0, atol=0)
    dy = torch.randn_like(y)
    params = [x, cache, conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(ref, params, dy)
    for name, a, b in zip(["x", "cache", "weight", "bias"], got, want):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_short_conv_decoding_and_lengths():
    """Decoding one token at a time (T < W-1) from the cache equals the full forward, and
    `lengths` keeps the W-1 inputs before each row's first padding slot."""
    torch.manual_seed(1)
    conv = ShortConv(5, 4, bias=True).double()
    conv.reset_parameters()
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    pos = torch.arange(9)[None]
    full, _ = conv(x, pos)
    cache, outs = None, []
    for t in range(9):
        y, cache = conv(x[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    _, kept = conv(x, pos, None, lengths=torch.tensor([6]))
    torch.testing.assert_close(kept, x[:, 3:6], rtol=0, atol=0)


def test_short_conv_bf16_accumulates_in_fp32():
    torch.manual_seed(2)
    conv = ShortConv(64, 4, bias=True)
    conv.reset_parameters()
    x = torch.randn(2, 300, 64)
    pos = positions(300, [100, 1, 199])[None].expand(2, -1)
    ref, _ = conv.double()(x.double(), pos)
    y, _ = conv.bfloat16()(x.bfloat16(), pos)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
