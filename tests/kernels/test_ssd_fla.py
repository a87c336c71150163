"""ssd(impl="fla") (fla-core's chunk_simple_gla with a per-token log decay) against the chunked
op: output, final state and the gradients of x, dt, A, B, C, D, dt_bias and the initial
state, with two groups, document starts mid-row and at a row start, an initial state, an
awkward length (T = 77); and the cu_seqlens form with per-sequence states.

Skipped without CUDA, and only for that reason: fla-core's kernels go through Triton's
autotuner, which needs a GPU driver even under TRITON_INTERPRET=1. The mapping (q = C,
k = B, v = dt x, g = dt A, the (N, P) state transposed, document starts -> cu_seqlens) is in
kernels/ssd/fla.py.
"""
import pytest
import torch

from loom.kernels.ssd import ssd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla-core's kernels need a CUDA driver")
H, P, G, N = 4, 32, 2, 16


def _inputs(Bt, T, S):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(x=r(Bt, T, H, P), dt=r(Bt, T, H), A=-2 * torch.rand(H, device="cuda", generator=g),
                B=r(Bt, T, G, N) * N ** -0.5, C=r(Bt, T, G, N) * N ** -0.5, D=r(H), dt_bias=r(H) * 0.5,
                initial_state=r(S, H, P, N))


def _compare(inputs, **kw):
    results = {}
    for impl in ("chunked", "fla"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, st = ssd(**leaves, return_state=True, impl=impl, **kw)
        w = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        grads = torch.autograd.grad((y * w).sum() + st.sum(), list(leaves.values()))
        results[impl] = [y, st, *grads]
    names = ["y", "state"] + [f"d{k}" for k in inputs]
    for name, a, b in zip(names, results["fla"], results["chunked"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-3, atol=3e-3 * max(1.0, float(b.abs().max())),
                                   msg=name)


def test_fla_matches_chunked_with_documents_and_state():
    pytest.importorskip("fla")
    starts = torch.zeros(2, 77, dtype=torch.bool, device="cuda")
    starts[0, 30] = starts[1, 0] = starts[1, 50] = True
    _compare(_inputs(2, 77, 2), doc_starts=starts, dt_limit=(0.01, 3.0))


def test_fla_matches_chunked_with_cu_seqlens():
    pytest.importorskip("fla")
    cu = torch.tensor([0, 13, 14, 70, 77], device="cuda")
    _compare(_inputs(1, 77, 4), cu_seqlens=cu)
