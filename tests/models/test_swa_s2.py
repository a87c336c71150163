"""The `swa` and `s2` mixers (fp64): causality, packed documents equal separate
runs (outputs and input gradients), token-by-token decoding and a sequence in
two pieces (one of them starting a new document) equal the full forward, the
degenerate settings that must reduce to dense `attn`, cache and FLOP
accounting against brute force, the attention-sink statistic, config errors.
Cost: ~5 s."""
import math

import pytest
import torch

from loom.kernels.s2 import s2_mask
from loom.models.config import ConfigError, build
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

SMALL = {"swa": {"window": 5}, "s2": {"block": 4, "local_blocks": 2, "vert_stride": 3}}
D, H, G, K = 32, 4, 2, 8


def make(kind, n_heads=H, n_kv=G, **opts):
    dims = MixerDims(D, n_heads, n_kv, K, layer_idx=0, n_layers=1, rope=RopeConfig())
    torch.manual_seed(0)
    return MIXERS[kind](dims, build(MIXERS[kind].Config, {**SMALL.get(kind, {}), **opts})).double()


def ctx_for(B, T, seq=None, want_state=False, start=0, stats=None):
    if seq is None:
        pos = torch.arange(start, start + T).expand(B, T)
    else:
        idx = torch.arange(T).expand(B, T)
        first = torch.where(torch.cat([torch.ones(B, 1, dtype=torch.bool), seq[:, 1:] != seq[:, :-1]], 1),
                            idx, 0).cummax(1).values
        pos = idx - first
    return SeqContext(position_ids=pos, seq_ids=seq, want_state=want_state, stats=stats)


@pytest.mark.parametrize("kind", ["swa", "s2"])
def test_causal(kind):
    m = make(kind)
    x = torch.randn(2, 45, D, dtype=torch.float64)
    base, _ = m(x, ctx_for(2, 45))
    for t in (0, 7, 23, 44):
        x2 = x.clone()
        x2[:, t] += 1.0
        y, _ = m(x2, ctx_for(2, 45))
        torch.testing.assert_close(y[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(y[:, t:], base[:, t:])


@pytest.mark.parametrize("kind", ["swa", "s2"])
def test_packed_equals_separate(kind):
    m = make(kind)
    lens = [13, 22, 1, 17]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    x = torch.randn(1, sum(lens), D, dtype=torch.float64, requires_grad=True)
    y, _ = m(x, ctx_for(1, sum(lens), seq))
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, dy)
    s = 0
    for n in lens:
        xs = x[:, s:s + n].detach().requires_grad_()
        ys, _ = m(xs, ctx_for(1, n))
        torch.testing.assert_close(y[:, s:s + n], ys, rtol=0, atol=1e-12)
        torch.testing.assert_close(dx[:, s:s + n], torch.autograd.grad(ys, xs, dy[:, s:s + n])[0], rtol=0, atol=1e-12)
        s += n


@pytest.mark.parametrize("kind", ["swa", "s2"])
def test_decode_token_by_token_equals_forward(kind):
    m = make(kind)
    T, P = 31, 6
    x = torch.randn(2, T, D, dtype=torch.float64)
    whole, _ = m(x, ctx_for(2, T))
    y, state = m(x[:, :P], ctx_for(2, P, want_state=True))
    outs = [y]
    for t in range(P, T):
        y, state = m(x[:, t:t + 1], ctx_for(2, 1, want_state=True, start=t), state)
        outs.append(y)
        if kind == "swa":
            assert state["k"].shape[1] == min(t + 1, m.window)  # ring buffer of the last W tokens
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["swa", "s2"])
def test_two_pieces_with_a_new_document_equal_whole(kind):
    """Row = doc A (10) + doc B (21) + doc C (9); the cut falls inside B, so
    piece two continues B then starts C (position 0) and must not see A or B."""
    m = make(kind)
    lens, cut = [10, 21, 9], 16
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].expand(2, -1)
    x = torch.randn(2, sum(lens), D, dtype=torch.float64)
    full = ctx_for(2, sum(lens), seq)
    whole, _ = m(x, full)
    c1 = SeqContext(position_ids=full.position_ids[:, :cut], seq_ids=seq[:, :cut], want_state=True)
    y1, state = m(x[:, :cut], c1)
    c2 = SeqContext(position_ids=full.position_ids[:, cut:], seq_ids=seq[:, cut:], want_state=True)
    y2, _ = m(x[:, cut:], c2, state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, rtol=0, atol=1e-12)


def same_weights(dense, other):
    missing, unexpected = dense.load_state_dict(other.state_dict(), strict=False)
    assert not missing and not unexpected


@pytest.mark.parametrize("kind,opts", [("swa", {"window": 64}), ("s2", {"local_blocks": 16}),
                                       ("s2", {"vert_stride": 1})], ids=["swa-wide", "s2-wide", "s2-stride1"])
def test_degenerate_patterns_equal_dense_attention(kind, opts):
    m, dense = make(kind, **opts), make("attn")
    same_weights(dense, m)
    lens = [30, 20]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].expand(2, -1)
    x = torch.randn(2, 50, D, dtype=torch.float64)
    torch.testing.assert_close(m(x, ctx_for(2, 50, seq))[0], dense(x, ctx_for(2, 50, seq))[0], rtol=0, atol=1e-12)


def future_needs(T, horizon, b, L, V, offsets, group):
    """Keys j < T that some query in [T, T + horizon) of any pattern head of the group can see."""
    S = T + horizon
    mask = s2_mask(S, S, block=b, local_blocks=L, vert_stride=V, head_offsets=offsets)[0]  # (P, S, S)
    return int(mask[group][:, T:, :T].any(0).any(0).sum())


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("T", [3, 8, 37, 100])
def test_s2_state_bytes_is_what_later_queries_need(n_heads, n_kv, T):
    m = make("s2", n_heads=n_heads, n_kv=n_kv)
    c, offs = m.cfg, m.head_offsets
    per = offs.shape[0] // n_kv
    need = sum(future_needs(T, 40, c.block, c.local_blocks, c.vert_stride, offs, list(range(g * per, (g + 1) * per)))
               for g in range(n_kv))
    assert m.state_bytes(T, bytes_per_elem=2) == 2 * need * K * 2
    assert m.state_bytes(T) < make("attn", n_heads=n_heads, n_kv=n_kv).state_bytes(T) or T <= 8
    assert make("swa").state_bytes(T) == 2 * min(T, 5) * G * K * 2


@pytest.mark.parametrize("T", [1, 17, 100])
def test_s2_mixing_flops_count_visible_keys(T):
    m = make("s2")
    c = m.cfg
    mask = s2_mask(T, T, block=c.block, local_blocks=c.local_blocks, vert_stride=c.vert_stride,
                   head_offsets=m.head_offsets)[0]
    visible = mask.sum().item() / (mask.shape[0] * T)
    assert math.isclose(m.mixing_flops_per_token(T), 4 * H * K * float(visible), rel_tol=1e-12)


@pytest.mark.parametrize("kind", ["swa", "s2"])
def test_sink_mass_counts_only_visible_first_tokens(kind):
    """The statistic equals the attention probability on each document's first
    token, from the dense reference (zero for heads that cannot see it)."""
    m = make(kind)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate([9, 40])])[None]
    ctx = ctx_for(1, 49, seq, stats={})
    x = torch.randn(1, 49, D, dtype=torch.float64)
    m(x, ctx)
    got = ctx.stats["sink_mass/layer0"]
    q, k, _, _, _ = m.project(x, ctx)
    if kind == "swa":
        from loom.kernels.attention.reference import visibility_mask
        mask = visibility_mask(49, 49, seq, m.window, None).expand(1, H, 49, 49)
    else:
        c = m.cfg
        mask = s2_mask(49, 49, block=c.block, local_blocks=c.local_blocks, vert_stride=c.vert_stride,
                       head_offsets=m.head_offsets, seq_ids=seq)
        mask = mask.repeat_interleave(H // mask.shape[1], 1)
    s = torch.einsum("bthk,bshk->bhts", q, k.repeat_interleave(H // G, 2)) / math.sqrt(K)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)  # (1, H, T, S)
    first = torch.arange(49) - ctx.position_ids[0]
    want = p[0, :, torch.arange(49), first].mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # the statistic is computed in fp32


def test_config_errors():
    with pytest.raises(ConfigError, match="window"):
        build(MIXERS["swa"].Config, {"window": -1}, "model.mixers.swa")
    with pytest.raises(ConfigError, match="vert_strid"):
        build(MIXERS["s2"].Config, {"vert_strid": 4}, "model.mixers.s2")
    with pytest.raises(ValueError, match="cannot cover"):
        make("s2", n_heads=2, n_kv=2, vert_stride=4)
