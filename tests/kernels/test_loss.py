"""Fused chunked cross-entropy (kernels/loss) equals F.cross_entropy on the full
logits: loss and gradients of the hidden states and the head weight, with
ignored labels (some, all), reductions sum and mean, chunks that do not divide
N, fp32 and fp64, and no gradient wanted (evaluation); the dispatcher picks
"fused" on CPU and refuses "liger" without CUDA; Liger-Kernel's path is
compared with the reference where CUDA and liger-kernel exist.
"""
import pytest
import torch
import torch.nn.functional as F

from loom.kernels import dispatch
from loom.kernels.loss import _have_liger, linear_cross_entropy


def _case(N, D, V, dtype, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignored] = -100
    return h, w, y


def _full(h, w, y, reduction):
    return F.cross_entropy(F.linear(h, w), y, ignore_index=-100, reduction=reduction)


def _loss_and_grads(fn, h, w, y):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(h, w, y)
    (loss * 1.7).backward()  # an incoming gradient other than 1
    return loss, h.grad, w.grad


@pytest.mark.parametrize("N,D,V,chunk", [(50, 16, 97, 7), (64, 8, 33, 64), (1, 4, 5, 1), (130, 12, 300, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_full_cross_entropy(N, D, V, chunk, reduction, dtype):
    h, w, y = _case(N, D, V, dtype)
    want = _loss_and_grads(lambda a, b, c: _full(a, b, c, reduction), h, w, y)
    got = _loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, reduction=reduction, chunk=chunk),
                          h, w, y)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for x, ref in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, ref, **tol)


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w, y = _case(20, 8, 11, torch.float64)
    y[:] = -100
    loss, gh, gw = _loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk=6), h, w, y)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_no_grad_and_partial_grads():
    h, w, y = _case(40, 8, 23, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=9), _full(h, w, y, "mean"))
    hh = h.clone().requires_grad_(True)  # the head frozen: only dh
    linear_cross_entropy(hh, w, y, chunk=9).backward()
    hr = h.clone().requires_grad_(True)
    _full(hr, w, y, "mean").backward()
    torch.testing.assert_close(hh.grad, hr.grad)


def test_dispatch_and_errors():
    dispatch.reset()
    h, w, y = _case(10, 4, 7, torch.float32)
    linear_cross_entropy(h, w, y)
    assert dispatch.chosen()["cross-entropy"] == ["fused"]
    with pytest.raises(RuntimeError, match="liger"):
        linear_cross_entropy(h, w, y, impl="liger")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match=r"h \(N, D\)"):
        linear_cross_entropy(h[None], w, y)


@pytest.mark.skipif(not (torch.cuda.is_available() and _have_liger()), reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_equals_reference_on_cuda(reduction):
    h, w, y = (t.cuda() for t in _case(300, 64, 1000, torch.float32))
    want = _loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, reduction=reduction, impl="reference"),
                           h, w, y)
    got = _loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, reduction=reduction, impl="liger"), h, w, y)
    for x, ref in zip(got, want):
        torch.testing.assert_close(x.float(), ref.float(), rtol=1e-4, atol=1e-4)
