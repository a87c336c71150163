"""The model options of the imported families compute what their docstrings say (CPU,
float64, well under a second each): gate packings are one function in three layouts,
partial rotary rotates only the first dims, the RMSNorm conventions, the three norm
placements, the MLP kinds, MLP-only and mixer-only blocks, the logit scale, q/k norm
widths, per-kind RoPE and the embedding scale's rounding. The contract and cp tests run
the same options through causality, packing, decoding and context parallelism."""
import math

import pytest
import torch
import torch.nn.functional as F

from loom.models import ConfigError, HybridLM, ModelConfig
from loom.models.blocks import NoMLP, NoMixer
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.norms import NormStyle, RMSNorm
from loom.models.rope import RopeConfig, Rotary, apply_rotary

H, G, K, D = 4, 2, 8, 24


def mixer(kind="attn", **opts):
    torch.manual_seed(0)
    m = MIXERS[kind](MixerDims(D, H, G, K, 0, 2, RopeConfig()), MIXERS[kind].Config(**opts)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def run(m, x):
    T = x.shape[1]
    return m(x, SeqContext(position_ids=torch.arange(T).expand(x.shape[0], T)))[0]


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
@pytest.mark.parametrize("packing", ["head", "group"])
def test_gate_packings_are_one_function(gate, packing):
    sep = mixer(gate=gate)
    packed = mixer(gate=gate, gate_packing=packing)
    W = 1 if gate == "headwise" else K
    wq = sep.q_proj.weight.view(H, K, D)
    wg = sep.heads.gate_proj.weight.view(H, W, D)
    if packing == "head":  # rows per head: [q_h, g_h]
        w = torch.cat([wq, wg], dim=1).reshape(-1, D)
    else:  # rows per KV group: [q of its heads, gates of its heads]
        R = H // G
        w = torch.cat([wq.reshape(G, R * K, D), wg.reshape(G, R * W, D)], dim=1).reshape(-1, D)
    state = {k: v for k, v in sep.state_dict().items() if not k.startswith("heads.gate_proj")}
    state["q_proj.weight"] = w
    packed.load_state_dict(state)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    torch.testing.assert_close(run(packed, x), run(sep, x), rtol=1e-12, atol=1e-12)


def test_gate_packing_needs_a_gate():
    with pytest.raises(ValueError, match="gate_packing"):
        mixer(gate_packing="head")


def test_partial_rotary_rotates_the_first_dims_only():
    full = Rotary(K, RopeConfig(base=100.0))
    part = Rotary(32, RopeConfig(base=100.0), fraction=0.25)  # R = 8 of 32
    pos = torch.arange(13)[None]
    x = torch.randn(1, 13, 3, 32, dtype=torch.float64)
    y = apply_rotary(x, *part(pos))
    torch.testing.assert_close(y[..., 8:], x[..., 8:], rtol=0, atol=0)
    torch.testing.assert_close(y[..., :8], apply_rotary(x[..., :8], *full(pos)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rope_fraction"):
        Rotary(8, RopeConfig(), fraction=0.2)  # 1.6 dims: int() gives 1, odd


def test_rmsnorm_conventions():
    x = torch.randn(3, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    for style, weight, expect in [(NormStyle(), w, w * n), (NormStyle(weight_fp32=True), w, w * n),
                                  (NormStyle(zero_centred=True), w, (1 + w) * n)]:
        norm = RMSNorm(16, 1e-6, style).double()
        norm.weight.data = weight
        torch.testing.assert_close(norm(x), expect, rtol=1e-12, atol=1e-12)
    assert RMSNorm(4, style=NormStyle(zero_centred=True)).weight.abs().sum() == 0  # identity at init
    xb = torch.randn(5, 16).bfloat16()
    wb = torch.randn(16).bfloat16()
    nb = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    late = RMSNorm(16, 1e-6, NormStyle(weight_fp32=True)).bfloat16()
    late.weight.data = wb
    assert torch.equal(late(xb), (wb.float() * nb).bfloat16())  # OLMo: weight in fp32, then round


def lm(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=50, d_model=D, n_heads=H, n_kv_heads=G, layers=["attn"], tie_embeddings=False)
    model = HybridLM(ModelConfig(**{**base, **kw})).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.3)
    return model


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
@pytest.mark.parametrize("mlp_kind", ["swiglu", "geglu", "relu2"])
def test_block_formula(placement, mlp_kind):
    model = lm(norm_placement=placement, mlp_kind=mlp_kind, norm_zero_centred=placement == "sandwich")
    block = model.blocks[0]
    x = torch.randn(2, 9, D, dtype=torch.float64)
    ctx = SeqContext(position_ids=torch.arange(9).expand(2, 9))

    def mlp(h):
        m = block.mlp
        if mlp_kind == "relu2":
            return m.down_proj(F.relu(m.up_proj(h)) ** 2)
        act = F.silu if mlp_kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        return m.down_proj(act(m.gate_proj(h)) * m.up_proj(h))

    def sub(f, h, pre, post):
        y = f(pre(h) if pre is not None else h)
        return h + (post(y) if post is not None else y)

    assert (block.mixer_norm is None) == (placement == "post")
    assert (block.mixer_post_norm is None) == (placement == "pre")
    h = sub(lambda t: block.mixer(t, ctx)[0], x, block.mixer_norm, block.mixer_post_norm)
    expect = sub(mlp, h, block.mlp_norm, block.mlp_post_norm)
    torch.testing.assert_close(block(x, ctx)[0], expect, rtol=1e-12, atol=1e-12)


def test_norm_placement_per_kind():
    """model.norm_placements overrides norm_placement for one layer kind (OLMo-hybrid: attention
    post-norm, gdn pre-norm); a kind not in model.layers or an unknown placement is refused."""
    model = lm(layers=["attn", "swa"], norm_placement="post", norm_placements={"swa": "pre"},
               mixers={"swa": {"window": 3}})
    a, s = model.blocks
    assert a.mixer_norm is None and a.mixer_post_norm is not None and a.mlp_post_norm is not None
    assert s.mixer_norm is not None and s.mixer_post_norm is None and s.mlp_norm is not None
    with pytest.raises(ConfigError, match="norm_placements: 'gdn'"):
        ModelConfig(layers=["attn"], norm_placements={"gdn": "pre"}).resolved()
    with pytest.raises(ConfigError, match="norm_placements.attn must be one of"):
        ModelConfig(layers=["attn"], norm_placements={"attn": "middle"}).resolved()


def test_mlp_only_and_mixer_only_blocks():
    model = lm(layers=["attn", "mlp", "swa"], block_mlp=False, mlp_kind="relu2")
    kinds = [(type(b.mixer), type(b.mlp)) for b in model.blocks]
    assert kinds[1][0] is NoMixer and kinds[0][1] is NoMLP and kinds[2][1] is NoMLP
    assert not any(n.startswith("blocks.0.mlp") or n.startswith("blocks.1.mixer") for n, _ in model.named_parameters())
    x = torch.randn(1, 7, D, dtype=torch.float64)
    ctx = SeqContext(position_ids=torch.arange(7)[None])
    b0, b1 = model.blocks[0], model.blocks[1]
    torch.testing.assert_close(b0(x, ctx)[0], x + b0.mixer(b0.mixer_norm(x), ctx)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1(x, ctx)[0], x + b1.mlp(b1.mlp_norm(x)), rtol=1e-12, atol=1e-12)
    assert model.state_bytes(10)["1:mlp"] == 0
    with pytest.raises(ConfigError, match="unknown mixer kind 'mlpp'"):
        ModelConfig(layers=["mlpp"]).resolved()


def test_logit_scale_and_qk_norm_width():
    a, b = mixer(scale=0.2), mixer()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # scale s on q K^-1/2-scaled logits: multiply q by s sqrt(K)
        b.q_proj.weight.mul_(0.2 * math.sqrt(K))
    x = torch.randn(2, 10, D, dtype=torch.float64)
    torch.testing.assert_close(run(a, x), run(b, x), rtol=1e-10, atol=1e-12)
    full = mixer(qk_norm=True, qk_norm_width="full", rope=False)
    assert full.q_norm.weight.shape == (H * K,) and full.k_norm.weight.shape == (G * K,)
    ctx = SeqContext(position_ids=torch.arange(10)[None])
    q = full.project(x[:1], ctx)[0]
    qn = full.q_proj(x[:1])
    qn = qn / torch.sqrt(qn.pow(2).mean(-1, keepdim=True) + 1e-6) * full.q_norm.weight
    torch.testing.assert_close(q, qn.view(1, 10, H, K), rtol=1e-12, atol=1e-12)


def test_rope_config_per_kind():
    model = lm(layers=["swa", "attn"], rope=RopeConfig(base=1e6), head_dim=K,
               mixers={"swa": {"window": 4, "rope_config": {"base": 10.0}}})
    swa, attn = model.blocks[0].mixer.rotary, model.blocks[1].mixer.rotary
    torch.testing.assert_close(swa.inv_freq.float(), 10.0 ** (-torch.arange(0, K, 2).float() / K))
    torch.testing.assert_close(attn.inv_freq.float(), 1e6 ** (-torch.arange(0, K, 2).float() / K))


def test_embed_scale_rounds_to_the_weight_dtype():
    model = HybridLM(ModelConfig(vocab_size=50, d_model=D, n_heads=H, layers=["attn"], embed_scale=D ** 0.5))
    model = model.bfloat16()
    ids = torch.arange(10)[None]
    hooked = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: hooked.update(x=args[0]))
    model(ids)
    scale = torch.tensor(D ** 0.5).bfloat16()  # 4.90625, not 4.899
    assert torch.equal(hooked["x"], model.embed.weight[:10][None] * scale)


def test_logit_softcap_in_logits_and_loss():
    """logits and the chunked loss (recomputed per chunk) both see c tanh(z / c); gradients equal
    plain cross-entropy on the capped logits."""
    model = lm(logit_softcap=1.5)
    ids = torch.randint(0, 50, (2, 13))
    y = ids.roll(-1, 1)
    y[0, 3] = -100
    h = model(ids).hidden
    z = F.linear(h, model.head_weight).float()
    torch.testing.assert_close(model.logits(h), 1.5 * torch.tanh(z / 1.5))
    loss = model.loss(h, y, chunk=5)
    ref = F.cross_entropy(1.5 * torch.tanh(z / 1.5).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    g, g_ref = (torch.autograd.grad(v, model.lm_head.weight, retain_graph=True)[0] for v in (loss, ref))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert torch.isclose(model.loss(h, y, reduction="sum"), ref * (y != -100).sum(), rtol=1e-6)
