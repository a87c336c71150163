"""Context-parallel softmax attention (kernels/attention/cp.py, ring.py, ulysses.py, halo.py) against the
single-process op loom.kernels.attention.

Multi-process (gloo, CPU, fp64 unless named fp32), for cp = 2 and cp = 4: every
rank's output shard and its dq / dk / dv shards (fixed random upstream gradient)
equal the slices of the single-process forward and backward, for
    ring     zigzag and contiguous layouts, GQA (H=4, G=2), MQA, windowed, fp32,
             query tiles of 5 rows (several per chunk, the last one ragged);
    ulysses  both layouts, K/V heads sharded (cp=2) and replicated (G < cp=4), windowed;
    halo     (swa) both layouts, window shorter and longer than a chunk, window 0;
with packed documents that cross shard boundaries (and a one-token document),
or one document per row given as seq_ids (ulysses then drops the mask).
Also: gather_sequence inverts shard_sequence, and the analytic comm_bytes equals
the bytes the ops actually send. In-process: layout arithmetic, cp=1 and the
ValueErrors. Cost: one spawned group per world size (about 2 s for cp=2 and
8 s for cp=4 on 2 cores), all cases run inside it.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from loom.kernels.attention import attention
from loom.kernels.attention import ring as ring_module
from loom.kernels.attention.cp import cp_attention, halo_attention, ring_attention, ulysses_attention
from loom.kernels.context_parallel import CPContext, comm_bytes, gather_sequence, shard_positions, shard_sequence
from loom.kernels.context_parallel.all_to_all import ulysses_kv_heads
from loom.kernels.context_parallel.halo import halo_plan

import loomtest

B, T, K = 2, 48, 6
DOC_LENS = ([5, 17, 1, 3, 22], [30, 18])  # documents cross every chunk boundary at cp = 2 and 4

# name -> (op, layout, window, docs, H, G, dtype); op "auto" is the public dispatcher cp_attention,
# "ring_tiled" is ring_attention with _TILE_ROWS = 5; docs "one" is seq_ids of one document per row.
CASES = {
    "ring_zigzag": ("auto", "zigzag", None, False, 4, 2, torch.float64),
    "ring_zigzag_docs": ("auto", "zigzag", None, True, 4, 2, torch.float64),
    "ring_contiguous_docs": ("auto", "contiguous", None, True, 4, 2, torch.float64),
    "ring_zigzag_mqa_docs": ("auto", "zigzag", None, True, 4, 1, torch.float64),
    "ring_zigzag_window_docs": ("ring", "zigzag", 7, True, 4, 2, torch.float64),
    "ring_zigzag_docs_fp32": ("auto", "zigzag", None, True, 4, 2, torch.float32),
    "ring_zigzag_tiled_docs": ("ring_tiled", "zigzag", None, True, 4, 2, torch.float64),
    "ring_contiguous_tiled_window_docs": ("ring_tiled", "contiguous", 7, True, 4, 2, torch.float64),
    "ulysses_zigzag_docs": ("ulysses_auto", "zigzag", None, True, 4, 2, torch.float64),
    "ulysses_contiguous": ("ulysses_auto", "contiguous", None, False, 4, 2, torch.float64),
    "ulysses_zigzag_one_doc": ("ulysses_auto", "zigzag", None, "one", 4, 2, torch.float64),
    "ulysses_zigzag_mqa_docs": ("ulysses_auto", "zigzag", None, True, 4, 1, torch.float64),
    "ulysses_zigzag_window_docs": ("ulysses", "zigzag", 9, True, 4, 2, torch.float64),
    "halo_contiguous_docs": ("auto", "contiguous", 5, True, 4, 2, torch.float64),
    "halo_zigzag_docs": ("auto", "zigzag", 5, True, 4, 2, torch.float64),
    "halo_contiguous_long_window_docs": ("auto", "contiguous", 30, True, 4, 2, torch.float64),
    "halo_zigzag_long_window_docs": ("auto", "zigzag", 30, True, 4, 2, torch.float64),
    "halo_zigzag_window0": ("halo", "zigzag", 0, False, 4, 2, torch.float64),
}
# Cases whose measured bytes are compared with comm_bytes: name -> comm_bytes path.
COMM_CASES = {"ring_zigzag_docs": "ring", "ulysses_zigzag_docs": "ulysses", "ulysses_zigzag_mqa_docs": "ulysses",
              "halo_contiguous_docs": "halo", "halo_zigzag_long_window_docs": "halo"}
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
COUNTED = ("batch_isend_irecv", "all_to_all_single", "all_gather")  # the torch.distributed calls the ops use


def _doc_ids() -> torch.Tensor:
    rows = [torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)) for lens in DOC_LENS]
    return torch.stack(rows)  # (B, T)


def _run_case(name: str, world: int) -> dict:
    op, layout, window, docs, H, G, dtype = CASES[name]
    impl = "ulysses" if op.startswith("ulysses") else "ring"
    cp = CPContext.from_group(None, impl=impl, layout=layout)
    g = torch.Generator().manual_seed(1234)  # identical full tensors on every rank
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, G, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, G, K, generator=g, dtype=dtype)
    do = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    seq_ids = {True: _doc_ids(), "one": torch.zeros(B, T, dtype=torch.long), False: None}[docs]

    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = attention(*ref, seq_ids=seq_ids, window=window)
    o_ref.backward(do)

    loc = [shard_sequence(t, cp).clone().requires_grad_() for t in (q, k, v)]
    sid = None if seq_ids is None else shard_sequence(seq_ids, cp)
    fn = {"auto": cp_attention, "ulysses_auto": cp_attention, "ring": ring_attention, "ring_tiled": ring_attention,
          "ulysses": ulysses_attention, "halo": halo_attention}[op]
    kwargs = dict(seq_ids=sid) if op in ("auto", "ulysses_auto") and window is None else \
        dict(seq_ids=sid, window=window)
    with mock.patch.object(ring_module, "_TILE_ROWS", 5 if op == "ring_tiled" else ring_module._TILE_ROWS):
        with loomtest.ByteCounter(world, COUNTED) as fwd:
            o = fn(*loc, cp, **kwargs)
        with loomtest.ByteCounter(world, COUNTED) as bwd:
            o.backward(shard_sequence(do, cp))

    tol = TOL[dtype]
    torch.testing.assert_close(o, shard_sequence(o_ref, cp), **tol, msg=lambda m: f"output: {m}")
    for what, a, b in zip("qkv", loc, ref):
        assert not torch.isnan(a.grad).any(), f"NaN in d{what}"
        torch.testing.assert_close(a.grad, shard_sequence(b.grad, cp), **tol, msg=lambda m: f"d{what}: {m}")
    torch.testing.assert_close(gather_sequence(o.detach(), cp), o_ref.detach(), **tol,
                               msg=lambda m: f"gather_sequence: {m}")
    return {"bytes": [fwd.n, bwd.n]}


@pytest.fixture(scope="module")
def cp_results(request, tmp_path_factory) -> dict:
    """Runs one gloo group of request.param ranks; returns {case: [result of each rank]}."""
    world = request.param
    return loomtest.launch(__file__, world, list(CASES), tmp_path_factory.mktemp(f"cp{world}"))


@pytest.mark.distributed
@pytest.mark.parametrize("cp_results", [2, 4], indirect=True, ids=["cp2", "cp4"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_single_process(cp_results, case):
    loomtest.assert_no_errors(cp_results[case])


@pytest.mark.distributed
@pytest.mark.parametrize("cp_results", [2, 4], indirect=True, ids=["cp2", "cp4"])
@pytest.mark.parametrize("case", list(COMM_CASES))
def test_comm_bytes_matches_measured(cp_results, case):
    world = cp_results["world"]
    op, layout, window, docs, H, G, dtype = CASES[case]
    measured = loomtest.busiest_bytes(cp_results[case])
    expected = comm_bytes(COMM_CASES[case], batch=B, seq_len=T, n_heads=H, n_kv_heads=G, head_dim=K, cp=world,
                          elem_bytes=torch.finfo(dtype).bits // 8, docs=docs, window=window, layout=layout)
    assert tuple(measured) == tuple(expected)


# ---- in-process: layouts, plans, errors -------------------------------------------------------

def _ctx(world, rank=0, layout="zigzag", impl="ring"):
    return CPContext(None, rank, world, impl, layout)


def test_zigzag_and_contiguous_positions():
    assert shard_positions(8, _ctx(2, 0)).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, _ctx(2, 1)).tolist() == [2, 3, 4, 5]
    assert shard_positions(8, _ctx(2, 1, "contiguous")).tolist() == [4, 5, 6, 7]
    x = torch.arange(16).view(1, 16)
    shards = [shard_sequence(x, _ctx(4, r)) for r in range(4)]
    assert torch.cat(shards, 1).sort().values.tolist() == x.tolist()
    assert shards[3].tolist() == [[6, 7, 8, 9]]


def test_seq_len_not_divisible_raises():
    with pytest.raises(ValueError, match=r"T=50.*cp=4"):
        shard_sequence(torch.zeros(1, 50), _ctx(4))
    with pytest.raises(ValueError, match=r"T=6.*cp=4"):
        shard_positions(6, _ctx(4, layout="contiguous"))
    q = torch.zeros(1, 3, 4, 6)  # L = 3 per rank -> T = 6 cannot be cut into 2 * cp = 4 chunks
    with pytest.raises(ValueError, match=r"T=6.*cp=2"):
        cp_attention(q, q[:, :, :2], q[:, :, :2], _ctx(2))


def test_bad_context_and_ulysses_heads_raise():
    with pytest.raises(ValueError, match="impl"):
        CPContext(None, 0, 2, impl="tree")
    with pytest.raises(ValueError, match="layout"):
        CPContext(None, 0, 2, layout="striped")
    with pytest.raises(ValueError, match=r"H=6.*cp=4"):
        ulysses_kv_heads(6, 2, 4)
    with pytest.raises(ValueError, match=r"G=3.*cp=2"):
        ulysses_kv_heads(6, 3, 2)
    assert ulysses_kv_heads(8, 4, 2) == 4 and ulysses_kv_heads(8, 2, 4) == 4


def test_single_rank_is_the_plain_op():
    q, k, v = torch.randn(2, 12, 4, 6), torch.randn(2, 12, 2, 6), torch.randn(2, 12, 2, 6)
    sid = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for window in (None, 3):
        torch.testing.assert_close(cp_attention(q, k, v, _ctx(1), seq_ids=sid, window=window),
                                   attention(q, k, v, seq_ids=sid, window=window), atol=0, rtol=0)


def test_halo_plan():
    # contiguous, window within a shard: rank r >= 1 receives the last W rows of rank r - 1.
    plan = halo_plan(48, 4, "contiguous", 5)
    assert [(p.src, p.src_lo, p.src_hi, p.dst) for p in plan] == [(r - 1, 7, 12, r) for r in (1, 2, 3)]
    # zigzag cp=2 (chunks 0,3 | 1,2 of 12): chunk 1 <- tail of chunk 0 (rank 0 rows 7:12),
    # chunk 2 <- tail of chunk 1 (rank 1's own rows 7:12), chunk 3 <- tail of chunk 2 (rank 1 rows 19:24).
    plan = halo_plan(48, 2, "zigzag", 5)
    assert {(p.src, p.src_lo, p.src_hi, p.dst, p.dst_chunk) for p in plan} == {
        (1, 19, 24, 0, 1), (0, 7, 12, 1, 0), (1, 7, 12, 1, 1)}
    # a window longer than a chunk spans several chunks
    assert sum(p.src_hi - p.src_lo for p in halo_plan(48, 4, "contiguous", 30) if p.dst == 3) == 30


def test_comm_bytes_formulas():
    kw = dict(batch=1, seq_len=32768, head_dim=128, cp=4, docs=False)
    ring = comm_bytes("ring", n_heads=32, n_kv_heads=32, **kw)
    uly = comm_bytes("ulysses", n_heads=32, n_kv_heads=32, **kw)
    assert ring.forward == 3 * 2 * 8192 * 32 * 128 * 2
    assert ring.forward == 2 * uly.forward  # MHA: ring / ulysses = cp / 2
    assert comm_bytes("ring", n_heads=32, n_kv_heads=8, **kw).forward * 5 == \
        comm_bytes("ulysses", n_heads=32, n_kv_heads=8, **kw).forward * 4  # G cp / (H + G) = 0.8
    assert comm_bytes("halo", n_heads=32, n_kv_heads=8, window=4096, layout="contiguous", **kw).forward == \
        4096 * 2 * 8 * 128 * 2


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
