"""The gated delta rule op (loom.kernels.gated_delta_rule) on CPU.

Checks: the chunked WY form equals the token-by-token reference in fp64 (forward, final state
and the gradients of q, k, v, g, beta and the initial state) at lengths no chunk divides, with
grouped heads (HV = 2 HK), documents inside chunks and l2norm on and off; packed documents
(seq_ids and cu_seqlens) equal each document run alone; a sequence split in two with the state
carried equals the whole; bf16 error within a small multiple of a plain bf16 loop's (STYLE.md 6);
dispatch announced once, forcing and errors; one row of 131,136 tokens on the chunked path
against the reference on its tail. Cost: ~15 s on one core.
"""
import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.gated_delta_rule import gated_delta_rule
from loom.kernels.gated_delta_rule.cp import piece_maps

F64, BF16 = torch.float64, torch.bfloat16
HK, HV, K, V = 2, 4, 8, 6


def inputs(B, T, dtype=F64, seed=0, hk=HK, hv=HV):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q, k = r(B, T, hk, K), 0.3 * r(B, T, hk, K)  # |k|^2 ~ 0.7: a stable recurrence without the l2 norm
    v = r(B, T, hv, V)
    g = -0.3 * torch.rand(B, T, hv, generator=gen, dtype=F64)
    beta = torch.rand(B, T, hv, generator=gen, dtype=F64)
    S0 = 0.5 * r(B, hv, K, V)
    return [x.to(dtype) for x in (q, k, v, g, beta, S0)]


def doc_ids(B, T):
    """Row 0: documents that start inside chunks and at chunk starts; row 1: one document."""
    ids = torch.zeros(B, T, dtype=torch.long)
    for s in (3, 9, 64, 65, 100):
        if s < T:
            ids[0, s:] += 1
    return ids


def run(impl, q, k, v, g, beta, S0, **kw):
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
    o, S = gated_delta_rule(*xs[:5], initial_state=xs[5], return_state=True, impl=impl, **kw)
    gen = torch.Generator().manual_seed(7)
    w_o, w_S = torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(S.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((o.double() * w_o).sum() + (S.double() * w_S).sum(), xs)
    return o, S, grads


@pytest.mark.parametrize("T", [1, 63, 113, 200])
@pytest.mark.parametrize("l2", [False, True])
def test_chunked_equals_reference_fp64(T, l2):
    x = inputs(2, T)
    ids = doc_ids(2, T)
    ref = run("reference", *x, seq_ids=ids, use_qk_l2norm=l2)
    got = run("chunked", *x, seq_ids=ids, use_qk_l2norm=l2)
    names = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dS0")
    for name, a, b in zip(names, (got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} T={T}: {m}")


def test_small_chunks_and_scale():
    x = inputs(2, 77)
    ids = doc_ids(2, 77)
    ref = run("reference", *x, seq_ids=ids, scale=0.3)
    got = run("chunked", *x, seq_ids=ids, scale=0.3, chunk=5)
    for a, b in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_packed_documents_equal_separate_runs(impl):
    lens = [5, 64, 1, 70]
    q, k, v, g, beta, _ = inputs(1, sum(lens))
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    S0 = inputs(len(lens), 1, seed=3)[5]
    o, S = gated_delta_rule(q, k, v, g, beta, seq_ids=ids, initial_state=S0[:1], return_state=True,
                            use_qk_l2norm=True, impl=impl)
    cu = torch.tensor([0] + lens).cumsum(0)
    o_cu, S_cu = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, initial_state=S0, return_state=True,
                                  use_qk_l2norm=True, impl=impl)
    for n in range(len(lens)):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        alone, S_alone = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                          initial_state=S0[n:n + 1] if n == 0 else None, return_state=True,
                                          use_qk_l2norm=True, impl=impl)
        torch.testing.assert_close(o[:, sl], alone, rtol=1e-10, atol=1e-10)
        alone_cu, S_alone_cu = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                                initial_state=S0[n:n + 1], return_state=True, use_qk_l2norm=True,
                                                impl=impl)
        torch.testing.assert_close(o_cu[:, sl], alone_cu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S_cu[n:n + 1], S_alone_cu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_alone, rtol=1e-10, atol=1e-10)  # the row's state is its last document's


def test_state_carry_equals_whole():
    q, k, v, g, beta, S0 = inputs(2, 150)
    ids = doc_ids(2, 150)
    whole, S_whole = gated_delta_rule(q, k, v, g, beta, initial_state=S0, seq_ids=ids, return_state=True)
    for cut in (1, 64, 97):
        a, S_a = gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], initial_state=S0,
                                  seq_ids=ids[:, :cut], return_state=True)
        # the second piece's first token starts a document where its id differs from the one before it
        S_in = S_a * (ids[:, cut] == ids[:, cut - 1]).double()[:, None, None, None]
        b, S_b = gated_delta_rule(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], initial_state=S_in,
                                  seq_ids=ids[:, cut:], return_state=True)
        torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S_b, S_whole, rtol=1e-10, atol=1e-10)


def test_grouped_heads_equal_repeated_heads():
    q, k, v, g, beta, S0 = inputs(2, 70)
    o = gated_delta_rule(q, k, v, g, beta, initial_state=S0)
    rep = lambda x: x.repeat_interleave(HV // HK, dim=2)  # noqa: E731
    torch.testing.assert_close(o, gated_delta_rule(rep(q), rep(k), v, g, beta, initial_state=S0), rtol=0, atol=1e-12)


def _plain_bf16(q, k, v, g, beta):
    """The recurrence written plainly, every step in the inputs' dtype (the bf16 baseline)."""
    B, T = q.shape[:2]
    q, k = (x.repeat_interleave(HV // HK, dim=2) for x in (q, k))
    S = v.new_zeros(B, HV, K, V)
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, ..., None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    return torch.stack(outs, 1)


def test_bf16_error_within_plain_bf16_error():
    def grads(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in inputs(2, 40, seed=5)[:5]]
        xs[0].data, xs[1].data = [torch.nn.functional.normalize(x.data.double(), dim=-1).to(dtype) for x in xs[:2]]
        o = fn(*xs)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        return (o,) + torch.autograd.grad((o.double() * w).sum(), xs)

    op = lambda *xs: gated_delta_rule(*xs, seq_ids=doc_ids(2, 40), impl="chunked")  # noqa: E731
    ref_op = lambda *xs: gated_delta_rule(*xs, seq_ids=doc_ids(2, 40), impl="reference")  # noqa: E731
    ref, got = grads(ref_op, F64), grads(op, BF16)
    plain_docs = lambda *xs: torch.cat([_plain_bf16(*(x[:, a:b] for x in xs)) for a, b in ((0, 3), (3, 9), (9, 40))],
                                       1)  # noqa: E731
    base = grads(lambda *xs: torch.cat([plain_docs(*(x[:1] for x in xs)), _plain_bf16(*(x[1:] for x in xs))]), BF16)
    for name, r, x, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), ref, got, base):
        assert x.dtype == BF16 and not torch.isnan(x).any(), f"{name}: {x.dtype}, NaN {torch.isnan(x).any()}"
        err, base_err = (x.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + 2 ** -8 * r.abs().max().item(), f"{name}: bf16 op {err:.3g}, plain {base_err:.3g}"


def test_dispatch_announced_once_and_forcing(caplog):
    x = inputs(1, 9)[:5]
    dispatch.reset()
    with caplog.at_level("INFO", logger="loom.kernels"):
        gated_delta_rule(*x)
        gated_delta_rule(*x)
    assert dispatch.chosen()["gated delta rule"] == ["chunked"]
    assert [r.getMessage() for r in caplog.records] == ["gated delta rule: chunked"]
    gated_delta_rule(*x, impl="reference")
    assert dispatch.chosen()["gated delta rule"] == ["chunked", "reference"]
    with pytest.raises(ValueError, match="reference"):
        gated_delta_rule(*x, impl="nope")
    try:
        import fla  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="fla-core"):
            gated_delta_rule(*x, impl="fla")


def test_bad_shapes_name_the_argument():
    q, k, v, g, beta, S0 = inputs(2, 9)
    with pytest.raises(ValueError, match="HV a multiple of HK"):
        gated_delta_rule(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
    with pytest.raises(ValueError, match=r"g must be \(B, T, HV\)"):
        gated_delta_rule(q, k, v, g[..., :2], beta)
    with pytest.raises(ValueError, match=r"initial_state must be \(N, HV, K, V\)"):
        gated_delta_rule(q, k, v, g, beta, initial_state=S0[:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="seq_ids must be"):
        gated_delta_rule(q, k, v, g, beta, seq_ids=torch.zeros(2, 8, dtype=torch.long))


def test_past_131k_tokens_chunked_tail_equals_reference():
    """int64-safe long row (STYLE.md 15): 131,136 tokens through the chunked path; its last 100
    tokens equal the reference started from the chunked state before them."""
    T, tail = 131_136, 100
    q, k, v, g, beta, _ = inputs(1, T, dtype=torch.float32, hk=1, hv=1)
    with torch.no_grad():
        o, S = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, return_state=True)
        cut = T - tail
        _, S_cut = gated_delta_rule(*(x[:, :cut] for x in (q, k, v, g, beta)), use_qk_l2norm=True, return_state=True)
        o_ref, S_ref = gated_delta_rule(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=S_cut,
                                        use_qk_l2norm=True, return_state=True, impl="reference")
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o[:, cut:], o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_piece_maps_are_the_affine_map_of_the_start_state(impl):
    """cp.py's building block: one run from [0, I] gives (o, r) and (O, M) with, for any start
    state Z, output o + Z^T r and end state M Z + O (documents inside: M after a start is 0)."""
    q, k, v, g, beta, Z = inputs(2, 37)
    ids = doc_ids(2, 37)
    (o0, r), (O, M) = (x.split([V, K], dim=-1) for x in piece_maps(q, k, v, g, beta, scale=K ** -0.5, seq_ids=ids,
                                                                   use_qk_l2norm=True, chunk=8, impl=impl))
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=Z, seq_ids=ids, use_qk_l2norm=True, return_state=True,
                            impl="reference")
    torch.testing.assert_close(o0 + torch.einsum("bthk,bhkv->bthv", r, Z), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M @ Z + O, S, rtol=1e-10, atol=1e-10)
    assert M[0].abs().max() == 0 and M[1].abs().max() > 0  # row 0 starts documents inside the piece
