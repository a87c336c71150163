"""`titans_mac` (Titans Memory-as-Context, Behrouz et al. §4.1) against its equations per token,
float64, packed documents, T = 13 and 37, GQA. Segments of S tokens on document positions; for the
segment starting at token s0 with memory weights W* there (W0 at a document start):
    h_t   = M_{W*}(l2norm(SiLU(conv(x W_read)))_t)             the memory's recall, per head
    k^h_t = RoPE(h_t W_hk), v^h_t = h_t W_hv; q_t, k_t = RoPE(x W_q), RoPE(x W_k); v_t = x W_v
    a_t   = softmax over [P persistent ; k^h_j, k_j for s0 <= j <= t] of q_t . key / sqrt(K)
    m_t   = the neural memory (_titans.py) stepped on a (its conv over the document's a), read after write
    y_t   = (RMSNorm(a_t) w_a * sigmoid(RMSNorm(m_t) w_m)) W_o
"""
import pytest
import torch
from _refs import G, H, K, LAYOUTS, W, build, causal_conv, inputs, lin, rms_norm, rope_vec, run, sigmoid, silu
from _titans import head_memories, memory_inputs

from loom.models.rope import RopeConfig

ROPE = RopeConfig(base=100.0)


def softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def mac_reference(m, x, pos, *, segment, chunk, persistent=True, rope=ROPE, conv=True):
    B, T, _ = x.shape
    R = H // G
    ro = (lambda v, p: rope_vec(v, p, rope)) if rope is not None else (lambda v, p: v)
    y = torch.zeros(B, T, W(m, "o_proj.weight").shape[0], dtype=torch.float64)
    for b in range(B):
        P = [int(p) for p in pos[b]]
        q = torch.stack([ro(v, P[t]) for t, v in enumerate(lin(x[b], W(m, "q_proj.weight")).view(T, H, K))])
        kx = torch.stack([ro(v, P[t]) for t, v in enumerate(lin(x[b], W(m, "k_proj.weight")).view(T, G, K))])
        vx = lin(x[b], W(m, "v_proj.weight")).view(T, G, K)
        rq = lin(x[b], W(m, "read_proj.weight"))
        if conv:
            rq = torch.stack([causal_conv(rq, W(m, "read_conv.weight"), pos[b], t) for t in range(T)])
        rq = silu(rq).view(T, H, K)
        rq = rq / rq.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mems = head_memories(m, "memory.", H, 2, chunk)
        A = torch.zeros(T, H, K, dtype=torch.float64)
        t = 0
        while t < T:
            if P[t] == 0:
                for mem in mems:
                    mem.reset()
            s0, s1 = t, t + 1  # the segment: up to `segment` tokens of this document's grid
            while s1 < T and P[s1] != 0 and P[s1] // segment == P[s0] // segment:
                s1 += 1
            read_w = [list(mem.W) for mem in mems]
            hh = torch.stack([torch.stack([mems[h].read(rq[j, h], read_w[h]) for h in range(H)])
                              for j in range(s0, s1)])  # (n, H, K)
            kh = torch.stack([ro(v, P[s0 + i]) for i, v in enumerate(lin(hh.reshape(s1 - s0, -1),
                                                                        W(m, "hk_proj.weight")).view(-1, G, K))])
            vh = lin(hh.reshape(s1 - s0, -1), W(m, "hv_proj.weight")).view(-1, G, K)
            for i, tt in enumerate(range(s0, s1)):
                for h in range(H):
                    g = h // R
                    keys = [kh[:i + 1, g], kx[s0:tt + 1, g]]
                    vals = [vh[:i + 1, g], vx[s0:tt + 1, g]]
                    if persistent:
                        keys.insert(0, W(m, "persistent.k")[:, g])
                        vals.insert(0, W(m, "persistent.v")[:, g])
                    p = softmax(torch.cat(keys) @ q[tt, h] / K ** 0.5)
                    A[tt, h] = (p[:, None] * torch.cat(vals)).sum(0)
            mq, mk, mv, th, et, al = memory_inputs(m, "memory.", A[:s1].reshape(s1, -1), pos[b, :s1], H, K, chunk,
                                                   conv=conv)
            for tt in range(s0, s1):
                mt = torch.stack([mems[h].step(mq[tt, h], mk[tt, h], mv[tt, h], th[tt, h], et[tt, h], al[tt, h])
                                  for h in range(H)])
                o = rms_norm(A[tt], W(m, "attn_norm.weight")) * sigmoid(rms_norm(mt, W(m, "mem_norm.weight")))
                y[b, tt] = lin(o.reshape(-1), W(m, "o_proj.weight"))
            t = s1
    return y


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("opts", [{"segment": 4, "chunk_size": 2, "persistent": 2},
                                  {"segment": 6, "chunk_size": 3, "persistent": 0, "rope": False, "conv_size": 0}])
def test_mac_matches_reference(opts, T):
    m = build("titans_mac", model_rope=ROPE, init_scale=1.0, **opts)
    x, pos, seq = inputs(T)
    want = mac_reference(m, x, pos, segment=opts["segment"], chunk=opts["chunk_size"],
                         persistent=opts["persistent"] > 0, rope=ROPE if opts.get("rope", True) else None,
                         conv=opts.get("conv_size", 4) > 1)
    torch.testing.assert_close(run(m, x, pos, seq), want, rtol=1e-5, atol=1e-6)
