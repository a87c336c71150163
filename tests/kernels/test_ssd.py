"""The SSD op (kernels/ssd): the chunked form against the token-by-token reference in fp64,
forward, final state and every gradient (x, dt, A, B, C, D, dt_bias, initial state) at
awkward lengths (1, 63, 113, 200), one and several groups, chunks and segments that do not
divide T, document starts (also at t = 0) and dt limits that clamp; packed documents equal
each document alone (doc_starts and cu_seqlens with per-sequence states); a sequence split
in two with the state carried equals the whole; transformers' own Mamba-2 chunk scan gives
the same result; bf16 error within a small multiple of plain bf16's (STYLE.md 6); errors
name shapes; the backend is announced. Fast tier (~10 s)."""
import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.backends import have_fla
from loom.kernels.ssd import ssd
from loom.kernels.ssd.chunked import ssd_chunked
from loom.kernels.ssd.reference import discretize, ssd_reference

F64, BF16 = torch.float64, torch.bfloat16
H, P, N = 4, 5, 3


def _inputs(Bt, T, G, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(x=r(Bt, T, H, P), dt=r(Bt, T, H), A=-2 * torch.rand(H, generator=g, dtype=F64),
                B=r(Bt, T, G, N), C=r(Bt, T, G, N), D=r(H), dt_bias=r(H) * 0.5, initial_state=r(Bt, H, P, N))


def _starts(Bt, T, seed=0):
    s = torch.rand(Bt, T, generator=torch.Generator().manual_seed(seed + 7)) < 0.06
    s[-1, 0] = True  # a row that starts a document drops its initial state
    return s


def _grads(fn, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, state = fn(**leaves)
    g = torch.Generator().manual_seed(99)
    w_y = torch.randn(y.shape, generator=g, dtype=F64)
    w_s = torch.randn(state.shape, generator=g, dtype=F64)
    loss = (y.double() * w_y).sum() + (state.double() * w_s).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"y": y, "state": state, **{f"d{k}": gr for k, gr in zip(leaves, grads)}}


@pytest.mark.parametrize("T", [1, 63, 113, 200])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.05, 1.2)])
def test_chunked_equals_reference_with_every_gradient(T, G, limit):
    inputs = _inputs(2, T, G)
    starts = _starts(2, T)

    def ref(x, dt, A, B, C, D, dt_bias, initial_state):
        return ssd_reference(x, discretize(dt, dt_bias, True, limit), A, B, C, D=D, starts=starts,
                             initial_state=initial_state)

    def chunked(x, dt, A, B, C, D, dt_bias, initial_state):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=limit, initial_state=initial_state,
                   doc_starts=starts, return_state=True, chunk=16, impl="chunked")

    want, got = _grads(ref, inputs), _grads(chunked, inputs)
    for name, w in want.items():
        assert not torch.isnan(got[name]).any(), name
        torch.testing.assert_close(got[name], w, rtol=1e-10, atol=1e-10, msg=name)


def test_segments_carry_the_state():
    """Segments of 3 chunks of 8 (the cache-friendly outer loop) equal one segment."""
    inputs = _inputs(2, 113, 2)
    del inputs["dt_bias"]
    inputs["dt"] = discretize(inputs["dt"])
    starts = _starts(2, 113)
    a = ssd_chunked(**inputs, starts=starts, return_state=True, chunk=8, segment_chunks=3)
    b = ssd_reference(**inputs, starts=starts)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)


def test_packed_documents_equal_each_alone():
    lens = [13, 1, 40, 9]
    inputs = _inputs(1, sum(lens), 2)
    del inputs["initial_state"]
    starts = torch.zeros(1, sum(lens), dtype=torch.bool)
    starts[0, torch.tensor([0, 13, 14, 54])] = True
    packed, state = ssd(**inputs, doc_starts=starts, return_state=True, chunk=8)
    seq = {k: inputs[k] for k in ("x", "dt", "B", "C")}
    a = 0
    for n in lens:
        alone, s = ssd(**{k: v[:, a:a + n] for k, v in seq.items()}, A=inputs["A"], D=inputs["D"],
                       dt_bias=inputs["dt_bias"], return_state=True, chunk=8)
        torch.testing.assert_close(packed[:, a:a + n], alone, rtol=1e-11, atol=1e-11)
        a += n
    torch.testing.assert_close(state, s, rtol=1e-11, atol=1e-11)  # the row's state is its last document's


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_cu_seqlens_with_per_sequence_states(impl):
    lens = [13, 1, 40, 9]
    inputs = _inputs(1, sum(lens), 2)
    h0 = torch.randn(len(lens), H, P, N, dtype=F64)
    cu = torch.tensor([0, 13, 14, 54, 63])
    inputs["initial_state"] = h0
    y, states = ssd(**inputs, cu_seqlens=cu, return_state=True, chunk=8, impl=impl)
    assert states.shape == (len(lens), H, P, N)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, s = ssd(**{k: inputs[k][:, a:b] for k in ("x", "dt", "B", "C")}, A=inputs["A"], D=inputs["D"],
                       dt_bias=inputs["dt_bias"], initial_state=h0[i:i + 1], return_state=True, impl="reference")
        torch.testing.assert_close(y[:, a:b], alone, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(states[i], s[0], rtol=1e-11, atol=1e-11)


def test_state_carry_equals_whole():
    inputs = _inputs(2, 150, 2)
    starts = _starts(2, 150)
    whole, s_whole = ssd(**inputs, doc_starts=starts, return_state=True, chunk=16)
    cut = 71
    first = {k: inputs[k][:, :cut] for k in ("x", "dt", "B", "C")}
    second = {k: inputs[k][:, cut:] for k in ("x", "dt", "B", "C")}
    common = {k: inputs[k] for k in ("A", "D", "dt_bias")}
    y1, s1 = ssd(**first, **common, initial_state=inputs["initial_state"], doc_starts=starts[:, :cut],
                 return_state=True, chunk=16)
    y2, s2 = ssd(**second, **common, initial_state=s1, doc_starts=starts[:, cut:], return_state=True, chunk=16)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(s2, s_whole, rtol=1e-11, atol=1e-11)


def test_matches_transformers_mamba2_chunk_scan():
    """transformers' Mamba-2 torch fallback (Nemotron-H's mamba2_chunk_scan, fp32 inside)."""
    nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    inputs = {k: v.float() for k, v in _inputs(2, 77, 2).items()}
    y, s = nemotron.mamba2_chunk_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=16,
                                      D=inputs["D"], dt_bias=inputs["dt_bias"], initial_states=inputs["initial_state"],
                                      dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True)
    y2, s2 = ssd(**inputs, dt_limit=(0.01, 2.0), return_state=True)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, s, rtol=1e-4, atol=1e-4)


def test_bf16_error_within_plain_bf16_error():
    """chunked in bf16 (fp32 inside) vs the fp64 reference, against the reference's own loop run in bf16."""
    inputs = _inputs(2, 70, 2)
    del inputs["initial_state"]
    inputs["x"], inputs["B"], inputs["C"] = (inputs[k] * 0.5 for k in ("x", "B", "C"))
    starts = _starts(2, 70)

    def run(fn, dtype):
        leaves = {k: inputs[k].to(dtype).requires_grad_() for k in ("x", "dt", "B", "C")}
        y = fn(**leaves, A=inputs["A"].to(dtype), D=inputs["D"].to(dtype), dt_bias=inputs["dt_bias"].to(dtype))
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        return (y,) + torch.autograd.grad((y.double() * w).sum(), list(leaves.values()))

    def plain(x, dt, A, B, C, D, dt_bias):
        return ssd_reference(x, discretize(dt, dt_bias), A, B, C, D=D, starts=starts)[0]

    def chunked(x, dt, A, B, C, D, dt_bias):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, doc_starts=starts, chunk=16)

    ref, got, base = run(plain, F64), run(chunked, BF16), run(plain, BF16)
    for name, r, x, b in zip(("y", "dx", "ddt", "dB", "dC"), ref, got, base):
        assert x.dtype == BF16 and not torch.isnan(x).any(), name
        err = (x.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + 2 ** -8 * r.abs().max().item(), f"{name}: {err:.3g} vs plain bf16 {base_err:.3g}"


@pytest.mark.parametrize(("change", "match"), [
    (dict(dt=torch.zeros(2, 9, 3)), r"dt must be \(B, T, H\) = \(2, 9, 4\)"),
    (dict(A=torch.zeros(3)), r"A must be \(H,\) = \(4,\)"),
    (dict(B=torch.zeros(2, 9, 3, N), C=torch.zeros(2, 9, 3, N)), r"H=4 must be a multiple of the groups G=3"),
    (dict(initial_state=torch.zeros(2, H, N, P)), r"initial_state must be \(B, H, P, N\) = \(2, 4, 5, 3\)"),
    (dict(doc_starts=torch.zeros(2, 8, dtype=torch.bool)), r"doc_starts must be a bool tensor \(B, T\)"),
    (dict(impl="triton"), r"unknown ssd impl 'triton'"),
])
def test_errors_name_the_shapes(change, match):
    inputs = {**{k: v.float() for k, v in _inputs(2, 9, 1).items()}, **change}
    with pytest.raises(ValueError, match=match):
        ssd(**inputs)


def test_cu_seqlens_errors():
    inputs = {k: v.float() for k, v in _inputs(1, 9, 1).items()}
    with pytest.raises(ValueError, match=r"initial_state must be \(S, H, P, N\) per sequence = \(2, 4, 5, 3\)"):
        ssd(**inputs, cu_seqlens=torch.tensor([0, 4, 9]))
    del inputs["initial_state"]
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        ssd(**inputs, cu_seqlens=torch.tensor([0, 4, 8]))


def test_auto_is_announced_and_fla_forcing_fails_clearly(caplog):
    inputs = {k: v.float() for k, v in _inputs(1, 9, 1).items()}
    dispatch.reset()
    with caplog.at_level("INFO", logger="loom.kernels"):
        ssd(**inputs)
        ssd(**inputs)
    assert dispatch.chosen()["ssd"] == ["chunked"]
    assert [r.getMessage() for r in caplog.records].count("ssd: chunked") == 1
    if not have_fla():
        with pytest.raises(RuntimeError, match="fla-core is not installed"):
            ssd(**inputs, impl="fla")


@pytest.mark.slow
def test_past_131k_tokens_equals_reference():
    """STYLE.md 15: one length past 2^17 tokens (where int32 offsets overflow for common head
    shapes), with documents, chunked against the reference path. ~30 s."""
    T = (1 << 17) + 37
    g = torch.Generator().manual_seed(3)
    x, dt = torch.randn(1, T, 2, 2, generator=g, dtype=F64), torch.rand(1, T, 2, generator=g, dtype=F64) * 0.1
    B, C = torch.randn(1, T, 1, 2, generator=g, dtype=F64), torch.randn(1, T, 1, 2, generator=g, dtype=F64)
    A = torch.tensor([-0.5, -0.05], dtype=F64)
    starts = torch.zeros(1, T, dtype=torch.bool)
    starts[0, [70000, 131071]] = True
    want = ssd(x, dt, A, B, C, dt_softplus=False, doc_starts=starts, return_state=True, impl="reference")
    got = ssd(x, dt, A, B, C, dt_softplus=False, doc_starts=starts, return_state=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
