"""Context parallelism of the gated delta rule op (kernels/gated_delta_rule/cp.py) against the
single process.

Multi-process (gloo, CPU, fp64): cp = 2 in both layouts (zigzag and contiguous) and cp = 4
zigzag (a zigzag rank's second piece then composes maps of pieces it does not hold). Each rank
runs the op on the full sequence and on its shard; checked per rank: the output shard, the final
state, and the gradients of its shards of q, k, v, g and beta against the shards of the
single-process gradients, with fixed random upstream gradients of the output and the state.
Rows: documents crossing piece boundaries, one starting exactly at a piece boundary, a one-token
document, and a row that is one document; grouped heads (HV = 2 HK), l2norm on, chunks of 5 so
pieces straddle chunks. The gdn mixer's own cp cases are in test_cp_mixers.py. Cost: ~10 s.
"""
from __future__ import annotations


import pytest
import torch

from loom.kernels.context_parallel import CPContext, shard_sequence
from loom.kernels.gated_delta_rule import gated_delta_rule

import loomtest

B, T, HK, HV, K, V = 2, 48, 2, 4, 4, 3
TOL = dict(atol=1e-11, rtol=1e-9)
# (layout, world): the cases each process group runs
CASES = {"zigzag_cp2": ("zigzag", 2), "contiguous_cp2": ("contiguous", 2), "zigzag_cp4": ("zigzag", 4),
         "zigzag_cp2_reference": ("zigzag", 2)}  # the pieces on the token-loop reference (impl="reference")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, HK, K), r(B, T, HK, K), r(B, T, HV, V)
    g = -0.5 * torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    ids = torch.zeros(B, T, dtype=torch.long)
    for s in (5, 12, 13, 30):  # 12: a piece boundary at cp = 2 zigzag and cp = 4; 12-13: a one-token document
        ids[0, s:] += 1
    dy, dS = r(B, T, HV, V), r(B, HV, K, V)
    return [q, k, v, g, beta], ids, dy, dS


def _run_case(name: str, world: int) -> dict:
    layout, _ = CASES[name]
    cp = CPContext.from_group(None, layout=layout)
    xs, ids, dy, dS = _inputs()
    full = [x.clone().requires_grad_() for x in xs]
    o, S = gated_delta_rule(*full, seq_ids=ids, use_qk_l2norm=True, return_state=True, chunk=5)
    torch.autograd.backward([o, S], [dy, dS])
    shards = [shard_sequence(x, cp).clone().requires_grad_() for x in xs]
    impl = "reference" if name.endswith("_reference") else "auto"
    o_loc, S_loc = gated_delta_rule(*shards, seq_ids=shard_sequence(ids, cp), use_qk_l2norm=True, return_state=True,
                                    cp=cp, chunk=5, impl=impl)
    # every rank returns the whole sequence's state: its gradient is taken once (on rank 0)
    torch.autograd.backward([o_loc, S_loc], [shard_sequence(dy, cp), dS if cp.rank == 0 else torch.zeros_like(dS)])
    torch.testing.assert_close(o_loc, shard_sequence(o, cp).detach(), **TOL, msg=lambda m: f"o: {m}")
    torch.testing.assert_close(S_loc, S.detach(), **TOL, msg=lambda m: f"state: {m}")
    for n, x, s in zip(("q", "k", "v", "g", "beta"), full, shards):
        torch.testing.assert_close(s.grad, shard_sequence(x.grad, cp), **TOL, msg=lambda m: f"d{n}: {m}")
    return {}


GROUPS = {2: [n for n, (_, w) in CASES.items() if w == 2], 4: [n for n, (_, w) in CASES.items() if w == 4]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world, names in GROUPS.items():
        out.update(loomtest.launch(__file__, world, names, tmp_path_factory.mktemp(f"cp{world}"), timeout_s=300.0))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_cp_gated_delta_rule_equals_single_process(results, case):
    loomtest.assert_no_errors(results[case])


def test_cp_rejects_initial_state():
    xs, ids, _, _ = _inputs()
    with pytest.raises(ValueError, match="no initial_state"):
        gated_delta_rule(*xs, initial_state=torch.zeros(B, HV, K, V, dtype=torch.float64),
                         cp=CPContext(None, 0, 2))


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
