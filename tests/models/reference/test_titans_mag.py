"""`titans_mag` (Titans Memory-as-Gate, Behrouz et al. §4.2) against its equations per token, float64,
packed documents, T = 13 and 37, GQA:
    a_t = softmax over [P persistent (k, v) (no RoPE) ; keys j of t's document with t - j <= window]
          of RoPE(q_t) . RoPE(k_j) / sqrt(K)
    m_t = the neural memory's read (_titans.py)
    y_t = (RMSNorm(a_t) w_a * sigmoid(RMSNorm(m_t) w_m)) W_o
"""
import pytest
import torch
from _refs import G, H, K, LAYOUTS, W, build, inputs, lin, rms_norm, rope_vec, run, sigmoid
from _titans import memory_reference

from loom.models.rope import RopeConfig

ROPE = RopeConfig(base=100.0)


def softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def mag_reference(m, x, pos, *, window, chunk, persistent=True, rope=ROPE):
    B, T, _ = x.shape
    R = H // G
    mem = memory_reference(m, "memory.", x, pos, n_heads=H, head_dim=K, chunk=chunk, depth=2)
    y = torch.zeros(B, T, W(m, "o_proj.weight").shape[0], dtype=torch.float64)
    for b in range(B):
        q = lin(x[b], W(m, "q_proj.weight")).view(T, H, K)
        k = lin(x[b], W(m, "k_proj.weight")).view(T, G, K)
        v = lin(x[b], W(m, "v_proj.weight")).view(T, G, K)
        if rope is not None:
            q = torch.stack([rope_vec(q[t], int(pos[b, t]), rope) for t in range(T)])
            k = torch.stack([rope_vec(k[t], int(pos[b, t]), rope) for t in range(T)])
        for t in range(T):
            lo = max(t - int(pos[b, t]), t - window)
            a = torch.zeros(H, K, dtype=torch.float64)
            for h in range(H):
                g = h // R
                keys, vals = k[lo:t + 1, g], v[lo:t + 1, g]
                if persistent:
                    keys = torch.cat([W(m, "persistent.k")[:, g], keys])
                    vals = torch.cat([W(m, "persistent.v")[:, g], vals])
                p = softmax(keys @ q[t, h] / K ** 0.5)
                a[h] = (p[:, None] * vals).sum(0)
            o = rms_norm(a, W(m, "attn_norm.weight")) * sigmoid(rms_norm(mem[b, t], W(m, "mem_norm.weight")))
            y[b, t] = lin(o.reshape(-1), W(m, "o_proj.weight"))
    return y


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("opts", [{"window": 5, "persistent": 3}, {"window": 2, "persistent": 0},
                                  {"window": 4, "persistent": 2, "rope": False}])
def test_mag_matches_reference(opts, T):
    m = build("titans_mag", model_rope=ROPE, chunk_size=4, init_scale=1.0, **opts)
    x, pos, seq = inputs(T)
    want = mag_reference(m, x, pos, window=opts["window"], chunk=4, persistent=opts["persistent"] > 0,
                         rope=ROPE if opts.get("rope", True) else None)
    torch.testing.assert_close(run(m, x, pos, seq), want, rtol=1e-5, atol=1e-6)
