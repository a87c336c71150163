"""`linear` (TNL / Lightning Attention block, Qin et al.) against its equations per token, float64,
packed documents, T = 13 and 37, blocks that do not divide the documents.

Per row, token t of a document, head h with decay rate s_h (ALiBi slopes 2^(-8(h+1)/H) for H a
power of two, times 1 - l/(n_layers - 1) + 1e-5 at layer l):
    q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)
    o_t,h   = K^-1/2 sum_{j in doc, j <= t} exp(-s_h (t - j)) (q_t,h . k_j,h) v_j,h
    o       = RMSNorm_K(o_h) w  (head_rms)  or  LayerNorm_{HK}(o) (layernorm)
    y       = (o * sigmoid(x W_a W_b)) W_o        (lowrank gate; full: x W_g; none)
"""
import math

import pytest
import torch
from _refs import H, K, LAYOUTS, W, build, inputs, lin, rms_norm, run, sigmoid, silu


def linear_reference(m, x, pos, *, layer_idx, n_layers, gate="lowrank", norm="head_rms", qk_scale=True,
                     layer_decay=True, eps=1e-5):
    B, T, _ = x.shape
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    if layer_decay:
        slopes = slopes * (1 - layer_idx / (n_layers - 1) + 1e-5)
    scale = K ** -0.5 if qk_scale else 1.0
    y = torch.zeros(B, T, W(m, "o_proj.weight").shape[0], dtype=torch.float64)
    for b in range(B):
        q, k, v = (silu(lin(x[b], W(m, f"{n}_proj.weight"))).view(T, H, K) for n in "qkv")
        for t in range(T):
            t0 = t - int(pos[b, t])
            o = torch.zeros(H, K, dtype=torch.float64)
            for h in range(H):
                for j in range(t0, t + 1):
                    o[h] += math.exp(-float(slopes[h]) * (t - j)) * scale * (q[t, h] @ k[j, h]) * v[j, h]
            if norm == "head_rms":
                o = rms_norm(o, W(m, "norm.weight"), eps).reshape(-1)
            else:
                o = o.reshape(-1)
                o = (o - o.mean()) / torch.sqrt(o.var(unbiased=False) + eps) * W(m, "norm.weight") + W(m, "norm.bias")
            if gate == "lowrank":
                o = o * sigmoid(lin(lin(x[b, t], W(m, "gate.0.weight")), W(m, "gate.1.weight")))
            elif gate == "full":
                o = o * sigmoid(lin(x[b, t], W(m, "gate.weight")))
            y[b, t] = lin(o, W(m, "o_proj.weight"))
    return y


CASES = {
    "default": {},
    "layernorm_noscale": {"norm": "layernorm", "qk_scale": False},
    "full_gate": {"output_gate": "full"},
    "no_gate_no_layer_decay": {"output_gate": "none", "layer_decay": False},
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [4, 7])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_linear_matches_reference(case, block, T, layer_idx):
    opts = CASES[case]
    m = build("linear", block=block, layer_idx=layer_idx, n_layers=4, **opts)
    x, pos, seq = inputs(T)
    ref = {"gate": opts.get("output_gate", "lowrank"), "norm": opts.get("norm", "head_rms"),
           "qk_scale": opts.get("qk_scale", True), "layer_decay": opts.get("layer_decay", True)}
    want = linear_reference(m, x, pos, layer_idx=layer_idx, n_layers=4, **ref)
    torch.testing.assert_close(run(m, x, pos, seq), want, rtol=1e-5, atol=1e-6)  # fp32 slope buffer
