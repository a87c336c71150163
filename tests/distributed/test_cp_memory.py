"""Context parallelism for the Titans memory (kernels/memory/cp.py and
the `memory` / `titans_mag` mixers) against the single-process run.

Multi-process (gloo, CPU, fp64, zigzag unless named), for cp = 2 (default tier)
and cp = 4 (slow): every rank's output shard, the gradient of its input shard,
and the gradients of all parameters summed over ranks equal the single-process
ones (fixed random upstream gradient), for
    kernel  cp_neural_memory: deep memory with output norm and per-token reads,
            linear memory with chunk reads and padding masked out, contiguous layout;
    memory  the mixer (conv halo + state carry), conv taps shorter and longer than a chunk;
    mag     titans_mag (window halo with persistent tokens + memory), window shorter
            and longer than a chunk, GQA;
    mac     titans_mac (the whole layer carried as a state, kernels/context_parallel/chain.py carry), segments
            straddling the shard chunks, deep and linear memory.
Memory chunks (5 tokens) straddle the shard chunks (12 at cp=2, 6 at cp=4), so the
offset inside a memory chunk is carried too. Packed documents: row 0 starts
inside a document, has boundaries inside chunks and a document crossing every
shard boundary; row 1 has a boundary exactly on a shard boundary.
In-process: cp_impls declarations, decoding state refused under cp, cp=1 is the plain op.
Cost: one spawned group per world size (about 5 s for cp=2, 15 s for cp=4 on 2 cores).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from loom.kernels.context_parallel import CPContext, shard_sequence
from loom.kernels.memory.cp import cp_neural_memory
from loom.kernels.memory import init_memory_weights, neural_memory
from loom.models import HybridLM, ModelConfig
from loom.models.mixers.base import MixerDims, SeqContext
from loom.models.mixers.memory import Memory, MemoryMixerConfig
from loom.models.mixers.titans_mac import MACConfig, TitansMAC
from loom.models.mixers.titans_mag import MAGConfig, TitansMAG
from loom.models.rope import RopeConfig

import loomtest

B, T, D, H, K = 2, 48, 16, 4, 4
DOC_LENS = ([5, 17, 1, 3, 22], [24, 6, 18])
ROW0_START = 3  # row 0 begins inside a document whose first 3 tokens are not in the window
TOL = dict(atol=1e-10, rtol=1e-8)

# name -> (kind, layout, options)
CASES = {
    "kernel_deep_token": ("kernel", "zigzag", dict(depth=2, retrieval="token", norm=True, mask=False)),
    "kernel_linear_chunk_masked": ("kernel", "zigzag", dict(depth=1, retrieval="chunk", norm=False, mask=True)),
    "kernel_contiguous": ("kernel", "contiguous", dict(depth=2, retrieval="token", norm=True, mask=False)),
    "memory_conv4": ("memory", "zigzag", dict(conv_size=4)),
    "memory_conv16_chunk_read": ("memory", "zigzag", dict(conv_size=16, retrieval="chunk", depth=1)),
    "memory_chunk_step": ("memory", "zigzag", dict(conv_size=4, momentum_step="chunk")),
    "mag_window7_persistent": ("mag", "zigzag", dict(window=7, persistent=3)),
    "mag_window20_no_persistent": ("mag", "zigzag", dict(window=20, persistent=0, conv_size=2)),
    "mac_segment10": ("mac", "zigzag", dict(segment=10, persistent=2)),
    "mac_segment5_linear": ("mac", "zigzag", dict(segment=5, persistent=0, depth=1, conv_size=3)),
}


def _docs() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) document ids and document-relative position ids."""
    seq_ids, pos = [], []
    for b, lens in enumerate(DOC_LENS):
        seq_ids.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
        pos.append(torch.cat([torch.arange(n) for n in lens]))
    pos[0][:DOC_LENS[0][0]] += ROW0_START
    return torch.stack(seq_ids), torch.stack(pos)


def _sum_over_ranks(named_grads, cp):
    """[(name, cp grad or None, reference grad)] -> the same with the cp grads summed over ranks.
    Called before any assertion so that a failing rank cannot leave the others in a collective."""
    out = []
    for name, g, ref in named_grads:
        g = torch.zeros_like(ref) if g is None else g.clone()
        dist.all_reduce(g, group=cp.group)
        out.append((name, g, ref))
    return out


def _assert_grads(summed, what):
    for name, g, ref in summed:
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        torch.testing.assert_close(g, ref, **TOL, msg=lambda m: f"{what} d{name} (summed over ranks): {m}")


def _kernel_case(cp, opts, g):
    seq_ids, pos = _docs()
    dt = torch.float64
    q, k, v = (torch.randn(B, T, H, K, generator=g, dtype=dt) for _ in range(3))
    theta = 0.05 * torch.rand(B, T, H, generator=g, dtype=dt)
    eta = 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=dt)
    alpha = 0.05 * torch.rand(B, T, H, generator=g, dtype=dt)
    torch.manual_seed(7)  # identical W0 on every rank
    w0 = [w.to(dt) for w in init_memory_weights(H, K, opts["depth"], expansion=2)]
    gamma = 0.5 + torch.rand(H, K, generator=g, dtype=dt) if opts["norm"] else None
    mask = torch.rand(B, T, generator=g) > 0.2 if opts["mask"] else None
    reset = pos == 0 if mask is None else (pos == 0) & mask
    dy = torch.randn(B, T, H, K, generator=g, dtype=dt)
    inputs = [q, k, v, theta, eta, alpha]
    params = w0 + ([gamma] if gamma is not None else [])
    kw = dict(chunk_size=5, activation="gelu", retrieval=opts["retrieval"])

    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref_p = [t.clone().requires_grad_() for t in params]
    y_ref = neural_memory(*ref_in, ref_p[:len(w0)], reset=reset, mask=mask,
                          norm_weight=ref_p[-1] if gamma is not None else None, **kw)
    y_ref.backward(dy)

    loc_in = [shard_sequence(t, cp).clone().requires_grad_() for t in inputs]
    loc_p = [t.clone().requires_grad_() for t in params]
    shard = lambda t: None if t is None else shard_sequence(t, cp)  # noqa: E731
    y = cp_neural_memory(*loc_in, loc_p[:len(w0)], cp, reset=shard(reset), mask=shard(mask),
                         norm_weight=loc_p[-1] if gamma is not None else None, **kw)
    y.backward(shard(dy))
    summed = _sum_over_ranks([(f"param{i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(loc_p, ref_p))], cp)

    torch.testing.assert_close(y, shard(y_ref), **TOL, msg=lambda m: f"output: {m}")
    for name, a, b in zip(["q", "k", "v", "theta", "eta", "alpha"], loc_in, ref_in):
        assert not torch.isnan(a.grad).any(), f"NaN in d{name}"
        torch.testing.assert_close(a.grad, shard(b.grad), **TOL, msg=lambda m: f"d{name} shard: {m}")
    _assert_grads(summed, "kernel")


def _mixer_case(cp, kind, opts, g):
    seq_ids, pos = _docs()
    dims = MixerDims(d_model=D, n_heads=H, n_kv_heads=2, head_dim=K, layer_idx=0, n_layers=1, rope=RopeConfig())
    base = dict(chunk_size=5, depth=2, expansion=2)
    torch.manual_seed(7)  # identical weights on every rank
    cls, cfg = {"memory": (Memory, MemoryMixerConfig), "mag": (TitansMAG, MAGConfig),
                "mac": (TitansMAC, MACConfig)}[kind]
    mixer = cls(dims, cfg(**{**base, **opts}))
    mixer.reset_parameters()
    mixer = mixer.double()
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    dy = torch.randn(B, T, D, generator=g, dtype=torch.float64)

    x_ref = x.clone().requires_grad_()
    y_ref, _ = mixer(x_ref, SeqContext(pos, seq_ids))
    y_ref.backward(dy)

    local = copy.deepcopy(mixer)
    local.zero_grad(set_to_none=True)
    x_loc = shard_sequence(x, cp).clone().requires_grad_()
    y, _ = local(x_loc, SeqContext(shard_sequence(pos, cp), shard_sequence(seq_ids, cp), cp=cp))
    y.backward(shard_sequence(dy, cp))
    ref_grads = dict(mixer.named_parameters())
    summed = _sum_over_ranks([(n, p.grad, ref_grads[n].grad) for n, p in local.named_parameters()], cp)

    torch.testing.assert_close(y, shard_sequence(y_ref, cp), **TOL, msg=lambda m: f"output: {m}")
    assert not torch.isnan(x_loc.grad).any(), "NaN in dx"
    torch.testing.assert_close(x_loc.grad, shard_sequence(x_ref.grad, cp), **TOL, msg=lambda m: f"dx shard: {m}")
    _assert_grads(summed, kind)


def _run_case(name: str, world: int) -> None:
    kind, layout, opts = CASES[name]
    cp = CPContext.from_group(None, impl="ring", layout=layout)
    g = torch.Generator().manual_seed(1234)  # identical full tensors on every rank
    if kind == "kernel":
        _kernel_case(cp, opts, g)
    else:
        _mixer_case(cp, kind, opts, g)


@pytest.fixture(scope="module")
def cp_results(request, tmp_path_factory) -> dict:
    """Runs one gloo group of request.param ranks; returns {case: [result of each rank]}."""
    world = request.param
    return loomtest.launch(__file__, world, list(CASES), tmp_path_factory.mktemp(f"cpmem{world}"))


@pytest.mark.distributed
@pytest.mark.parametrize("cp_results", [2, pytest.param(4, marks=pytest.mark.slow)], indirect=True,
                         ids=["cp2", "cp4"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_single_process(cp_results, case):
    loomtest.assert_no_errors(cp_results[case])


# ---- in-process -----------------------------------------------------------------------------

def test_cp_impls_declared():
    for cls in (Memory, TitansMAG, TitansMAC):
        assert vars(cls)["cp_impls"] == ("ring", "ulysses")


@pytest.mark.parametrize("kind", ["memory", "titans_mag", "titans_mac"])
def test_cp_refuses_decoding_state(kind):
    model = HybridLM(ModelConfig(vocab_size=32, d_model=D, n_heads=H, layers=[kind],
                                 mixers={kind: {"chunk_size": 4}}))
    with pytest.raises(ValueError, match="context parallelism"):
        model(torch.zeros(1, 8, dtype=torch.long), want_state=True, cp=CPContext(None, 0, 2))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    gates = [0.1 * torch.rand(1, 8, 2, generator=g) for _ in range(3)]
    _, state = neural_memory(q, k, v, *gates, init_memory_weights(2, 4, 1), chunk_size=4, return_state=True)
    with pytest.raises(ValueError, match="context parallelism"):
        neural_memory(q, k, v, *gates, init_memory_weights(2, 4, 1), chunk_size=4, state=state,
                      cp=CPContext(None, 0, 2))


def test_single_rank_is_the_plain_op():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 4, generator=g) for _ in range(3))
    theta, eta, alpha = (0.1 * torch.rand(2, 12, 2, generator=g) for _ in range(3))
    w0 = init_memory_weights(2, 4, 2)
    y = cp_neural_memory(q, k, v, theta, eta, alpha, w0, CPContext(None, 0, 1), chunk_size=5)
    torch.testing.assert_close(y, neural_memory(q, k, v, theta, eta, alpha, w0, chunk_size=5), atol=0, rtol=0)


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
