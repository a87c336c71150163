"""`attn` and `swa` against softmax attention written per token (Vaswani et al.; GQA:
Ainslie et al.; Gated Attention G1: Qiu et al.; MoH: Jin et al.; a short causal conv on
q, k, v), float64, packed documents, T = 13 and 37, GQA (H=4, G=2).

Per row and token t of a document starting at t0:
    q_t = RoPE(norm(conv(x W_q)))_t, k_j likewise, v_j = conv(x W_v)_j
    o_t,h = sum_{t0 <= j <= t, t - j <= window} softmax_j(q_t,h . k_j,g(h) * scale) v_j,g(h)
    o_t,h *= sigmoid(x_t W_G)_h     (gate)        and   *= moh_weight_t,h   (MoH)
    y_t = o_t W_o
"""
import math

import pytest
import torch
from _refs import (G, H, K, LAYOUTS, ROPE_TOL, TOL, W, build, causal_conv, inputs, lin, rms_norm, rope_vec,
                   run, sigmoid)

from loom.models.mixers.base import SeqContext
from loom.models.rope import RopeConfig


def softmax(z):
    z = z - z.max()
    e = torch.exp(z)
    return e / e.sum()


def moh_weights(m, x_t, shared: int, topk: int):
    """MoH's per-head weight of one token (H,), and (router probabilities, chosen 0/1)."""
    p = softmax(lin(x_t, W(m, "heads.router.weight")))
    idx = torch.argsort(p, descending=True)[:topk]
    chosen = torch.zeros_like(p)
    chosen[idx] = 1.0
    g_r = topk * p * chosen / p[idx].sum()
    g_s = shared * softmax(lin(x_t, W(m, "heads.shared_router.weight"))) if shared > 1 else torch.ones(1)
    a = 2 * softmax(lin(x_t, W(m, "heads.balance.weight")))
    return torch.cat([a[0] * g_s, a[1] * g_r]), p, chosen


def attn_reference(m, x, pos, *, rope: RopeConfig, window=None, gate="none", packing="separate", moh=None,
                   conv=0, qk_norm=None, fraction=1.0, scale=None, bias=False, visible=None,
                   sink=None):
    """visible(h, p_query, p_key) -> bool: a sparsity pattern on top of causal same-document
    (S2-Attention's); window: key j visible when t - j <= window. sink: a list that receives each
    query's attention share on its document's first token (0 where that token is not visible)."""
    B, T, _ = x.shape
    R = H // G
    scale = K ** -0.5 if scale is None else scale
    Wgate = 0 if packing == "separate" else (1 if gate == "headwise" else K)
    y = torch.zeros(B, T, W(m, "o_proj.weight").shape[0], dtype=torch.float64)
    aux = []
    for b in range(B):
        qg = lin(x[b], W(m, "q_proj.weight"), W(m, "q_proj.bias") if bias else None)  # (T, H (K + Wgate))
        k = lin(x[b], W(m, "k_proj.weight"), W(m, "k_proj.bias") if bias else None)
        v = lin(x[b], W(m, "v_proj.weight"), W(m, "v_proj.bias") if bias else None)
        glog = None
        if packing == "head":
            qg = qg.view(T, H, K + Wgate)
            q, glog = qg[..., :K].reshape(T, H * K), qg[..., K:]
        elif packing == "group":
            qg = qg.view(T, G, R * (K + Wgate))
            q, glog = qg[..., :R * K].reshape(T, H * K), qg[..., R * K:].reshape(T, H, Wgate)
        else:
            q = qg
        if conv:
            qkv = torch.cat([q, k, v], -1)
            qkv = torch.stack([causal_conv(qkv, W(m, "conv.weight"), pos[b], t) for t in range(T)])
            q, k, v = qkv.split([H * K, G * K, G * K], -1)
        if qk_norm == "full":
            q, k = rms_norm(q, W(m, "q_norm.weight")), rms_norm(k, W(m, "k_norm.weight"))
        q, k, v = q.view(T, H, K), k.view(T, G, K), v.view(T, G, K)
        if qk_norm == "head":
            q, k = rms_norm(q, W(m, "q_norm.weight")), rms_norm(k, W(m, "k_norm.weight"))
        q = torch.stack([rope_vec(q[t], int(pos[b, t]), rope, fraction) for t in range(T)])
        k = torch.stack([rope_vec(k[t], int(pos[b, t]), rope, fraction) for t in range(T)])
        Ps, Fs = [], []
        for t in range(T):
            t0 = t - int(pos[b, t])
            lo = t0 if window is None else max(t0, t - window)
            o = torch.zeros(H, K, dtype=torch.float64)
            for h in range(H):
                g = h // R
                js = [j for j in range(lo, t + 1) if visible is None or visible(h, int(pos[b, t]), int(pos[b, j]))]
                p = softmax(torch.stack([q[t, h] @ k[j, g] * scale for j in js]))
                o[h] = (p[:, None] * v[js, g]).sum(0)
                if sink is not None:
                    sink.append(float(p[0]) if js[0] == t0 else 0.0)
            if gate != "none":
                logits = lin(x[b, t], W(m, "heads.gate_proj.weight")) if glog is None else glog[t].reshape(-1)
                o = o * sigmoid(logits).view(H, -1)
            if moh is not None:
                w, p, chosen = moh_weights(m, x[b, t], *moh)
                o = o * w[:, None]
                Ps.append(p)
                Fs.append(chosen)
            y[b, t] = lin(o.reshape(-1), W(m, "o_proj.weight"), W(m, "o_proj.bias") if bias else None)
        aux += list(zip(Ps, Fs))
    loss = None
    if moh is not None:
        P = torch.stack([p for p, _ in aux]).mean(0)
        f = torch.stack([c for _, c in aux]).mean(0)
        loss = (H - moh[0]) * (P * f).sum()
    return y, loss


ROPE = RopeConfig(base=100.0)
CASES = {  # name -> (kind, mixer options, reference options)
    "attn": ("attn", {}, {}),
    "attn+bias+qknorm": ("attn", {"qkv_bias": True, "out_bias": True, "qk_norm": True},
                         {"bias": True, "qk_norm": "head"}),
    "attn+qknorm_full+scale": ("attn", {"qk_norm": True, "qk_norm_width": "full", "scale": 0.21},
                               {"qk_norm": "full", "scale": 0.21}),
    "attn+gate_headwise": ("attn", {"gate": "headwise"}, {"gate": "headwise"}),
    "attn+gate_elementwise": ("attn", {"gate": "elementwise"}, {"gate": "elementwise"}),
    "attn+gate_head_packed": ("attn", {"gate": "elementwise", "gate_packing": "head"},
                              {"gate": "elementwise", "packing": "head"}),
    "attn+gate_group_packed": ("attn", {"gate": "headwise", "gate_packing": "group"},
                               {"gate": "headwise", "packing": "group"}),
    "attn+conv": ("attn", {"conv_size": 3}, {"conv": 3}),
    "attn+partial": ("attn", {"rope_fraction": 0.5}, {"fraction": 0.5}),
    "swa": ("swa", {"window": 5}, {"window": 5}),
    "swa+w0": ("swa", {"window": 0}, {"window": 0}),
    "swa+gate+conv": ("swa", {"window": 4, "gate": "headwise", "conv_size": 2},
                      {"window": 4, "gate": "headwise", "conv": 2}),
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, T):
    kind, opts, ref = CASES[case]
    m = build(kind, model_rope=ROPE, **opts)
    x, pos, seq = inputs(T)
    want, _ = attn_reference(m, x, pos, rope=ROPE, **ref)
    torch.testing.assert_close(run(m, x, pos, seq), want, **ROPE_TOL)


SCALED = {"linear": RopeConfig(base=100.0, scaling="linear", factor=3.0),
          "ntk": RopeConfig(base=100.0, scaling="ntk", factor=3.0),
          "yarn": RopeConfig(base=1000.0, scaling="yarn", factor=4.0, original_max_len=16),
          "llama3": RopeConfig(base=1000.0, scaling="llama3", factor=4.0, original_max_len=16)}


@pytest.mark.parametrize("name", list(SCALED))
def test_attention_with_rope_scaling(name):
    """The model's RoPE scaling reaches the layer (each scaling's own closed form)."""
    rope = SCALED[name]
    m = build("attn", model_rope=rope)
    x, pos, seq = inputs(37)
    want, _ = attn_reference(m, x, pos, rope=rope)
    torch.testing.assert_close(run(m, x, pos, seq), want, **ROPE_TOL)
    m2 = build("attn", model_rope=rope, rope_config=RopeConfig(base=100.0))  # the kind's own rope_config wins
    want2, _ = attn_reference(m2, x, pos, rope=RopeConfig(base=100.0))
    torch.testing.assert_close(run(m2, x, pos, seq), want2, **ROPE_TOL)


@pytest.mark.parametrize("kind", ["attn", "swa"])
@pytest.mark.parametrize("shared,topk", [(1, 1), (2, 1), (1, 2)])
def test_moh_matches_reference(kind, shared, topk):
    opts = {"moh": True, "moh_shared": shared, "moh_topk": topk, "moh_loss_weight": 0.3}
    extra = {"window": 6} if kind == "swa" else {}
    m = build(kind, model_rope=ROPE, **opts, **extra)
    x, pos, seq = inputs(13)
    want, loss = attn_reference(m, x, pos, rope=ROPE, moh=(shared, topk), **extra)
    ctx = SeqContext(position_ids=pos, seq_ids=seq)
    y, _ = m(x, ctx)
    torch.testing.assert_close(y, want, **ROPE_TOL)
    assert len(ctx.aux_losses) == 1
    torch.testing.assert_close(ctx.aux_losses[0].double(), torch.tensor(0.3 * float(loss), dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)


def test_reference_is_sensitive():
    """The reference itself tells the options apart (a reference blind to them guards nothing)."""
    m = build("attn", model_rope=ROPE, gate="headwise")
    x, pos, _ = inputs(13)
    a, _ = attn_reference(m, x, pos, rope=ROPE, gate="headwise")
    b, _ = attn_reference(m, x, pos, rope=ROPE)
    c, _ = attn_reference(m, x, pos, rope=SCALED["ntk"], gate="headwise")
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
    assert math.isfinite(float(a.abs().max()))


@pytest.mark.parametrize("kind", ["attn", "swa"])
def test_sink_mass_statistic(kind):
    """ctx.stats' sink_mass is the mean attention share on the document's first token."""
    extra = {"window": 4} if kind == "swa" else {}
    m = build(kind, model_rope=ROPE, **extra)
    x, pos, seq = inputs(13)
    shares = []
    attn_reference(m, x, pos, rope=ROPE, sink=shares, **extra)
    stats = {}
    m(x, SeqContext(position_ids=pos, seq_ids=seq, stats=stats))
    torch.testing.assert_close(stats["sink_mass/layer1"].double(),
                               torch.tensor(sum(shares) / len(shares), dtype=torch.float64), rtol=1e-5, atol=1e-6)
