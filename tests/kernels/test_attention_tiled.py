"""Tiled packed-document attention (kernels/attention/tiled.py) equals the dense
masked reference: outputs, log-sum-exp and gradients of q, k, v, for awkward
lengths, GQA, tiny and long documents, a sliding window, queries that are the
last T of S keys (a cache), and several rows with different documents; impl="auto"
picks it on CPU for several documents; the grouping covers each row with whole
documents; ids that come back later are refused by impl="tiled".
"""
import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.attention import attention
from loom.kernels.attention.tiled import document_groups


def _ids(lengths_per_row):
    return torch.stack([torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(row)])
                        for row in lengths_per_row])


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    o = out[0] if isinstance(out, tuple) else out
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    loss = (o * g).sum() + (out[1].sum() if isinstance(out, tuple) else 0)
    loss.backward()
    return out, [x.grad for x in xs]


CASES = [
    # (rows of document lengths, H, G, K, window, T (queries; None = S), tile)
    ([[63, 50]], 2, 2, 8, None, None, 16),
    ([[5, 3, 1, 40, 2, 2, 60]], 4, 2, 8, None, None, 16),
    ([[113, 7, 3], [1, 1, 121]], 2, 1, 12, None, None, 32),
    ([[30, 20, 70]], 2, 2, 8, 9, None, 16),
    ([[30, 20, 70]], 2, 2, 8, None, 50, 16),
    ([[70, 5, 5, 5, 35]], 3, 3, 10, 13, 37, 16),
]


@pytest.mark.parametrize("docs,H,G,K,window,T,tile", CASES)
@pytest.mark.parametrize("return_lse", [False, True])
def test_tiled_equals_dense(docs, H, G, K, window, T, tile, return_lse, monkeypatch):
    monkeypatch.setattr("loom.kernels.attention.tiled.TILE", tile)
    seq_ids = _ids(docs)
    B, S = seq_ids.shape
    T = T or S
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, S, G, K, generator=g, dtype=torch.float64) for _ in range(2))
    kw = dict(seq_ids=seq_ids, window=window, return_lse=return_lse)
    want, want_g = _grads(lambda a, b, c: attention(a, b, c, impl="reference", **kw), q, k, v)
    got, got_g = _grads(lambda a, b, c: attention(a, b, c, impl="tiled", **kw), q, k, v)
    # the lse path of reference.py computes in fp32 even for fp64 inputs: fp32 tolerances there
    tol = dict(rtol=1e-5, atol=1e-5) if return_lse else {}
    for x, y in zip(got if return_lse else [got], want if return_lse else [want]):
        torch.testing.assert_close(x, y, **tol)
    for x, y in zip(got_g, want_g):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, **tol)


def test_tile_setting_reaches_groups():
    seq_ids = _ids([[5, 3, 1, 40, 2, 2, 60]])[0]
    assert document_groups(seq_ids, tile=16) == [(0, 9, True), (9, 49, False), (49, 53, True), (53, 113, False)]
    assert document_groups(seq_ids, tile=1000) == [(0, 113, True)]
    groups = document_groups(_ids([[3] * 40])[0], tile=16)  # five 3-token documents per group
    assert groups == [(15 * i, 15 * (i + 1), True) for i in range(8)]


def test_auto_picks_tiled_for_several_documents_on_cpu():
    dispatch.reset()
    seq_ids = _ids([[10, 20]])
    q, k, v = (torch.randn(1, 30, 2, 8) for _ in range(3))
    attention(q, k, v, seq_ids=seq_ids)
    assert dispatch.chosen()["attention"] == ["tiled"]
    attention(q, k, v, seq_ids=torch.zeros(1, 30, dtype=torch.int64))  # one document: the fused causal path
    assert dispatch.chosen()["attention"] == ["tiled", "sdpa"]


def test_ids_coming_back_go_dense_or_fail():
    seq_ids = _ids([[10, 10, 10]])
    seq_ids[0, 20:] = 0  # document 0 again after document 1
    q, k, v = (torch.randn(1, 30, 2, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, seq_ids=seq_ids),
                               attention(q, k, v, seq_ids=seq_ids, impl="reference"))
    with pytest.raises(ValueError, match="never decrease"):
        attention(q, k, v, seq_ids=seq_ids, impl="tiled")
