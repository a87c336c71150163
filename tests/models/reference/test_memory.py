"""`memory` (Titans LMM as a layer; with swa, the paper's MAL) against the memory written per token
from the paper (_titans.py), then y = (RMSNorm(m) * sigmoid(x W_g)) W_o. Float64, packed
documents, T = 13 and 37, chunk sizes that do not divide the documents."""
import pytest
import torch
from _refs import H, K, LAYOUTS, W, build, inputs, lin, rms_norm, run, sigmoid
from _titans import memory_reference

TOL = dict(rtol=1e-7, atol=1e-9)


def memory_mixer_reference(m, x, pos, *, output_gate="elementwise", **opts):
    B, T, _ = x.shape
    y = memory_reference(m, "memory.", x, pos, n_heads=H, head_dim=K, **opts)
    y = rms_norm(y, W(m, "out_norm.weight"), 1e-6)
    if output_gate != "none":
        y = y * sigmoid(lin(x, W(m, "gate_proj.weight"))).view(B, T, H, -1)
    return lin(y.reshape(B, T, -1), W(m, "o_proj.weight"))


CASES = {  # name -> (mixer options, reference options)
    "default": ({"chunk_size": 4}, {"chunk": 4, "depth": 2}),
    "chunk3_depth1": ({"chunk_size": 3, "depth": 1}, {"chunk": 3, "depth": 1}),
    "depth3_silu": ({"chunk_size": 5, "depth": 3, "expansion": 2, "activation": "silu"},
                    {"chunk": 5, "depth": 3, "act": "silu"}),
    "no_norm_no_conv": ({"chunk_size": 4, "memory_norm": False, "conv_size": 0, "theta_max": 0.05},
                        {"chunk": 4, "depth": 2, "norm": False, "conv": False, "theta_max": 0.05}),
    "retrieval_chunk": ({"chunk_size": 4, "retrieval": "chunk"}, {"chunk": 4, "depth": 2, "retrieval": "chunk"}),
    "momentum_chunk": ({"chunk_size": 4, "momentum_step": "chunk"},
                       {"chunk": 4, "depth": 2, "momentum_step": "chunk"}),
    "gate_headwise": ({"chunk_size": 4, "output_gate": "headwise"},
                      {"chunk": 4, "depth": 2, "output_gate": "headwise"}),
    "gate_none": ({"chunk_size": 4, "output_gate": "none"}, {"chunk": 4, "depth": 2, "output_gate": "none"}),
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_memory_matches_reference(case, T):
    opts, ref = CASES[case]
    m = build("memory", **opts, init_scale=1.0)
    x, pos, seq = inputs(T)
    torch.testing.assert_close(run(m, x, pos, seq), memory_mixer_reference(m, x, pos, **ref), **TOL)


def test_memory_strong_momentum_and_forgetting():
    """Gates far from their init (strong momentum, visible forgetting, chunk 2): still the reference,
    and swapping the momentum and forget gate biases changes the output (the gates are told apart)."""
    m = build("memory", chunk_size=2, init_scale=1.0)
    with torch.no_grad():  # a strong, distinct momentum and forget gate
        b = m.memory.gate_proj.bias
        b[H:2 * H] += 2.0
        b[2 * H:] -= 1.0
    x, pos, seq = inputs(13)
    y = run(m, x, pos, seq)
    torch.testing.assert_close(y, memory_mixer_reference(m, x, pos, chunk=2, depth=2), **TOL)
    with torch.no_grad():
        b = m.memory.gate_proj.bias
        b[H:], b[:H] = torch.cat([b[2 * H:], b[H:2 * H]]).clone(), b[:H]
    assert (run(m, x, pos, seq) - y).abs().max() > 1e-4
