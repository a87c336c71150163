"""loom.kernels.rat: the chunked op against the token loop of reference.py (fast tier, ~15 s).

In fp64 unless stated: chunked == reference (the token loop) for the output, the attention stats, the
final state and the gradients of every input (T in {1, 15, 33, 63}, L in {4, 16},
rows packed with documents that start mid-chunk, with and without RoPE, with an
initial state); packed documents == each document alone; two pieces with the
state carried == the whole, forward and gradients; token-by-token decoding ==
the whole; the segmented scan against a loop; fp32 against fp64; shape errors.
"""
import pytest
import torch

from loom.kernels.rat import rat
from loom.kernels.rat.chunked import SegmentScan

F64 = torch.float64
G, H, K = 2, 4, 8


def positions(docs: list[list[int]]) -> torch.Tensor:
    """(B, T) document-relative positions from per-row document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])


def rope_tables(pos: torch.Tensor, L: int, dtype=F64):
    angles = (pos // L).to(dtype)[..., None] * 10000.0 ** (-torch.arange(0, K, 2, dtype=dtype) / K)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def make_inputs(B: int, T: int, dtype=F64):
    q = torch.randn(B, T, G, K, dtype=dtype)
    k = torch.randn(B, T, G, K, dtype=dtype)
    v = torch.randn(B, T, H, K, dtype=dtype)
    f = 2 * torch.randn(B, T, H, K, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, f)]


def layouts(T: int) -> list[list[int]]:
    """Row 0: one document; row 1: documents starting mid-chunk where T allows."""
    cuts = [c for c in (3, 9, 22) if c < T]
    row1 = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    return [[T], row1]


def random_state(B: int, C: int, n: list[int]):
    st = {"k": torch.randn(B, C, H, K, dtype=F64), "v": torch.randn(B, C, H, K, dtype=F64),
          "n": torch.tensor(n), "k_run": torch.randn(B, H, K, dtype=F64), "v_run": torch.randn(B, H, K, dtype=F64)}
    for b, nb in enumerate(n):  # right-aligned: padding entries are zero
        st["k"][b, :C - nb] = 0
        st["v"][b, :C - nb] = 0
    return {name: x.requires_grad_() if x.is_floating_point() else x for name, x in st.items()}


def run(impl, inputs, pos, L, rope, **kw):
    cos, sin = rope_tables(pos, L) if rope else (None, None)
    return rat(*inputs, pos, chunk=L, cos=cos, sin=sin, impl=impl, return_stats=True, return_state=True, **kw)


def assert_close(a, b, tol=1e-11):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def objective(o, state, w):
    """A scalar touching the output and every floating part of the state."""
    return (o * w).sum() + sum(x.sum() * (i + 2) for i, x in enumerate(
        state[n] for n in ("k", "v", "k_run", "v_run")))


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("L", [4, 16])
@pytest.mark.parametrize("T", [1, 15, 33, 63])
def test_chunked_matches_reference(T, L, rope):
    inputs = make_inputs(2, T)
    pos = positions(layouts(T))
    results = {}
    for impl in ("reference", "chunked"):
        o, stats, state = run(impl, inputs, pos, L, rope)
        grads = torch.autograd.grad(objective(o, state, torch.cos(torch.arange(o.numel(), dtype=F64)).view_as(o)),
                                    inputs)
        results[impl] = (o, stats, state, grads)
    (o1, st1, s1, g1), (o2, st2, s2, g2) = results["reference"], results["chunked"]
    assert_close(o2, o1)
    for name in ("lse", "local", "first"):
        assert_close(st2[name], st1[name])
    for name in ("k", "v", "k_run", "v_run"):
        assert_close(s2[name], s1[name])
    assert torch.equal(s2["n"], s1["n"])
    for a, b in zip(g2, g1):
        assert_close(a, b)


@pytest.mark.parametrize("L", [4, 16])
def test_initial_state_matches_reference(L):
    T = 29
    # Row 0 continues its document mid-chunk; row 1 continues for 6 tokens, then a new document starts.
    pos = torch.stack([torch.arange(T) + L * 3 + 1, torch.cat([torch.arange(6) + 2 * L - 2, torch.arange(T - 6)])])
    inputs = make_inputs(2, T)
    init = random_state(2, 4, [3, 2])
    leaves = inputs + [init["k"], init["v"], init["k_run"], init["v_run"]]
    results = []
    for impl in ("reference", "chunked"):
        o, _, state = run(impl, inputs, pos, L, True, initial_state=init)
        w = torch.sin(torch.arange(o.numel(), dtype=F64)).view_as(o)
        results.append((o, state, torch.autograd.grad(objective(o, state, w), leaves)))
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o2, o1)
    for name in ("k", "v", "k_run", "v_run"):
        assert_close(s2[name], s1[name])
    closing = [sum(p % L == L - 1 for p in range(3 * L + 1, 3 * L + 1 + T)), sum(p % L == L - 1 for p in range(T - 6))]
    assert s2["n"].tolist() == s1["n"].tolist() == [3 + closing[0], closing[1]]
    for a, b in zip(g2, g1):
        assert_close(a, b)


@pytest.mark.parametrize("L", [4, 16])
def test_packed_equals_separate(L):
    docs = [7, 13, 20]  # boundaries at 7 and 20: mid-chunk for both L
    T = sum(docs)
    inputs = make_inputs(1, T)
    pos = positions([docs])
    o, _, _ = run("chunked", inputs, pos, L, True)
    w = torch.randn_like(o)
    packed_grads = torch.autograd.grad((o * w).sum(), inputs)
    start = 0
    for n in docs:
        piece = [x.detach()[:, start:start + n].clone().requires_grad_() for x in inputs]
        o_doc, _, _ = run("chunked", piece, pos[:, start:start + n], L, True)
        assert_close(o[:, start:start + n], o_doc, 1e-12)
        for g_packed, g_doc in zip(packed_grads, torch.autograd.grad((o_doc * w[:, start:start + n]).sum(), piece)):
            assert_close(g_packed[:, start:start + n], g_doc, 1e-12)
        start += n


@pytest.mark.parametrize("L", [4, 16])
@pytest.mark.parametrize("split", [1, 5, 16, 17, 30, 39])
def test_two_pieces_equal_whole(L, split):
    T = 40
    inputs = make_inputs(2, T)
    pos = positions([[T], [9, 31]])
    o, _, state = run("chunked", inputs, pos, L, True)
    w = torch.randn_like(o)
    whole_grads = torch.autograd.grad(objective(o, state, w), inputs)

    first = [x[:, :split] for x in inputs]
    second = [x[:, split:] for x in inputs]
    o1, _, s1 = run("chunked", first, pos[:, :split], L, True)
    o2, _, s2 = run("chunked", second, pos[:, split:], L, True, initial_state=s1)
    assert_close(torch.cat([o1, o2], dim=1), o)
    for name in ("k_run", "v_run"):
        assert_close(s2[name], state[name])
    assert torch.equal(s2["n"], state["n"])
    for name in ("k", "v"):  # same valid entries (the carried cache may be wider)
        for b in range(2):
            n = int(state["n"][b])
            assert_close(s2[name][b, s2[name].shape[1] - n:], state[name][b, state[name].shape[1] - n:])
    pieces_grads = torch.autograd.grad(objective(torch.cat([o1, o2], dim=1), s2, w), inputs)
    for a, b in zip(pieces_grads, whole_grads):
        assert_close(a, b)


def test_decode_token_by_token_equals_whole():
    L, T = 4, 23
    inputs = [x.detach() for x in make_inputs(2, T)]
    pos = positions([[T], [6, 17]])
    o, _, _ = run("chunked", inputs, pos, L, True)
    state, outs = None, []
    for t in range(T):
        o_t, _, state = run("chunked", [x[:, t:t + 1] for x in inputs], pos[:, t:t + 1], L, True,
                            initial_state=state)
        outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), o)
    assert state["k"].shape[1] == max(T // L, 17 // L)  # the cache holds only the current document's chunks


@pytest.mark.parametrize("span", [1, 3, 4, 16])
def test_segment_scan_matches_loop(span):
    B, T, N = 2, 37, 3
    a = torch.rand(B, T, 1, N, dtype=F64)
    a[:, ::span] = 0  # a restart at least every `span` steps
    a[:, 5] = 0
    a.requires_grad_()
    b = torch.randn(B, T, 2, N, dtype=F64, requires_grad=True)
    s, ref = SegmentScan.apply(a, b, span), []
    prev = torch.zeros(B, 2, N, dtype=F64)
    for t in range(T):
        prev = a[:, t] * prev + b[:, t]
        ref.append(prev)
    ref = torch.stack(ref, dim=1)
    assert_close(s, ref, 1e-13)
    w = torch.randn_like(s)
    for g, g_ref in zip(torch.autograd.grad((s * w).sum(), (a, b)), torch.autograd.grad((ref * w).sum(), (a, b))):
        assert_close(g, g_ref, 1e-13)


def test_fp32_close_to_fp64():
    T, L = 63, 16
    inputs = make_inputs(2, T)
    pos = positions(layouts(T))
    o64, _, _ = run("chunked", inputs, pos, L, True)
    inputs32 = [x.detach().float() for x in inputs]
    cos, sin = rope_tables(pos, L, torch.float32)
    o32 = rat(*inputs32, pos, chunk=L, cos=cos, sin=sin)
    assert o32.dtype == torch.float32 and not o32.isnan().any()
    torch.testing.assert_close(o32.double(), o64.detach(), atol=2e-5, rtol=2e-5)


def test_shape_errors_name_the_shapes():
    q, k, v, f = (x.detach() for x in make_inputs(1, 5))
    pos = torch.arange(5)[None]
    with pytest.raises(ValueError, match=r"\(B, T, H, K\)"):
        rat(q, k, v[:, :, :3], f, pos)
    with pytest.raises(ValueError, match="position_ids must be"):
        rat(q, k, v, f, pos[:, :4])
    with pytest.raises(ValueError, match="f \\(forget-gate logits\\)"):
        rat(q, k, v, f[..., :4], pos)
    with pytest.raises(ValueError, match="cos and sin"):
        rat(q, k, v, f, pos, cos=torch.ones(1, 5, K), sin=torch.ones(1, 5, K - 2))
    with pytest.raises(ValueError, match="unknown rat impl"):
        rat(q, k, v, f, pos, impl="cuda-graph")


@pytest.mark.slow
def test_past_131k_tokens_two_pieces_equal_whole():
    """Index arithmetic past 2^17 tokens (int32 offsets overflow near there for usual shapes)."""
    T, split, L = 140_000, 131_075, 16
    q, k = torch.randn(1, T, 1, 2), torch.randn(1, T, 1, 2)
    v, f = torch.randn(1, T, 1, 2), torch.randn(1, T, 1, 2)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        o = rat(q, k, v, f, pos, chunk=L)
        o1, s1 = rat(q[:, :split], k[:, :split], v[:, :split], f[:, :split], pos[:, :split], chunk=L,
                     return_state=True)
        o2 = rat(q[:, split:], k[:, split:], v[:, split:], f[:, split:], pos[:, split:], chunk=L, initial_state=s1)
    assert int(s1["n"]) == split // L
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, atol=1e-5, rtol=1e-5)
