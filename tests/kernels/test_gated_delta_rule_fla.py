"""fla-core's chunk_gated_delta_rule behind loom.kernels.gated_delta_rule (impl="fla") against the
chunked CPU form: forward, final state and the gradients of q, k, v, g, beta and the initial state,
with grouped heads, l2norm, packed documents (seq_ids -> cu_seqlens) and a varlen cu_seqlens call;
and the context-parallel pieces (cp.py's piece_maps) on fla against the chunked form.
Needs CUDA and fla-core (the `gpu` extra); skipped otherwise, with the reason. Cost: seconds on a GPU.
"""
import pytest
import torch

from loom.kernels.backends import have_fla
from loom.kernels.gated_delta_rule import gated_delta_rule
from loom.kernels.gated_delta_rule.cp import piece_maps

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a CUDA GPU"),
    pytest.mark.skipif(not have_fla(), reason="fla-core is not installed (pip install -e '.[gpu]')"),
]


def _inputs(B, T, HK, HV, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, T, HK, K), r(B, T, HK, K), r(B, T, HV, V)
    g = torch.nn.functional.logsigmoid(r(B, T, HV)) * 0.5
    beta = torch.rand(B, T, HV, generator=gen)
    S0 = 0.1 * r(B, HV, K, V)
    return [x.cuda() for x in (q, k, v, g, beta, S0)]


def _run(impl, xs, **kw):
    xs = [x.clone().requires_grad_() for x in xs]
    o, S = gated_delta_rule(*xs[:5], initial_state=xs[5], use_qk_l2norm=True, return_state=True, impl=impl, **kw)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).cuda()
    grads = torch.autograd.grad((o.float() * w).sum() + S.float().sum(), xs)
    return [o, S, *grads]


@pytest.mark.parametrize("T", [63, 300])
def test_fla_matches_chunked_with_documents(T):
    xs = _inputs(2, T, 2, 4, 64, 64)
    ids = torch.zeros(2, T, dtype=torch.long, device="cuda")
    ids[0, 17:] += 1
    ids[0, 40:] += 1
    ref = _run("chunked", xs, seq_ids=ids)
    got = _run("fla", xs, seq_ids=ids)
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dS0"), got, ref):
        scale = b.abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-3 * scale, name


def test_fla_varlen_cu_seqlens():
    xs = _inputs(1, 200, 4, 4, 64, 32)
    cu = torch.tensor([0, 13, 77, 200], device="cuda")
    S0 = 0.1 * torch.randn(3, 4, 64, 32, device="cuda")
    xs[5] = S0
    ref = _run("chunked", xs, cu_seqlens=cu)
    got = _run("fla", xs, cu_seqlens=cu)
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dS0"), got, ref):
        scale = b.abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-3 * scale, name


def test_fla_piece_maps_match_chunked():
    """The context-parallel pieces on fla's kernel (start state [0, I], values [v, 0]) equal the
    chunked form's (o, r) and (O, M), and their gradients."""
    xs = _inputs(2, 130, 2, 4, 64, 64)[:5]
    ids = torch.zeros(2, 130, dtype=torch.long, device="cuda")
    ids[0, 50:] += 1

    def run(impl):
        ins = [x.clone().requires_grad_() for x in xs]
        o, maps = piece_maps(*ins, scale=64 ** -0.5, seq_ids=ids, use_qk_l2norm=True, impl=impl)
        grads = torch.autograd.grad(o.float().pow(2).sum() + maps.float().pow(2).sum(), ins)
        return [o, maps, *grads]

    for name, a, b in zip(("o_r", "O_M", "dq", "dk", "dv", "dg", "dbeta"), run("fla"), run("chunked")):
        scale = b.abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-3 * scale, name
