"""loom.kernels.memory (Titans neural memory): the chunked op against its definitions.

Checks, in fp64 with tight tolerances unless stated (fast tier, ~10 s in all):
- chunk size 1: chunked == the token-by-token definition, forward and gradients
  w.r.t. q, k, v, the three gates and W0, for depths 1-2 and both read-outs;
- chunk size > 1 with T not a multiple of it: chunked == naive chunk loop
  (materialised per-token gradients) == the token loop, forward and gradients,
  including gradients of the returned final state; chunk size matters;
- causality (perturbing token t leaves outputs before t bit-identical);
- document resets: a packed row equals its documents run separately, with the
  boundary inside a chunk, forward and gradients; different reset positions
  per row;
- state carry: two pieces == whole at any split, and token-by-token decoding;
- fp32 error against fp64 within a few times the fp32 token loop's own error;
- masked (skipped) tokens; a 131K+-token sequence with resets and a split;
- shape validation errors;
- momentum_step="chunk": at chunk size 1 the token rule; chunked == naive chunk loop ==
  token loop with resets, masks and gates that count only at chunk starts; causality,
  state carry at mid-chunk cuts and token-by-token decoding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels.memory import MemoryState, init_memory_weights, neural_memory
from loom.kernels.memory.reference import neural_memory_naive_chunks, neural_memory_reference

F64 = dict(rtol=1e-9, atol=1e-11)


def make_inputs(B=2, T=37, H=2, K=4, depth=2, expansion=2, dtype=torch.float64, grad=False):
    """Unit-norm q/k (as the mixers feed them), bounded v and moderate gates: a stable memory."""
    q, k = (F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, K, dtype=dtype) / K ** 0.5
    theta = 0.2 * torch.rand(B, T, H, dtype=dtype)
    eta = 0.2 + 0.8 * torch.rand(B, T, H, dtype=dtype)
    alpha = 0.1 * torch.rand(B, T, H, dtype=dtype)
    W0 = [w.to(dtype) for w in init_memory_weights(H, K, depth, expansion)]
    xs = [q, k, v, theta, eta, alpha, *W0]
    if grad:
        for x in xs:
            x.requires_grad_()
    return xs


def split(xs):
    return (*xs[:6], xs[6:])


def chunked(xs, **kw):
    return neural_memory(*split(xs), return_state=True, **kw)


def chunked_fn(*args, **kw):
    return neural_memory(*args, return_state=True, **kw)


def outputs_and_grads(fn, xs, wrt=None, **kw):
    """y, final state, and the gradients of a fixed random functional of y and of the
    final weights and momentum w.r.t. every input (or `wrt`)."""
    y, st = fn(*split(xs), **kw)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for w in (*st.weights, *st.momentum):
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
    return y, st, torch.autograd.grad(loss, xs if wrt is None else wrt, allow_unused=True)


def assert_all_close(a, b, **tol):
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, i
            continue
        torch.testing.assert_close(x, y, msg=lambda m: f"item {i}: {m}", **tol)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunk_size_one_equals_token_loop(depth, retrieval):
    xs = make_inputs(T=11, depth=depth, grad=True)
    y_ref, st_ref, g_ref = outputs_and_grads(neural_memory_reference, xs, chunk_size=1, retrieval=retrieval)
    y, st, g = outputs_and_grads(chunked_fn, xs, chunk_size=1, retrieval=retrieval)
    torch.testing.assert_close(y, y_ref, **F64)
    assert_all_close(st.weights + st.momentum, st_ref.weights + st_ref.momentum, **F64)
    assert_all_close(g, g_ref, **F64)
    assert all(x is not None and x.abs().sum() > 0 for x in g)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunks_equal_naive_chunk_loop_and_token_loop(depth, retrieval):
    xs = make_inputs(T=37, depth=depth, grad=True)
    kw = dict(chunk_size=8, retrieval=retrieval)
    y_naive, st_naive, g_naive = outputs_and_grads(neural_memory_naive_chunks, xs, **kw)
    y, st, g = outputs_and_grads(chunked_fn, xs, **kw)
    torch.testing.assert_close(y, y_naive, **F64)
    assert_all_close(st.weights + st.momentum + st.base, st_naive.weights + st_naive.momentum + st_naive.base,
                     **F64)
    assert st.offset.tolist() == st_naive.offset.tolist() == [37 % 8] * 2
    assert_all_close(g, g_naive, **F64)
    y_seq, _ = neural_memory_reference(*split(xs), **kw)
    torch.testing.assert_close(y, y_seq, **F64)


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunk_size_changes_the_result(retrieval):
    xs = make_inputs(T=24)
    y1 = neural_memory(*split(xs), chunk_size=1, retrieval=retrieval)
    y8 = neural_memory(*split(xs), chunk_size=8, retrieval=retrieval)
    assert (y1 - y8).abs().max() > 1e-3


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_normalised_output_memory(depth, retrieval):
    # M(x) = rmsnorm(MLP(x)) * gamma: chunk size 1 against the token loop, chunks against the
    # naive loop; gradients w.r.t. every input and gamma.
    xs = make_inputs(T=21, depth=depth, grad=True)
    gamma = (0.5 + torch.rand(2, 4, dtype=torch.float64)).requires_grad_()
    inputs = xs + [gamma]
    for chunk, oracle in ((1, neural_memory_reference), (8, neural_memory_naive_chunks)):
        kw = dict(chunk_size=chunk, retrieval=retrieval, norm_weight=gamma)
        y_ref, _, g_ref = outputs_and_grads(oracle, xs, wrt=inputs, **kw)
        y, _, g = outputs_and_grads(chunked_fn, xs, wrt=inputs, **kw)
        torch.testing.assert_close(y, y_ref, **F64)
        assert_all_close(g, g_ref, **F64)
    assert g[-1].abs().sum() > 0


def test_deeper_memory_and_silu():
    xs = make_inputs(T=19, depth=3, grad=True)
    kw = dict(chunk_size=4, activation="silu", retrieval="token")
    y_ref, _, g_ref = outputs_and_grads(neural_memory_naive_chunks, xs, **kw)
    y, _, g = outputs_and_grads(chunked_fn, xs, **kw)
    torch.testing.assert_close(y, y_ref, **F64)
    assert_all_close(g, g_ref, **F64)


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_causality(retrieval):
    xs = make_inputs(T=29)
    y = neural_memory(*split(xs), chunk_size=8, retrieval=retrieval)
    for t in (0, 5, 8, 20, 28):
        pert = [x.clone() for x in xs]
        for x in pert[:6]:
            x[:, t] += 0.5
        y_p = neural_memory(*split(pert), chunk_size=8, retrieval=retrieval)
        assert torch.equal(y_p[:, :t], y[:, :t]), t
        if retrieval == "token" or t % 8 == 0:  # token t itself reads the perturbed q at least
            assert not torch.equal(y_p[:, t], y[:, t])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_packed_documents_equal_separate_runs(depth, retrieval):
    # Documents of 13 and 24 tokens in one row; with chunk 8 the boundary is inside a chunk.
    xs = make_inputs(B=1, T=37, depth=depth, grad=True)
    reset = torch.zeros(1, 37, dtype=torch.bool)
    reset[0, 13] = True
    kw = dict(chunk_size=8, retrieval=retrieval)
    y, st, g = outputs_and_grads(chunked_fn, xs, reset=reset, **kw)
    first = [x[:, :13] for x in xs[:6]] + xs[6:]
    second = [x[:, 13:] for x in xs[:6]] + xs[6:]
    y1 = neural_memory(*split(first), **kw)
    y2, st2 = neural_memory(*split(second), return_state=True, **kw)
    torch.testing.assert_close(y, torch.cat([y1, y2], 1), **F64)
    assert_all_close(st.weights + st.momentum + st.base, st2.weights + st2.momentum + st2.base, **F64)
    # Gradients: the same functional computed on the separate runs.
    _, _, g_sep = outputs_and_grads(
        lambda *a, **k: _packed_by_hand(*a, **k), xs, **kw)
    assert_all_close(g, g_sep, **F64)
    # And the definition agrees on the packed row.
    y_seq, _ = neural_memory_reference(*split(xs), reset=reset, **kw)
    torch.testing.assert_close(y, y_seq, **F64)


def _packed_by_hand(q, k, v, theta, eta, alpha, W0, **kw):
    """Two separate runs glued together, returning the second run's final state."""
    parts = [[x[:, a:b] for x in (q, k, v, theta, eta, alpha)] for a, b in ((0, 13), (13, 37))]
    y1 = neural_memory(*parts[0], W0, **kw)
    y2, st2 = neural_memory(*parts[1], W0, return_state=True, **kw)
    return torch.cat([y1, y2], 1), st2


def test_first_token_of_a_document_does_not_see_the_previous_one():
    # Only the previous document changes: the new document's outputs must not move.
    xs = make_inputs(B=1, T=20)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 6] = True
    y = neural_memory(*split(xs), chunk_size=8, reset=reset, retrieval="token")
    pert = [x.clone() for x in xs]
    for x in pert[:6]:
        x[:, :6] *= 1.5
    y_p = neural_memory(*split(pert), chunk_size=8, reset=reset, retrieval="token")
    assert torch.equal(y_p[:, 6:], y[:, 6:])
    assert not torch.equal(y_p[:, :6], y[:, :6])


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_resets_at_different_positions_per_row(retrieval):
    xs = make_inputs(B=3, T=30, grad=True)
    reset = torch.zeros(3, 30, dtype=torch.bool)
    reset[0, [0, 3, 17]] = True     # reset at t = 0, a short document, a mid-chunk start
    reset[1, [8, 9, 29]] = True     # on the grid, a 1-token document, the last token
    kw = dict(chunk_size=6, retrieval=retrieval)
    y_ref, st_ref, g_ref = outputs_and_grads(neural_memory_reference, xs, reset=reset, **kw)
    y, st, g = outputs_and_grads(chunked_fn, xs, reset=reset, **kw)
    torch.testing.assert_close(y, y_ref, **F64)
    assert_all_close(st.weights + st.momentum + st.base, st_ref.weights + st_ref.momentum + st_ref.base, **F64)
    assert st.offset.tolist() == st_ref.offset.tolist() == [(30 - 17) % 6, 1, 0]
    assert_all_close(g, g_ref, **F64)
    # Row 2 has no reset: it equals its own run.
    y2 = neural_memory(*(x[2:] for x in xs[:6]), xs[6:], **kw)
    torch.testing.assert_close(y[2:], y2, **F64)


def two_pieces(cut: int):
    """The op on tokens [:cut], then on [cut:] from the carried state; outputs concatenated."""
    def run(q, k, v, theta, eta, alpha, W0, reset, **kw):
        a = [x[:, :cut] for x in (q, k, v, theta, eta, alpha)]
        b = [x[:, cut:] for x in (q, k, v, theta, eta, alpha)]
        ya, sa = neural_memory(*a, W0, reset=reset[:, :cut], return_state=True, **kw)
        yb, sb = neural_memory(*b, W0, reset=reset[:, cut:], state=sa, return_state=True, **kw)
        return torch.cat([ya, yb], 1), sb
    return run


@pytest.mark.parametrize("cut", [16, 13, 1])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_two_pieces_with_carried_state_equal_whole(cut, retrieval):
    xs = make_inputs(T=37, grad=True)
    reset = torch.zeros(2, 37, dtype=torch.bool)
    reset[1, 21] = True
    kw = dict(chunk_size=8, retrieval=retrieval)
    y, st, g = outputs_and_grads(chunked_fn, xs, reset=reset, **kw)

    y2, st2, g2 = outputs_and_grads(two_pieces(cut), xs, reset=reset, **kw)
    torch.testing.assert_close(y2, y, **F64)
    assert_all_close(st2.weights + st2.momentum + st2.base, st.weights + st.momentum + st.base, **F64)
    assert st2.offset.tolist() == st.offset.tolist()
    assert_all_close(g2, g, **F64)


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_token_by_token_decoding_equals_forward(retrieval):
    xs = make_inputs(T=21)
    kw = dict(chunk_size=8, retrieval=retrieval)
    y, st = chunked(xs, **kw)
    state, ys = None, []
    for t in range(21):
        y_t, state = neural_memory(*(x[:, t:t + 1] for x in xs[:6]), xs[6:], state=state,
                                   return_state=True, **kw)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)
    assert_all_close(state.weights + state.momentum, st.weights + st.momentum, **F64)


def test_fp32_error_is_close_to_the_definitions_own_fp32_error():
    xs64 = make_inputs(T=40, depth=2)
    xs32 = [x.float() for x in xs64]
    kw = dict(chunk_size=8, retrieval="token")
    y64, _ = neural_memory_reference(*split(xs64), **kw)
    y_seq32, _ = neural_memory_reference(*split(xs32), **kw)
    y32 = neural_memory(*split(xs32), **kw)
    assert y32.dtype == torch.float32 and not y32.isnan().any()
    base_err = (y_seq32.double() - y64).abs().max().item()
    err = (y32.double() - y64).abs().max().item()
    assert err <= 4 * base_err + 1e-6, (err, base_err)
    y16 = neural_memory(*split([x.bfloat16() if x.dim() > 3 else x.float() for x in xs32]), **kw)
    assert y16.dtype == torch.bfloat16 and not y16.isnan().any()


def test_state_initial_matches_none():
    xs = make_inputs(T=10)
    y = neural_memory(*split(xs), chunk_size=4)
    y_s = neural_memory(*split(xs), chunk_size=4, state=MemoryState.initial(xs[6:], 2))
    assert torch.equal(y, y_s)


def test_validation_errors_name_the_shapes():
    q, k, v, th, et, al, *W0 = make_inputs(T=5)
    with pytest.raises(ValueError, match=r"\(2, 5, 2, 4\).*\(2, 4, 2, 4\)"):
        neural_memory(q, k[:, :4], v, th, et, al, W0, chunk_size=2)
    with pytest.raises(ValueError, match=r"eta must be \(B, T, H\) = \(2, 5, 2\); got \(2, 5\)"):
        neural_memory(q, k, v, th, et[..., 0], al, W0, chunk_size=2)
    with pytest.raises(ValueError, match=r"init_weights\[1\] must be"):
        neural_memory(q, k, v, th, et, al, [W0[0], W0[0]], chunk_size=2)
    with pytest.raises(ValueError, match="reset must be"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=2, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=0)
    with pytest.raises(ValueError, match="retrieval"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=2, retrieval="after")
    with pytest.raises(ValueError, match="momentum_step"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=2, momentum_step="segment")
    with pytest.raises(ValueError, match="impl"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=2, impl="cuda-graph")
    st = MemoryState.initial(W0, 2)
    st.offset = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="offset"):
        neural_memory(q, k, v, th, et, al, W0, chunk_size=2, state=st)


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_masked_tokens_are_skipped(retrieval):
    xs = make_inputs(B=2, T=30, grad=True)
    mask = torch.rand(2, 30) > 0.3
    mask[1] = False
    mask[1, 5:9] = True
    reset = torch.zeros(2, 30, dtype=torch.bool)
    reset[0, torch.nonzero(mask[0])[4, 0]] = True
    kw = dict(chunk_size=4, retrieval=retrieval, reset=reset, mask=mask)
    y_ref, st_ref, g_ref = outputs_and_grads(neural_memory_naive_chunks, xs, **kw)
    y, st, g = outputs_and_grads(chunked_fn, xs, **kw)
    torch.testing.assert_close(y, y_ref, **F64)
    assert (y[~mask] == 0).all()
    assert st.offset.tolist() == st_ref.offset.tolist()
    assert_all_close(st.weights + st.momentum + st.base, st_ref.weights + st_ref.momentum + st_ref.base, **F64)
    assert_all_close(g, g_ref, **F64)
    y_seq, _ = neural_memory_reference(*split(xs), **kw)
    torch.testing.assert_close(y, y_seq, **F64)
    # Row 1 keeps tokens 5..8 only: the same as running those four alone.
    y1 = neural_memory(*(x[1:, 5:9] for x in xs[:6]), xs[6:], chunk_size=4, retrieval=retrieval)
    torch.testing.assert_close(y[1:, 5:9], y1, **F64)


def test_long_sequence_past_int32_offsets():
    # 2^17 + 37 tokens (past where int32 offsets of common shapes overflow), with resets: the
    # layout's int64 indices, a split with carried state equal to the whole, and finite outputs.
    T = 2 ** 17 + 37
    xs = make_inputs(B=1, T=T, H=1, K=4, depth=1, dtype=torch.float32)
    xs[3] = xs[3] / (0.2 * 2 * 64)  # theta <= 1 / (2 chunk): stable over any length (see models/mixers/memory.py)
    reset = torch.zeros(1, T, dtype=torch.bool)
    reset[0, [5, 70_001, 131_000]] = True
    kw = dict(chunk_size=64, retrieval="token")
    y, st = chunked(xs, reset=reset, **kw)
    cut = T - 300
    _, st_a = neural_memory(*(x[:, :cut] for x in xs[:6]), xs[6:], reset=reset[:, :cut], return_state=True, **kw)
    y_b, st_b = neural_memory(*(x[:, cut:] for x in xs[:6]), xs[6:], reset=reset[:, cut:], state=st_a,
                              return_state=True, **kw)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y_b, y[:, cut:], rtol=1e-5, atol=1e-6)
    assert st_b.offset.tolist() == st.offset.tolist() == [(T - 131_000) % 64]


@pytest.mark.parametrize("retrieval, momentum_step", [pytest.param("chunk", "token", marks=pytest.mark.slow),
                                                     ("token", "token"),
                                                     pytest.param("token", "chunk", marks=pytest.mark.slow)])
def test_compiled_backend_equals_eager(retrieval, momentum_step):
    # impl="compiled" runs each block through torch.compile: the same results, forward, final state and
    # gradients, with per-row resets inside chunks, a carried state and the output norm.
    xs = make_inputs(B=2, T=29, depth=2, grad=True)
    reset = torch.zeros(2, 29, dtype=torch.bool)
    reset[0, 11] = reset[1, 3] = True
    norm = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(chunk_size=8, retrieval=retrieval, reset=reset, norm_weight=norm, momentum_step=momentum_step)
    _, st = chunked(xs, **kw)
    state = st.detach()
    state.offset = torch.tensor([3, 0])
    ref = outputs_and_grads(chunked_fn, xs, wrt=xs + [norm], state=state, **kw)
    out = outputs_and_grads(chunked_fn, xs, wrt=xs + [norm], state=state, impl="compiled", **kw)
    torch.testing.assert_close(out[0], ref[0], **F64)
    assert_all_close(out[1].weights + out[1].momentum + out[1].base, ref[1].weights + ref[1].momentum + ref[1].base,
                     **F64)
    assert_all_close(out[2], ref[2], **F64)


# momentum_step="chunk": momentum and decay step once per chunk, at its first token (titans-pytorch's rule).


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunk_step_at_chunk_size_one_is_the_token_rule(depth, retrieval):
    xs = make_inputs(T=11, depth=depth, grad=True)
    y_ref, st_ref, g_ref = outputs_and_grads(neural_memory_reference, xs, chunk_size=1, retrieval=retrieval)
    for fn in (neural_memory_reference, chunked_fn):
        y, st, g = outputs_and_grads(fn, xs, chunk_size=1, retrieval=retrieval, momentum_step="chunk")
        torch.testing.assert_close(y, y_ref, **F64)
        assert_all_close(st.weights + st.momentum, st_ref.weights + st_ref.momentum, **F64)
        assert_all_close(g, g_ref, **F64)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunk_step_equals_naive_chunk_loop_and_token_loop(depth, retrieval):
    # Resets inside chunks at different positions per row, a masked stretch, T not a multiple of the chunk.
    xs = make_inputs(B=3, T=37, depth=depth, grad=True)
    reset = torch.zeros(3, 37, dtype=torch.bool)
    reset[0, [3, 17]] = reset[1, [8, 36]] = True
    mask = torch.ones(3, 37, dtype=torch.bool)
    mask[2, 10:15] = False
    kw = dict(chunk_size=8, retrieval=retrieval, momentum_step="chunk", reset=reset, mask=mask)
    y, st, g = outputs_and_grads(chunked_fn, xs, **kw)
    for oracle in (neural_memory_naive_chunks, neural_memory_reference):
        y_ref, st_ref, g_ref = outputs_and_grads(oracle, xs, **kw)
        torch.testing.assert_close(y, y_ref, **F64)
        assert_all_close(st.weights + st.momentum + st.base, st_ref.weights + st_ref.momentum + st_ref.base, **F64)
        assert st.offset.tolist() == st_ref.offset.tolist()
        assert_all_close(g, g_ref, **F64)
    # eta and alpha count at a chunk's first token only. Row 0's chunks start at 0, 3 (reset), 11, 17 (reset),
    # 25, 33; eta at a document start multiplies S = 0, and chunk 11's step reaches no output before the reset
    # at 17 unless tokens read their own updates.
    nonzero = lambda x: bool(x.abs().sum() > 0)  # noqa: E731
    starts = (3, 11, 17, 25, 33) if retrieval == "token" else (3, 17, 25, 33)
    assert all(nonzero(g[5][0, t]) for t in starts) and all(nonzero(g[4][0, t]) for t in (25, 33))
    assert not any(nonzero(g[4][0, t]) or nonzero(g[5][0, t]) for t in (1, 4, 10, 12, 18, 24, 26, 34))
    y_token = neural_memory(*split(xs), chunk_size=8, retrieval=retrieval, reset=reset, mask=mask)
    assert (y_token - y).abs().max() > 1e-3


@pytest.mark.parametrize("retrieval", ["chunk", "token"])
def test_chunk_step_causality_state_carry_and_decoding(retrieval):
    xs = make_inputs(T=29, grad=True)
    reset = torch.zeros(2, 29, dtype=torch.bool)
    reset[1, 12] = True
    kw = dict(chunk_size=8, retrieval=retrieval, momentum_step="chunk")
    y, st, g = outputs_and_grads(chunked_fn, xs, reset=reset, **kw)
    for t in (0, 5, 8, 20, 28):  # perturbing token t leaves every earlier output bit-identical
        pert = [x.detach().clone() for x in xs]
        for x in pert[:6]:
            x[:, t] += 0.5
        y_p = neural_memory(*split(pert), reset=reset, **kw)
        assert torch.equal(y_p[:, :t], y.detach()[:, :t]), t
    for cut in (13, 16, 1):  # two pieces with the carried state, mid-chunk cuts included: the whole
        y2, st2, g2 = outputs_and_grads(two_pieces(cut), xs, reset=reset, **kw)
        torch.testing.assert_close(y2, y, **F64)
        assert_all_close(st2.weights + st2.momentum + st2.base, st.weights + st.momentum + st.base, **F64)
        assert_all_close(g2, g, **F64)
    state, ys = None, []  # token-by-token decoding
    with torch.no_grad():
        for t in range(29):
            y_t, state = neural_memory(*(x[:, t:t + 1] for x in xs[:6]), xs[6:], reset=reset[:, t:t + 1],
                                       state=state, return_state=True, **kw)
            ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y.detach(), **F64)
    assert_all_close(state.weights + state.momentum, st.weights + st.momentum, **F64)
