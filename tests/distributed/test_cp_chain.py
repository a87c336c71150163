"""The rank-to-rank state chain (kernels/context_parallel/chain.py) on its own.

In-process: the pieces of every rank follow the sequence order of each layout
(zigzag visits every rank twice, rank cp-1's hop between its own chunks is local).
Multi-process (gloo, CPU, fp64, cp = 2 and 3, both layouts): `carry` over a toy
recurrence s_t = a * s_{t-1} + x_t whose state is a pytree (a dict holding the
float state, an int64 token count, an int and None) equals the single-process scan,
output and gradients of x and a; `StateChain.send` / `recv` hand such a pytree
over unchanged, and `send_tensors` / `recv_tensors` a list of tensors of known shapes.
Cost: two spawned groups (about 4 s each on 2 cores).
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from loom.kernels.context_parallel import CPContext, StateChain, carry, shard_sequence
from loom.kernels.context_parallel.p2p import wait

import loomtest

B, T, D = 2, 24, 3
CASES = ("carry_zigzag", "carry_contiguous", "send_recv")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_pieces_follow_the_sequence(world, layout):
    """Walking every rank's pieces by chunk index visits chunks 0..n-1 once, each naming
    the ranks of its neighbours; one piece without cp."""
    L = T // world
    chains = [StateChain(L, CPContext(None, r, world, "ring", layout)) for r in range(world)]
    by_chunk = {p.chunk: (r, p) for r, c in enumerate(chains) for p in c.pieces}
    n = 2 * world if layout == "zigzag" else world
    assert sorted(by_chunk) == list(range(n))
    for c, (r, p) in by_chunk.items():
        assert p.prev == (by_chunk[c - 1][0] if c else None)
        assert p.next == (by_chunk[c + 1][0] if c + 1 < n else None)
        assert p.hi - p.lo == T // n
    if layout == "zigzag":
        assert chains[-1].pieces[0].next == world - 1 and not chains[-1].remote(world - 1)
    assert StateChain(L).pieces == [(0, 0, L, None, None)]


def _scan(x: torch.Tensor, a: torch.Tensor, state: dict | None):
    """s_t = a * s_{t-1} + x_t over x (B, C, D) from state["s"] (B, D) or zero; y = s * (count + t)."""
    s = torch.zeros(B, D, dtype=x.dtype) if state is None else state["s"]
    count = torch.zeros(B, dtype=torch.long) if state is None else state["count"]
    ys = []
    for t in range(x.shape[1]):
        s = a * s + x[:, t]
        ys.append(s * (count + t + 1)[:, None])
    n = x.shape[1]
    return torch.stack(ys, dim=1), {"s": s, "count": count + n, "tag": 7, "none": None}


def _check_carry(layout: str, world: int) -> None:
    cp = CPContext.from_group(None, layout=layout)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y, _ = _scan(x, a, None)
    gx, ga = torch.autograd.grad(y, (x, a), dy)

    def step(xs, state):
        if state is not None:
            assert state["tag"] == 7 and state["none"] is None
        return _scan(xs[0], a, state)

    x_loc = shard_sequence(x.detach(), cp).requires_grad_()
    y_loc = carry(step, [x_loc], [a], cp)
    torch.testing.assert_close(y_loc, shard_sequence(y.detach(), cp), rtol=1e-12, atol=1e-12)
    gx_loc, ga_loc = torch.autograd.grad(y_loc, (x_loc, a), shard_sequence(dy, cp))
    dist.all_reduce(ga_loc)
    torch.testing.assert_close(gx_loc, shard_sequence(gx, cp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga_loc, ga, rtol=1e-12, atol=1e-12)


def _check_send_recv(world: int) -> None:
    cp = CPContext.from_group(None)
    chain = StateChain(T // world, cp)
    state = {"w": (torch.arange(6.0).view(2, 3), torch.tensor([1, 2])), "n": 3, "none": None}
    if cp.rank == 0:
        wait(chain.send(state, 1, 100))
        wait(chain.send_tensors([torch.ones(2, 2), torch.full((3,), 5.0)], 1, 200))
    elif cp.rank == 1:
        got = chain.recv(0, 100, "cpu")
        assert got["n"] == 3 and got["none"] is None
        assert torch.equal(got["w"][0], state["w"][0]) and torch.equal(got["w"][1], state["w"][1])
        assert got["w"][1].dtype == torch.long
        ones, fives = chain.recv_tensors([torch.empty(2, 2), torch.empty(3)], 0, 200)
        assert torch.equal(ones, torch.ones(2, 2)) and torch.equal(fives, torch.full((3,), 5.0))


def _run_case(name: str, world: int) -> None:
    if name == "send_recv":
        _check_send_recv(world)
    else:
        _check_carry(name.removeprefix("carry_"), world)


@pytest.fixture(scope="module", params=[2, 3])
def chain_results(request, tmp_path_factory):
    world = request.param
    return loomtest.launch(__file__, world, list(CASES), tmp_path_factory.mktemp(f"chain{world}"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_chain_across_ranks(chain_results, case):
    loomtest.assert_no_errors(chain_results[case])


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
