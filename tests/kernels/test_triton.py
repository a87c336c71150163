"""Triton kernels under the interpreter (TRITON_INTERPRET=1, no GPU): each against the PyTorch
form it replaces, forward and every gradient, at tiny shapes (fast tier, ~12 s in all on one thread).

- rat/triton.py: the gated scan kernel == chunked.SegmentScan (awkward T, broadcast gate, restarts),
  and rat(impl="triton") == rat(impl="chunked") for the output, stats, state and the gradients
  of q, k, v, f on packed rows with documents starting mid-chunk;
- memory/triton.py: the chunk-start gradient == chunked.chunk_start_grad for depth 1 and 2, with
  and without the output norm, GELU and SiLU, at awkward sides (K, F not powers of two, one above
  the P tile; C not a multiple of BLOCK_C; W0 shared over the batch; padding slots): h, d1, d and
  the gradients of k, v, every weight and the norm weight; the fused chunk-end update ==
  chunked.chunk_end_update for both coefficient layouts and awkward sides (I, J not multiples of
  the tiles, C not a multiple of BLOCK_C); and neural_memory(impl="triton") == impl="chunked"
  (checking that every memory kernel ran) for depth 1 and 2, both read-outs, both momentum steps,
  with and without the norm, both activations, packed documents (resets) and masked tokens:
  output, final state and gradients of q, k, v, the gates, W0 and the norm weight. Depth 3 keeps
  the PyTorch chunk-start gradient and says so.
Tolerances follow STYLE.md 6: the kernels run in fp32, so their error against the fp64 PyTorch
form must stay within a small multiple of the fp32 PyTorch form's own error (+ a rounding term).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is decorated (also tests/kernels/conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from loom.kernels import dispatch  # noqa: E402
from loom.kernels.memory import init_memory_weights, neural_memory  # noqa: E402
from loom.kernels.memory import triton as memory_triton  # noqa: E402
from loom.kernels.memory.chunked import chunk_end_update, chunk_start_grad  # noqa: E402
from loom.kernels.memory.triton import chunk_end_update as chunk_end_update_triton  # noqa: E402
from loom.kernels.memory.triton import chunk_start_grad as chunk_start_grad_triton  # noqa: E402
from loom.kernels.rat import rat  # noqa: E402
from loom.kernels.rat.chunked import SegmentScan  # noqa: E402
from loom.kernels.rat.triton import TritonSegmentScan  # noqa: E402

F64 = torch.float64


def assert_within_baseline(kernel, ref64, base32, name, factor=4.0, floor=1e-6):
    """|kernel - ref64| <= factor * |base32 - ref64| + floor, elementwise max; no NaNs."""
    assert not torch.isnan(kernel).any(), f"{name}: NaN"
    err = (kernel.double() - ref64).abs().max().item()
    base = (base32.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= factor * base + floor * max(scale, 1.0), f"{name}: kernel error {err:.3g}, fp32 baseline {base:.3g}"


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


# ----- RAT scan -----

@pytest.mark.parametrize("T,span", [(1, 4), (13, 4), (37, 16)])
def test_scan_kernel_matches_segment_scan(T, span):
    B, H, K = 2, 3, 5
    a = torch.rand(B, T, 1, H, K, dtype=F64)
    a[:, ::span] = 0  # a restart at least every `span` tokens, as RAT guarantees
    a[1, 3 % T] = 0
    b = torch.randn(B, T, 2, H, K, dtype=F64)
    ref_in = [x.clone().requires_grad_() for x in (a, b)]
    s_ref = SegmentScan.apply(*ref_in, span)
    g_ref = _grads(s_ref, ref_in)
    base_in = [x.float().requires_grad_() for x in (a, b)]
    s_base = SegmentScan.apply(*base_in, span)
    g_base = _grads(s_base, base_in)
    tri_in = [x.float().requires_grad_() for x in (a, b)]
    s_tri = TritonSegmentScan.apply(*tri_in, span)
    g_tri = _grads(s_tri, tri_in)
    assert s_tri.shape == s_ref.shape
    assert_within_baseline(s_tri, s_ref, s_base, "s")
    for name, gt, gr, gb in zip(("da", "db"), g_tri, g_ref, g_base):
        assert gt.shape == gr.shape
        assert_within_baseline(gt, gr, gb, name)


def _rat_inputs(T, dtype):
    g = torch.Generator().manual_seed(0)
    B, G, H, K = 2, 1, 2, 8
    q, k = (torch.randn(B, T, G, K, generator=g, dtype=F64) for _ in range(2))
    v, f = torch.randn(B, T, H, K, generator=g, dtype=F64), 2 * torch.randn(B, T, H, K, generator=g, dtype=F64)
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(5), torch.arange(T - 5)])])
    return [x.to(dtype).requires_grad_() for x in (q, k, v, f)], pos


def test_rat_triton_backend_matches_chunked():
    T, L = 21, 4
    outs = {}
    for impl, dtype in (("chunked", F64), ("chunked", torch.float32), ("triton", torch.float32)):
        inputs, pos = _rat_inputs(T, dtype)
        o, stats, state = rat(*inputs, pos, chunk=L, impl=impl, return_stats=True, return_state=True)
        outs[impl, dtype] = (o, stats["lse"], state["k_run"], state["v_run"]) + _grads(o, inputs)
    names = ("o", "lse", "k_run", "v_run", "dq", "dk", "dv", "df")
    for name, tri, ref, base in zip(names, outs["triton", torch.float32], outs["chunked", F64],
                                    outs["chunked", torch.float32]):
        assert_within_baseline(tri, ref, base, name)


# ----- Titans memory chunk update -----

@pytest.mark.parametrize("I,J,C,cols", [(8, 8, 4, 2), (20, 40, 19, 2), (40, 20, 5, 1)])
def test_chunk_end_kernel_matches_pytorch(I, J, C, cols):
    g = torch.Generator().manual_seed(0)
    B, H = 2, 3
    x, d = torch.randn(B, H, C, I, generator=g, dtype=F64), torch.randn(B, H, C, J, generator=g, dtype=F64)
    end = torch.rand(B, H, C, cols, generator=g, dtype=F64)
    p, beta, bS = (torch.rand(B, H, 1, 1, generator=g, dtype=F64) for _ in range(3))
    S, W = torch.randn(B, H, I, J, generator=g, dtype=F64), torch.randn(1, H, I, J, generator=g, dtype=F64)
    results = {}
    for name, fn, dtype in (("ref", chunk_end_update, F64), ("base", chunk_end_update, torch.float32),
                            ("tri", chunk_end_update_triton, torch.float32)):
        inputs = [t.to(dtype).requires_grad_() for t in (x, d, end, p, beta, bS, S, W)]
        S_end, W_end = fn(*inputs)
        grads = _grads(torch.stack([S_end, W_end]), inputs)
        results[name] = (S_end, W_end) + grads
    names = ("S_end", "W_end", "dx", "dd", "dend", "dp", "dbeta", "dbS", "dS", "dW")
    for name, tri, ref, base in zip(names, results["tri"], results["ref"], results["base"]):
        assert tri.shape == ref.shape, name
        assert_within_baseline(tri, ref, base, name)


@pytest.mark.parametrize("depth,K,F_,C,norm,activation", [
    (1, 40, None, 19, True, "gelu"), (1, 12, None, 5, False, "silu"),
    (2, 12, 40, 19, True, "gelu"), (2, 20, 24, 17, False, "silu")])
def test_chunk_start_grad_kernel_matches_pytorch(depth, K, F_, C, norm, activation):
    """K and the hidden width F_ not powers of two, one of them above the P tile (32); C above BLOCK_C and
    not a multiple of it; the first weight shared over the batch (1, H, ...) as W0 is in a first block."""
    g = torch.Generator().manual_seed(0)
    B, H = 2, 3
    k, v = (torch.randn(B, H, C, K, generator=g, dtype=F64) / K ** 0.5 for _ in range(2))
    k[1, :, -2:] = v[1, :, -2:] = 0  # padding slots of a short block
    sizes = [K] + [F_] * (depth - 1) + [K]
    G = [torch.randn(1 if l == 0 else B, H, a, b, generator=g, dtype=F64) / a ** 0.5
         for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    nw = 1 + 0.1 * torch.randn(H, K, generator=g, dtype=F64)
    results = {}
    for name, fn, dtype in (("ref", chunk_start_grad, F64), ("base", chunk_start_grad, torch.float32),
                            ("tri", chunk_start_grad_triton, torch.float32)):
        inputs = [t.to(dtype).requires_grad_() for t in [k, v] + G + ([nw] if norm else [])]
        xs, ds = fn(inputs[0], inputs[1], inputs[2:2 + depth], activation, inputs[-1] if norm else None)
        outs = xs[1:] + ds                      # (h,) d1, d at depth 2; d at depth 1
        results[name] = outs + list(_grads(torch.cat([o.flatten() for o in outs]), inputs))
    n_out = 1 if depth == 1 else 3
    names = ["h", "d1", "d"][-n_out:] + ["dk", "dv"] + [f"dG{l + 1}" for l in range(depth)] + ["dgamma"] * norm
    assert len(results["tri"]) == len(names)
    for name, tri, ref, base in zip(names, results["tri"], results["ref"], results["base"]):
        assert tri.shape == ref.shape, name
        assert_within_baseline(tri, ref, base, name)


def _memory_inputs(depth, dtype, T=11):
    g = torch.Generator().manual_seed(0)
    B, H, K = 2, 2, 8
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=g, dtype=F64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, K, generator=g, dtype=F64) / K ** 0.5
    theta = 0.2 * torch.rand(B, T, H, generator=g, dtype=F64)
    eta = 0.2 + 0.8 * torch.rand(B, T, H, generator=g, dtype=F64)
    alpha = 0.1 * torch.rand(B, T, H, generator=g, dtype=F64)
    torch.manual_seed(0)
    W0 = [w.double() for w in init_memory_weights(H, K, depth, expansion=2)]
    nw = 1 + 0.1 * torch.randn(H, K, generator=g, dtype=F64)
    tensors = [x.to(dtype).requires_grad_() for x in [q, k, v, theta, eta, alpha, nw] + W0]
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 6] = True
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:4] = mask[1, 9] = False
    return tensors, reset, mask


def _count_calls(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    return calls


@pytest.mark.parametrize("depth,retrieval,momentum_step,norm,activation,chunk,masked", [
    (1, "chunk", "token", True, "gelu", 4, False), (2, "token", "token", True, "gelu", 4, False),
    (2, "chunk", "chunk", True, "gelu", 4, False), (1, "token", "chunk", False, "silu", 5, True),
    (2, "token", "token", False, "silu", 5, True)])
def test_memory_triton_backend_matches_chunked(depth, retrieval, momentum_step, norm, activation, chunk, masked,
                                               monkeypatch):
    kernel_calls = [_count_calls(monkeypatch, memory_triton, name) for name in
                    ("start_grad_forward", "start_grad_backward", "end_update_forward", "end_update_backward")]
    outs = {}
    for impl, dtype in (("chunked", F64), ("chunked", torch.float32), ("triton", torch.float32)):
        tensors, reset, mask = _memory_inputs(depth, dtype, T=13)
        q, k, v, theta, eta, alpha, nw, *W0 = tensors
        y, st = neural_memory(q, k, v, theta, eta, alpha, W0, chunk_size=chunk, reset=reset,
                              mask=mask if masked else None, retrieval=retrieval, momentum_step=momentum_step,
                              norm_weight=nw if norm else None, activation=activation, return_state=True, impl=impl)
        flat = torch.cat([y.flatten()] + [w.flatten() for w in st.weights + st.momentum])
        wrt = tensors if norm else [t for t in tensors if t is not nw]
        outs[impl, dtype] = (y, *st.weights, *st.momentum) + _grads(flat, wrt)
    assert all(calls for calls in kernel_calls), "impl='triton' did not run every memory kernel"
    ref, base, tri = outs["chunked", F64], outs["chunked", torch.float32], outs["triton", torch.float32]
    for i, (t, r, b) in enumerate(zip(tri, ref, base)):
        assert_within_baseline(t, r, b, f"output/gradient #{i}")


def test_memory_triton_deeper_than_two_keeps_the_pytorch_start_gradient():
    dispatch.reset()
    tensors, reset, _ = _memory_inputs(3, torch.float32)
    q, k, v, theta, eta, alpha, nw, *W0 = tensors
    ys = [neural_memory(q, k, v, theta, eta, alpha, W0, chunk_size=4, reset=reset, norm_weight=nw, impl=impl)
          for impl in ("triton", "chunked")]
    assert dispatch.chosen()["neural memory"] == ["triton (chunk-start gradient in PyTorch: depth > 2)", "chunked"]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="depth 1 and 2"):
        chunk_start_grad_triton(k.transpose(1, 2), v.transpose(1, 2), [w[None] for w in W0], "gelu", nw)
