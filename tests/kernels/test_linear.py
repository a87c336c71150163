"""loom.kernels.linear: the block-tiled op against the token loop and the dense form (fast tier, ~5 s).

In fp64: chunked == reference (the token loop) == dense masked O(T^2) for the output, and chunked ==
reference for the final state and the gradients of q, k, v, the decay rates and
the initial state (T in {1, 15, 33, 63, 130}, blocks in {4, 16, 64}, rows packed
with documents starting mid-block); packed documents == each document alone;
two pieces with the state carried == the whole; the (local, carry) pieces
composed by a prefix scan == the whole; ALiBi slopes; shape errors.
"""
import pytest
import torch

from loom.kernels.linear import alibi_slopes, linear_attention, linear_attention_state
from loom.kernels.linear.reference import linear_attention_dense

F64 = torch.float64
H, K, V = 4, 8, 6


def make_inputs(B: int, T: int):
    q, k = torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, K, dtype=F64)
    v = torch.randn(B, T, H, V, dtype=F64)
    decay = alibi_slopes(H).to(F64) * 4  # strong decay so that the block-level factors matter
    return [x.requires_grad_() for x in (q, k, v, decay)]


def resets(docs: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs]) == 0


def assert_close(a, b, tol=1e-11):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("block", [4, 16, 64])
@pytest.mark.parametrize("T", [1, 15, 33, 63, 130])
def test_chunked_matches_reference_and_dense(T, block):
    q, k, v, decay = make_inputs(2, T)
    cuts = [c for c in (5, 21, 70) if c < T]
    reset = resets([[T], [b - a for a, b in zip([0] + cuts, cuts + [T])]])
    s0 = torch.randn(2, H, K, V, dtype=F64, requires_grad=True)
    leaves = [q, k, v, decay, s0]
    w = torch.randn(2, T, H, V, dtype=F64)
    results = []
    for impl in ("reference", "chunked"):
        o, s = linear_attention(q, k, v, decay, block=block, reset=reset, initial_state=s0, return_state=True,
                                scale=0.5, impl=impl)
        results.append((o, s, torch.autograd.grad((o * w).sum() + (s * s.detach()).sum(), leaves)))
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o2, o1)
    assert_close(s2, s1)
    for a, b in zip(g2, g1):
        assert_close(a, b)
    dense = linear_attention_dense(q, k, v, decay, reset=reset, scale=0.5)
    assert_close(linear_attention(q, k, v, decay, block=block, reset=reset, scale=0.5), dense)


@pytest.mark.parametrize("block", [4, 16])
def test_packed_equals_separate(block):
    docs = [7, 13, 20]
    T = sum(docs)
    q, k, v, decay = make_inputs(1, T)
    o = linear_attention(q, k, v, decay, block=block, reset=resets([docs]))
    w = torch.randn_like(o)
    packed = torch.autograd.grad((o * w).sum(), (q, k, v))
    start = 0
    for n in docs:
        piece = [x.detach()[:, start:start + n].clone().requires_grad_() for x in (q, k, v)]
        o_doc = linear_attention(*piece, decay, block=block)
        assert_close(o[:, start:start + n], o_doc, 1e-12)
        for g_packed, g_doc in zip(packed, torch.autograd.grad((o_doc * w[:, start:start + n]).sum(), piece)):
            assert_close(g_packed[:, start:start + n], g_doc, 1e-12)
        start += n


@pytest.mark.parametrize("split", [1, 16, 17, 39])
def test_two_pieces_equal_whole(split):
    T, block = 40, 16
    q, k, v, decay = make_inputs(2, T)
    reset = resets([[T], [9, 31]])
    o, s = linear_attention(q, k, v, decay, block=block, reset=reset, return_state=True)
    w = torch.randn_like(o)
    whole = torch.autograd.grad((o * w).sum() + s.sum(), (q, k, v, decay))
    o1, s1 = linear_attention(q[:, :split], k[:, :split], v[:, :split], decay, block=block, reset=reset[:, :split],
                              return_state=True)
    o2, s2 = linear_attention(q[:, split:], k[:, split:], v[:, split:], decay, block=block, reset=reset[:, split:],
                              initial_state=s1, return_state=True)
    o12 = torch.cat([o1, o2], dim=1)
    assert_close(o12, o)
    assert_close(s2, s)
    for a, b in zip(torch.autograd.grad((o12 * w).sum() + s2.sum(), (q, k, v, decay)), whole):
        assert_close(a, b)


def test_state_pieces_compose_by_prefix_scan():
    """What context parallelism does: each rank's (local, carry) from a zero state, a prefix
    scan for the initial states, then each rank's output with its initial state."""
    T, block = 60, 8
    q, k, v, decay = (x.detach() for x in make_inputs(2, T))
    reset = resets([[T], [25, 35]])
    o, s = linear_attention(q, k, v, decay, block=block, reset=reset, return_state=True)
    bounds = [(0, 20), (20, 21), (21, 47), (47, 60)]
    S = torch.zeros(2, H, K, V, dtype=F64)
    outs = []
    for a, b in bounds:
        outs.append(linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], decay, block=block, reset=reset[:, a:b],
                                     initial_state=S))
        local, carry = linear_attention_state(k[:, a:b], v[:, a:b], decay, block=block, reset=reset[:, a:b])
        S = carry[..., None, None] * S + local
    assert_close(torch.cat(outs, dim=1), o)
    assert_close(S, s)


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == [2.0 ** (-(h + 1)) for h in range(8)]
    assert alibi_slopes(4).tolist() == [2.0 ** (-2 * (h + 1)) for h in range(4)]
    assert alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]


def test_shape_errors_name_the_shapes():
    q, k, v, decay = (x.detach() for x in make_inputs(1, 5))
    with pytest.raises(ValueError, match=r"\(B, T, H, V\)"):
        linear_attention(q, k, v[:, :, :2], decay)
    with pytest.raises(ValueError, match=r"decay must be \(H,\)"):
        linear_attention(q, k, v, decay[:2])
    with pytest.raises(ValueError, match="reset must be a bool"):
        linear_attention(q, k, v, decay, reset=torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"initial_state must be \(B, H, K, V\)"):
        linear_attention(q, k, v, decay, initial_state=torch.zeros(1, H, K, K))
    with pytest.raises(ValueError, match="unknown linear_attention impl"):
        linear_attention(q, k, v, decay, impl="triton")


@pytest.mark.slow
def test_past_131k_tokens_two_pieces_equal_whole():
    """Index arithmetic past 2^17 tokens on the chunked path."""
    T, split = 140_000, 131_075
    q, k, v = (torch.randn(1, T, 1, 2) for _ in range(3))
    decay = torch.tensor([1e-3])
    with torch.no_grad():
        o, s = linear_attention(q, k, v, decay, return_state=True)
        o1, s1 = linear_attention(q[:, :split], k[:, :split], v[:, :split], decay, return_state=True)
        o2, s2 = linear_attention(q[:, split:], k[:, split:], v[:, split:], decay, initial_state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s2, s, atol=1e-4, rtol=1e-5)
