"""Backend dispatch of every public op: `impl="auto"` resolves to a named backend
that is announced once (loom.kernels.dispatch) and that the trainer prints at
start-up; every op runs its reference.py as `impl="reference"`, equal to auto;
an unknown impl fails naming the choices; forcing flash-attn without it fails.
"""
import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.attention import attention
from loom.kernels.linear import linear_attention
from loom.kernels.memory import init_memory_weights, neural_memory
from loom.kernels.rat import rat
from loom.kernels.s2 import s2_attention
from loom.kernels.ssd import ssd
from loom.kernels.swa import sliding_window_attention

B, T, H, K = 2, 19, 2, 8


def _qkv(g):
    return (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(3))


def _calls():
    """op name -> (function, its CPU backend under auto)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(g)
    pos = torch.arange(T).expand(B, T)
    gates = [0.1 * torch.rand(B, T, H, generator=g, dtype=torch.float64) for _ in range(3)]
    w0 = [w.double() for w in init_memory_weights(H, K, 1)]
    f = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    return {
        "attention": (lambda impl: attention(q, k, v, impl=impl), "sdpa"),
        "sliding-window attention": (lambda impl: sliding_window_attention(q, k, v, window=5, impl=impl), "banded"),
        "s2 attention": (lambda impl: s2_attention(q, k, v, block=4, local_blocks=2, vert_stride=2, impl=impl),
                         "blocksparse"),
        "rat": (lambda impl: rat(q, k, v, f, pos, chunk=4, impl=impl), "chunked"),
        "linear attention": (lambda impl: linear_attention(q, k, v, torch.full((H,), 0.1, dtype=torch.float64),
                                                           block=4, impl=impl), "chunked"),
        "neural memory": (lambda impl: neural_memory(q, k, v, *gates, w0, chunk_size=4, impl=impl), "chunked"),
        "ssd": (lambda impl: ssd(q, gates[0], -torch.ones(H, dtype=torch.float64), k[:, :, :1], v[:, :, :1], chunk=4,
                                 impl=impl), "chunked"),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_auto_is_announced_once_and_reference_agrees(op, caplog):
    fn, backend = _calls()[op]
    dispatch.reset()
    with caplog.at_level("INFO", logger="loom.kernels"):
        out = fn("auto")
        fn("auto")
    assert dispatch.chosen()[op] == [backend]
    assert [r.getMessage() for r in caplog.records] == [f"{op}: {backend}"]
    torch.testing.assert_close(fn("reference"), out, rtol=1e-9, atol=1e-9)
    assert dispatch.chosen()[op] == [backend, "reference"]


@pytest.mark.parametrize("op", list(_calls()))
def test_unknown_impl_names_the_choices(op):
    fn, _ = _calls()[op]
    with pytest.raises(ValueError, match="reference"):
        fn("tritn")


def test_forcing_a_missing_backend_fails_clearly():
    q, k, v = _qkv(torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        attention(q, k, v, impl="flash")
