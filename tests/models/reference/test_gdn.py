"""`gdn` (Gated DeltaNet, Yang et al., arXiv 2412.06464; Qwen3-Next's layer) against the gated delta
rule per token, float64, packed documents, T = 13 and 37, HV value heads over HK key heads:
    q, k, v = SiLU(causal depthwise conv(x W_qkv)) split; q, k l2-normalised (x / sqrt(|x|^2 + 1e-6))
    beta    = sigmoid(x W_b)  (sigmoid2: 2 sigmoid)
    a       = exp(-exp(A_log) softplus(x W_a + dt_bias))      decay per value head
    S_t     = a S_{t-1};  S_t += beta k_t (v_t - k_t^T S_t)^T;  o_t = K^-1/2 q_t^T S_t     (S: K x V, 0 at doc start)
    y       = (RMSNorm_V(o) w * SiLU(x W_z)) W_out
Value head h reads key head h // (HV / HK)."""
import pytest
import torch
from _refs import LAYOUTS, W, build, causal_conv, inputs, lin, rms_norm, run, sigmoid, silu


def softplus(x):
    return torch.log1p(torch.exp(x))


def gdn_reference(m, x, pos, *, HK, HV, K, V, beta2=False, eps=1e-6):
    B, T, _ = x.shape
    y = torch.zeros(B, T, W(m, "out_proj.weight").shape[0], dtype=torch.float64)
    for b in range(B):
        raw = lin(x[b], W(m, "in_proj_qkv.weight"))
        qkv = silu(torch.stack([causal_conv(raw, W(m, "conv1d.weight"), pos[b], t) for t in range(T)]))
        q, k, v = qkv.split([HK * K, HK * K, HV * V], -1)
        q, k, v = q.view(T, HK, K), k.view(T, HK, K), v.view(T, HV, V)
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = sigmoid(lin(x[b], W(m, "in_proj_b.weight"))) * (2.0 if beta2 else 1.0)
        a = torch.exp(-torch.exp(W(m, "A_log")) * softplus(lin(x[b], W(m, "in_proj_a.weight")) + W(m, "dt_bias")))
        z = lin(x[b], W(m, "in_proj_z.weight")).view(T, HV, V)
        S = torch.zeros(HV, K, V, dtype=torch.float64)
        for t in range(T):
            if int(pos[b, t]) == 0:
                S = torch.zeros_like(S)
            o = torch.zeros(HV, V, dtype=torch.float64)
            for h in range(HV):
                kh, qh = k[t, h // (HV // HK)], q[t, h // (HV // HK)]
                S[h] = a[t, h] * S[h]
                S[h] = S[h] + beta[t, h] * torch.outer(kh, v[t, h] - kh @ S[h])
                o[h] = (qh * K ** -0.5) @ S[h]
            o = rms_norm(o, W(m, "norm.weight"), eps) * silu(z[t])
            y[b, t] = lin(o.reshape(-1), W(m, "out_proj.weight"))
    return y


CASES = {
    "hk2_hv4": ({"n_k_heads": 2, "chunk": 4}, dict(HK=2, HV=4, K=8, V=8)),
    "hk1_hv4_dims": ({"n_k_heads": 1, "head_k_dim": 6, "head_v_dim": 10, "chunk": 5, "conv_size": 3},
                     dict(HK=1, HV=4, K=6, V=10)),
    "sigmoid2_eps": ({"n_k_heads": 4, "beta": "sigmoid2", "norm_eps": 1e-5, "chunk": 8},
                     dict(HK=4, HV=4, K=8, V=8, beta2=True, eps=1e-5)),
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_gdn_matches_reference(case, T):
    opts, ref = CASES[case]
    m = build("gdn", init_scale=1.0, **opts)
    x, pos, seq = inputs(T)
    torch.testing.assert_close(run(m, x, pos, seq), gdn_reference(m, x, pos, **ref), rtol=1e-7, atol=1e-9)
