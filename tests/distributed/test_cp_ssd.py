"""The SSD op under context parallelism (kernels/ssd/cp.py) against the single process.

Multi-process (gloo, CPU, fp64), cp = 2, both layouts (zigzag and contiguous): every rank
builds the same full inputs, runs ssd on the full sequence and on its shard (x, dt, B, C,
doc_starts sharded, cp set), and checks its output shard, the returned final state (the
whole sequence's, on every rank), the gradients of its input shards, and the gradients of
A, D and dt_bias summed over ranks, against the single-process ones, with a fixed random
upstream gradient. Rows: documents crossing piece boundaries, one starting exactly at a
piece boundary (token 24), a one-token document; and a single-document row. Also the bytes
sent: (cp - 1) n_local B (H P N + H) fp64 numbers each way. Cost: ~5 s.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from loom.kernels.context_parallel import CPContext, shard_sequence
from loom.kernels.ssd import ssd

import loomtest

Bt, T, H, P, G, N = 2, 48, 4, 3, 2, 5
CASES = ("zigzag_docs", "contiguous_docs", "zigzag_one_doc", "contiguous_one_doc")
TOL = dict(atol=1e-11, rtol=1e-9)


def _inputs():
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(Bt, T, H, P), dt=r(Bt, T, H), B=r(Bt, T, G, N), C=r(Bt, T, G, N)), \
        dict(A=-torch.rand(H, generator=g, dtype=torch.float64), D=r(H), dt_bias=r(H))


def _run_case(name: str, world: int) -> dict:
    layout, _, docs = name.partition("_")
    cp = CPContext.from_group(None, layout=layout)
    seq, par = _inputs()
    starts = torch.zeros(Bt, T, dtype=torch.bool)
    if docs == "docs":
        starts[0, [0, 5, 22, 23, 24, 40]] = True
        starts[1, [30]] = True
    dy = torch.randn(Bt, T, H, P, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ds = torch.randn(Bt, H, P, N, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    full = {k: v.clone().requires_grad_() for k, v in {**seq, **par}.items()}
    y_ref, s_ref = ssd(**full, doc_starts=starts, dt_limit=(0.01, 5.0), return_state=True, chunk=4)
    ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()

    loc = {k: shard_sequence(v, cp).clone().requires_grad_() for k, v in seq.items()}
    pars = {k: v.clone().requires_grad_() for k, v in par.items()}
    with loomtest.ByteCounter(world, ("all_gather", "reduce_scatter_single")) as fwd:
        y, s = ssd(**loc, **pars, doc_starts=shard_sequence(starts, cp), dt_limit=(0.01, 5.0), return_state=True,
                   chunk=4, cp=cp)
    with loomtest.ByteCounter(world, ("all_gather", "reduce_scatter_single")) as bwd:
        # the final state is every rank's: count its gradient once
        ((y * shard_sequence(dy, cp)).sum() + (s * ds).sum() / world).backward()

    torch.testing.assert_close(y, shard_sequence(y_ref, cp).detach(), **TOL, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(s, s_ref.detach(), **TOL, msg=lambda m: f"state: {m}")
    for k, v in loc.items():
        torch.testing.assert_close(v.grad, shard_sequence(full[k].grad, cp), **TOL, msg=lambda m: f"d{k}: {m}")
    for k, v in pars.items():
        grad = v.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, full[k].grad, **TOL, msg=lambda m: f"d{k}: {m}")
    return {"bytes": [fwd.n, bwd.n]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return loomtest.launch(__file__, 2, CASES, tmp_path_factory.mktemp("cp_ssd"), timeout_s=300.0)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_ssd_parity_with_single_process(results, case):
    loomtest.assert_no_errors(results[case])


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_bytes_sent_match_the_formula(results, case):
    n_local = 2 if case.startswith("zigzag") else 1
    n = (2 - 1) * n_local * Bt * (H * P * N + H) * 8
    assert tuple(loomtest.busiest_bytes(results[case])) == (n, n)


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
