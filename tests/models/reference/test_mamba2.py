"""`mamba2` (Mamba-2 / SSD, Dao & Gu, arXiv 2405.21060) against its selective state-space
recurrence per token, float64, packed documents, T = 13 and 37, G groups of B and C:
    z, xBC, dt = x W_in (+ b);  xBC = SiLU(causal depthwise conv(xBC) + b_conv);  x, B, C = split
    dt = clamp(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
    h_t = exp(dt A) h_{t-1} + dt x_t B_t^T   (per head, P x N; 0 at doc start; head h uses group h // (H/G))
    y_t = h_t C_t + D x_t
    out = (RMSNorm over each of G channel groups of (y * SiLU(z))) w  W_out (+ b)"""
import math

import pytest
import torch
from _refs import D, LAYOUTS, W, build, causal_conv, inputs, lin, run, silu


def softplus(x):
    return torch.log1p(torch.exp(x))


def mamba2_reference(m, x, pos, *, H, P, G, N, bias=False, dt_limit=(0.0, math.inf), eps=1e-5):
    B, T, _ = x.shape
    E = H * P
    out = torch.zeros(B, T, D, dtype=torch.float64)
    A = -torch.exp(W(m, "A_log"))
    for b in range(B):
        proj = lin(x[b], W(m, "in_proj.weight"), W(m, "in_proj.bias") if bias else None)
        z, xbc, dt = proj.split([E, E + 2 * G * N, H], -1)
        xbc = silu(torch.stack([causal_conv(xbc, W(m, "conv1d.weight"), pos[b], t) for t in range(T)])
                   + W(m, "conv1d.bias"))
        xs, Bm, Cm = xbc.split([E, G * N, G * N], -1)
        xs, Bm, Cm = xs.view(T, H, P), Bm.view(T, G, N), Cm.view(T, G, N)
        dt = softplus(dt + W(m, "dt_bias")).clamp(*dt_limit)
        S = torch.zeros(H, P, N, dtype=torch.float64)
        for t in range(T):
            if int(pos[b, t]) == 0:
                S = torch.zeros_like(S)
            y = torch.zeros(H, P, dtype=torch.float64)
            for h in range(H):
                g = h // (H // G)
                S[h] = torch.exp(dt[t, h] * A[h]) * S[h] + dt[t, h] * torch.outer(xs[t, h], Bm[t, g])
                y[h] = S[h] @ Cm[t, g] + W(m, "D")[h] * xs[t, h]
            hh = (y.reshape(-1) * silu(z[t])).view(G, E // G)
            hh = hh / torch.sqrt((hh * hh).mean(-1, keepdim=True) + eps)
            out[b, t] = lin(hh.reshape(-1) * W(m, "norm.weight"), W(m, "out_proj.weight"),
                            W(m, "out_proj.bias") if bias else None)
    return out


CASES = {
    "g2": ({"chunk": 4, "d_state": 8, "head_dim": 16, "n_groups": 2, "d_conv": 3}, dict(H=4, P=16, G=2, N=8)),
    "g1_bias_limit": ({"chunk": 5, "d_state": 6, "head_dim": 8, "n_groups": 1, "d_conv": 4, "bias": True,
                       "dt_limit": [0.05, 0.5]}, dict(H=8, P=8, G=1, N=6, bias=True, dt_limit=(0.05, 0.5))),
    "nheads_g4": ({"chunk": 3, "d_state": 4, "head_dim": 4, "n_heads": 8, "n_groups": 4, "d_conv": 2},
                  dict(H=8, P=4, G=4, N=4)),
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_mamba2_matches_reference(case, T):
    opts, ref = CASES[case]
    m = build("mamba2", init_scale=1.0, **opts)
    x, pos, seq = inputs(T)
    torch.testing.assert_close(run(m, x, pos, seq), mamba2_reference(m, x, pos, **ref), rtol=1e-7, atol=1e-9)
