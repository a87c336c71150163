"""`rat` against RAT written per token from the paper (Wei et al., arXiv 2507.04416), float64,
packed documents, T = 13 and 37, chunk lengths that do not divide the documents.

Per row, token t at position p in its document, chunk c = p // L:
    g = sigmoid(x_t W_f + b_f)                                  forget gate (H, K)
    q_t, k_t: G groups tiled to H heads (head h uses group h % G)
    s_t = (1 - g) [k_t; v_t]                  at p % L == 0
    s_t = g s_{t-1} + (1 - g) [k_t; v_t]      otherwise
    scores over the document's earlier chunks' final key states (RoPE at their chunk
    index c') and the own running key state, q RoPE'd at c; softmax * K^-1/2; values alike
    y_t = (sigmoid(x_t W_z) * o_t) W_o
"""
import pytest
import torch
from _refs import G, H, K, LAYOUTS, ROPE_TOL, W, build, inputs, lin, rope_vec, run, sigmoid

from loom.models.rope import RopeConfig


def softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def rat_reference(m, x, pos, *, L: int, rope: RopeConfig | None, gate: str = "none", groups: int = G,
                  shares=None):
    """shares: a list that receives, per (token, head), the attention share of the own running
    state and of the document's first chunk state (the sink)."""
    G = groups
    B, T, _ = x.shape
    y = torch.zeros(B, T, W(m, "o_proj.weight").shape[0], dtype=torch.float64)
    for b in range(B):
        q = lin(x[b], W(m, "q_proj.weight")).view(T, G, K)
        k = lin(x[b], W(m, "k_proj.weight")).view(T, G, K)
        v = lin(x[b], W(m, "v_proj.weight")).view(T, H, K)
        g = sigmoid(lin(x[b], W(m, "f_proj.weight"), W(m, "f_proj.bias"))).view(T, H, K)
        z = sigmoid(lin(x[b], W(m, "z_proj.weight"))).view(T, H, K)
        finals = []  # (key (H, K) rotated at its chunk, value (H, K)) of this document's closed chunks
        sk = sv = None
        for t in range(T):
            p = int(pos[b, t])
            if p == 0:
                finals = []
            kt = torch.stack([k[t, h % G] for h in range(H)])
            qt = torch.stack([q[t, h % G] for h in range(H)])
            if p % L == 0:
                sk, sv = (1 - g[t]) * kt, (1 - g[t]) * v[t]
            else:
                sk, sv = g[t] * sk + (1 - g[t]) * kt, g[t] * sv + (1 - g[t]) * v[t]
            c = p // L
            key = sk if rope is None else rope_vec(sk, c, rope)
            qr = qt if rope is None else rope_vec(qt, c, rope)
            keys = torch.stack([fk for fk, _ in finals] + [key])  # (n + 1, H, K)
            vals = torch.stack([fv for _, fv in finals] + [sv])
            o = torch.zeros(H, K, dtype=torch.float64)
            for h in range(H):
                a = softmax(keys[:, h] @ qr[h] * K ** -0.5)
                o[h] = (a[:, None] * vals[:, h]).sum(0)
                if shares is not None:
                    shares.append((float(a[-1]), float(a[0])))
            if p % L == L - 1:
                finals.append((key, sv))
            o = o * z[t]
            if gate != "none":
                o = o * sigmoid(lin(x[b, t], W(m, "heads.gate_proj.weight"))).view(H, -1)
            y[b, t] = lin(o.reshape(-1), W(m, "o_proj.weight"))
    return y


ROPE = RopeConfig(base=50.0)


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("L", [1, 3, 4])
def test_rat_matches_reference(T, L):
    m = build("rat", model_rope=ROPE, chunk=L, groups=G)
    x, pos, seq = inputs(T)
    torch.testing.assert_close(run(m, x, pos, seq), rat_reference(m, x, pos, L=L, rope=ROPE), **ROPE_TOL)


@pytest.mark.parametrize("opts", [{"rope": False}, {"gate": "elementwise"}, {"groups": 1}, {"groups": 4}])
def test_rat_options_match_reference(opts):
    opts = {"chunk": 3, "groups": G, **opts}
    m = build("rat", model_rope=ROPE, **opts)
    x, pos, seq = inputs(37)
    want = rat_reference(m, x, pos, L=3, rope=None if opts.get("rope") is False else ROPE,
                         gate=opts.get("gate", "none"), groups=opts["groups"])
    torch.testing.assert_close(run(m, x, pos, seq), want, **ROPE_TOL)


@pytest.mark.parametrize("name", ["ntk", "yarn"])
def test_rat_rope_scaling(name):
    rope = {"ntk": RopeConfig(base=50.0, scaling="ntk", factor=3.0),
            "yarn": RopeConfig(base=500.0, scaling="yarn", factor=4.0, original_max_len=8)}[name]
    m = build("rat", model_rope=rope, chunk=2, groups=G)
    x, pos, seq = inputs(37)
    torch.testing.assert_close(run(m, x, pos, seq), rat_reference(m, x, pos, L=2, rope=rope), **ROPE_TOL)


def test_reference_tells_chunk_from_token_rope():
    """RoPE at the token index instead of the chunk index changes the reference's output."""
    m = build("rat", model_rope=ROPE, chunk=4, groups=G)
    x, pos, _ = inputs(37)
    a = rat_reference(m, x, pos, L=4, rope=ROPE)
    b = rat_reference(m, x, pos, L=4, rope=None)
    assert (a - b).abs().max() > 1e-3


def test_rat_stats_match_reference():
    """ctx.stats of rat: the mean forget gate, the attention share of the query's own chunk and of
    its document's first chunk, the gate mean: values, not just numbers in [0, 1]."""
    from loom.models.mixers.base import SeqContext

    m = build("rat", model_rope=ROPE, chunk=3, groups=G, gate="headwise")
    x, pos, seq = inputs(37)
    shares = []
    rat_reference(m, x, pos, L=3, rope=ROPE, gate="headwise", shares=shares)
    stats = {}
    m(x, SeqContext(position_ids=pos, seq_ids=seq, stats=stats))
    want = {"rat_forget_mean": sigmoid(lin(x, W(m, "f_proj.weight"), W(m, "f_proj.bias"))).mean(),
            "rat_local_mass": torch.tensor(sum(s[0] for s in shares) / len(shares)),
            "sink_mass": torch.tensor(sum(s[1] for s in shares) / len(shares)),
            "gate_mean": sigmoid(lin(x, W(m, "heads.gate_proj.weight"))).mean()}
    for name, value in want.items():
        torch.testing.assert_close(stats[f"{name}/layer1"].double(), value.double(), rtol=1e-5, atol=1e-7)
