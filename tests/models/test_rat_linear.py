"""The `rat` and `linear` mixers (fast tier, ~10 s).

For both kinds, on the mixer alone: exact causality in fp32 (outputs before a
perturbed token are bit-identical), packed documents == separate runs,
token-by-token decoding and prefill + decode == the full forward, state memory.
RAT only: the Gated-Attention gate forced to one equals no gate with the same
weights; MoH routes exactly top-k heads and its loss is differentiable; the
diagnostics in ctx.stats; the chrono forget-gate init; GPU-scale shapes build
on the meta device. Linear only: TNL slopes per layer. And a HybridLM mixing
rat, linear and attn decodes exactly like its full forward.
"""
import math

import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

F64 = torch.float64
KINDS = ["rat", "linear"]
SMALL = {"rat": {"chunk": 4}, "linear": {"block": 8}}


def build(kind: str, n_kv_heads: int = 2, layer_idx: int = 0, n_layers: int = 2, **opts):
    dims = MixerDims(d_model=64, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16, layer_idx=layer_idx,
                     n_layers=n_layers, rope=RopeConfig())
    cls = MIXERS[kind]
    mixer = cls(dims, cls.Config(**{**SMALL[kind], **opts}))
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.2)
    mixer.reset_parameters()
    return mixer


def positions(lens: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lens])[None]


def call(mixer, x, pos, state=None, want_state=False, seq_ids=None, stats=None):
    ctx = SeqContext(position_ids=pos.expand(x.shape[0], -1), seq_ids=seq_ids, want_state=want_state, stats=stats)
    return mixer(x, ctx, state)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_bit_exact(kind):
    mixer = build(kind)
    T = 37
    x = torch.randn(2, T, 64)
    pos = torch.arange(T)[None]
    base, _ = call(mixer, x, pos)
    for t in (0, 3, 4, 17, 36):
        x2 = x.clone()
        x2[:, t] += 1.0
        out, _ = call(mixer, x2, pos)
        assert torch.equal(out[:, :t], base[:, :t]), f"outputs before token {t} changed"
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_documents_equal_separate(kind):
    mixer = build(kind).double()
    lens = [6, 13, 11]  # documents start mid-chunk and mid-block
    x = torch.randn(1, sum(lens), 64, dtype=F64)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    packed, _ = call(mixer, x, positions(lens), seq_ids=seq)
    start = 0
    for n in lens:
        alone, _ = call(mixer, x[:, start:start + n], torch.arange(n)[None])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-12, atol=1e-12)
        start += n


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_equals_forward(kind, n_kv_heads):
    mixer = build(kind, n_kv_heads=n_kv_heads).double()
    T = 26
    x = torch.randn(2, T, 64, dtype=F64)
    pos = torch.arange(T)[None]
    whole, _ = call(mixer, x, pos)
    for prefill in (1, 7):
        y, state = call(mixer, x[:, :prefill], pos[:, :prefill], want_state=True)
        outs = [y]
        for t in range(prefill, T):
            y, state = call(mixer, x[:, t:t + 1], pos[:, t:t + 1], state=state, want_state=True)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-12, atol=1e-12)


def test_rat_cache_is_about_chunk_times_smaller_than_attention():
    rat = build("rat", n_kv_heads=4, chunk=16)
    attn = MIXERS["attn"](rat.dims, MIXERS["attn"].Config())
    T = 32768
    assert rat.state_bytes(T) / attn.state_bytes(T) == pytest.approx(1 / 16, rel=1e-3)
    y, state = call(rat, torch.randn(1, 70, 64), torch.arange(70)[None], want_state=True)
    assert state["k"].shape == (1, 70 // 16, 4, 16)  # one entry per closed chunk
    linear = build("linear")
    assert linear.state_bytes(16) == linear.state_bytes(T) == 4 * 16 * 16 * 4


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_rat_gate_forced_to_one_equals_no_gate(gate):
    gated = build("rat", gate=gate)
    plain = build("rat")
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("heads.")})
    gated.heads.gate_fn = torch.ones_like
    x = torch.randn(2, 19, 64)
    pos = torch.arange(19)[None]
    assert torch.equal(call(gated, x, pos)[0], call(plain, x, pos)[0])


def test_rat_moh_routes_top_k_and_its_loss_has_a_gradient():
    mixer = build("rat", moh=True, moh_shared=1, moh_topk=2)
    x = torch.randn(2, 19, 64)
    ctx = SeqContext(position_ids=torch.arange(19)[None].expand(2, -1), stats={})
    w = mixer.heads.moh_weights(x, None)  # (B, T, H): shared head first, then the routed ones
    assert ((w[..., 1:] > 0).sum(-1) == 2).all()
    y, _ = mixer(x, ctx)
    assert len(ctx.aux_losses) == 1
    (y.square().mean() + ctx.aux_losses[0]).backward()
    assert mixer.heads.router.weight.grad is not None and mixer.heads.router.weight.grad.abs().sum() > 0
    assert "moh_usage/layer0" in ctx.stats


def test_rat_stats():
    mixer = build("rat", gate="headwise")
    stats = {}
    call(mixer, torch.randn(2, 30, 64), torch.arange(30)[None], stats=stats)
    # the values are checked against the per-token reference in tests/models/reference/test_rat.py
    for name in ("rat_forget_mean", "rat_local_mass", "sink_mass", "gate_mean"):
        value = stats[f"{name}/layer0"]
        assert value.dim() == 0 and 0 < float(value) < 1, name


def test_rat_chrono_forget_gate_init():
    mixer = build("rat", chunk=16)
    g = torch.sigmoid(mixer.f_proj.bias)
    assert (g > 0.5).all() and (g < 15 / 16).all() and g.std() > 0.01


def test_rat_rejects_groups_not_dividing_heads():
    with pytest.raises(ValueError, match="multiple of model.mixers.rat.groups"):
        build("rat", groups=3)


def test_linear_slopes_scale_per_layer_as_tnl():
    first, last = build("linear", layer_idx=0, n_layers=4), build("linear", layer_idx=3, n_layers=4)
    torch.testing.assert_close(first.decay, torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(4)]) * (1 + 1e-5))
    assert (last.decay <= 1e-5 * first.decay).all()  # the top layer barely forgets


def test_gpu_scale_builds_on_meta():
    cfg = ModelConfig(vocab_size=32000, d_model=2048, n_heads=16, layers=[["rat", "linear"], "x2"])
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert model.num_params() > 0
    per_layer = model.state_bytes(131072)
    assert per_layer["0:rat"] == 2 * (131072 // 16) * 16 * 128 * 2 + 2 * 16 * 128 * 4


def test_hybrid_generation_state_equals_forward():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2,
                      layers=["rat", "linear", "attn"], mixers={"rat": {"chunk": 4}, "linear": {"block": 8}})
    torch.manual_seed(0)
    model = HybridLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 30))
    whole = model(ids).hidden
    out = model(ids[:, :9], want_state=True)
    steps, state = [out.hidden], out.state
    for t in range(9, 30):
        out = model(ids[:, t:t + 1], state=state, want_state=True)
        steps.append(out.hidden)
        state = out.state
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-12, atol=1e-12)
    assert math.isfinite(float(model.flops_per_token(4096)))
