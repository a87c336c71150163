"""Per-head output options (models/mixers/heads.py) on every softmax-attention
mixer: a gate forced to one changes nothing; headwise and elementwise gate
shapes and values; MoH picks exactly moh_topk routed heads per token plus all
shared heads, with the documented weights; the balance loss equals moh_topk
for a uniform router and reaches the router's gradient; diagnostics appear in
ctx.stats. Cost: ~2 s."""
import pytest
import torch
import torch.nn.functional as F

from loom.models.config import build
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.mixers.heads import HeadOptions, HeadOutput
from loom.models.rope import RopeConfig

SMALL = {"swa": {"window": 5}, "s2": {"block": 4, "local_blocks": 2, "vert_stride": 3}}
KINDS = ["attn", "swa", "s2"]
D, H, G, K = 32, 6, 3, 8


def make(kind, **opts):
    dims = MixerDims(D, H, G, K, layer_idx=3, n_layers=4, rope=RopeConfig())
    torch.manual_seed(0)
    return MIXERS[kind](dims, build(MIXERS[kind].Config, {**SMALL.get(kind, {}), **opts})).double()


def ctx_for(B, T, stats=None):
    return SeqContext(position_ids=torch.arange(T).expand(B, T), stats=stats)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_forced_to_one_equals_no_gate(kind, gate):
    gated, plain = make(kind, gate=gate), make(kind)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["heads.gate_proj.weight"] and not unexpected
    x = torch.randn(2, 23, D, dtype=torch.float64)
    want, _ = plain(x, ctx_for(2, 23))
    assert not torch.allclose(gated(x, ctx_for(2, 23))[0], want)  # the sigmoid gate acts
    gated.heads.gate_fn = torch.ones_like
    torch.testing.assert_close(gated(x, ctx_for(2, 23))[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("gate,width", [("headwise", H), ("elementwise", H * K)])
def test_gate_shapes_and_values(gate, width):
    heads = HeadOutput(D, H, K, HeadOptions(gate=gate), layer_idx=0).double()
    assert heads.gate_proj.weight.shape == (width, D)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    o = torch.randn(2, 5, H, K, dtype=torch.float64)
    g = torch.sigmoid(x @ heads.gate_proj.weight.T).view(2, 5, H, width // H)  # (B, T, H, 1 or K)
    stats = {}
    torch.testing.assert_close(heads(x, o, ctx_for(2, 5, stats)), o * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(stats["gate_mean/layer0"], g.mean().float())


def moh(shared=2, topk=2, weight=0.01):
    return HeadOutput(D, H, K, HeadOptions(moh=True, moh_shared=shared, moh_topk=topk, moh_loss_weight=weight),
                      layer_idx=0).double()


@pytest.mark.parametrize("shared,topk", [(2, 1), (2, 3), (1, 2), (5, 1)])
def test_moh_picks_topk_routed_and_all_shared_heads(shared, topk):
    heads = moh(shared, topk)
    x = torch.randn(3, 17, D, dtype=torch.float64)
    w = heads.moh_weights(x, None)  # (B, T, H)
    assert w.shape == (3, 17, H)
    assert (w[..., :shared] > 0).all()
    assert ((w[..., shared:] != 0).sum(-1) == topk).all()


def test_moh_weights_follow_the_formula():
    heads = moh(shared=2, topk=2)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    p = F.softmax(x @ heads.router.weight.T, -1)  # (B, T, H_r)
    top = p.topk(2, -1)
    g_r = torch.zeros_like(p).scatter(-1, top.indices, 2 * top.values / top.values.sum(-1, keepdim=True))
    g_s = 2 * F.softmax(x @ heads.shared_router.weight.T, -1)
    a = 2 * F.softmax(x @ heads.balance.weight.T, -1)
    want = torch.cat([a[..., :1] * g_s, a[..., 1:] * g_r], -1)
    # Routing runs in fp32 whatever the model dtype (top-k ties and bf16).
    torch.testing.assert_close(heads.moh_weights(x, None), want.float(), rtol=1e-6, atol=1e-6)
    o = torch.randn(2, 9, H, K, dtype=torch.float64)
    torch.testing.assert_close(heads(x, o, None), o * want[..., None], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_uniform_router_balance_loss_equals_topk(topk):
    """H_r * sum_i P_i f_i with P_i = 1/H_r and sum_i f_i = k gives k, whichever heads win the ties."""
    heads = moh(shared=2, topk=topk, weight=0.5)
    with torch.no_grad():
        heads.router.weight.zero_()
    ctx = ctx_for(2, 11)
    heads.moh_weights(torch.randn(2, 11, D, dtype=torch.float64), ctx)
    assert len(ctx.aux_losses) == 1
    torch.testing.assert_close(ctx.aux_losses[0], torch.tensor(0.5 * topk, dtype=torch.float32))


def test_balance_loss_reaches_the_router():
    heads = moh()
    ctx = ctx_for(2, 11)
    heads.moh_weights(torch.randn(2, 11, D, dtype=torch.float64), ctx)
    ctx.aux_losses[0].backward()
    assert heads.router.weight.grad is not None and heads.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_mixers_record_stats_and_aux_loss(kind):
    m = make(kind, gate="headwise", moh=True, moh_shared=2, moh_topk=2)
    stats = {}
    ctx = ctx_for(2, 19, stats)
    y, _ = m(torch.randn(2, 19, D, dtype=torch.float64), ctx)
    assert set(stats) == {"gate_mean/layer3", "moh_usage/layer3", "moh_balance/layer3", "sink_mass/layer3"}
    torch.testing.assert_close(stats["moh_usage/layer3"].sum(), torch.tensor(1.0))
    usage = stats["moh_usage/layer3"]  # the balance is min/max of the heads' usage, not just some number in [0, 1]
    torch.testing.assert_close(stats["moh_balance/layer3"], usage.min() / usage.max())
    # the sink mass's value is checked against the per-token reference (tests/models/reference/test_attn.py)
    assert 0 < float(stats["sink_mass/layer3"]) < 1
    assert len(ctx.aux_losses) == 1
    (y.square().mean() + ctx.aux_losses[0]).backward()
    # every parameter takes part: a gradient that is missing or all zero means a path is cut
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), \
        [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    ctx = ctx_for(2, 19)  # no stats dict: nothing recorded, nothing fails
    m(torch.randn(2, 19, D, dtype=torch.float64), ctx)
    assert ctx.stats is None


def test_moh_options_are_checked():
    with pytest.raises(ValueError, match="moh_shared"):
        moh(shared=H)
    with pytest.raises(ValueError, match="moh_topk"):
        moh(shared=2, topk=H - 1)
