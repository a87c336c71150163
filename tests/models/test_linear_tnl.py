"""`linear` with norm: layernorm and qk_scale: false is TNL's attention module
(OpenNLPLab/lightning-attention examples/module/tnl_attn.py), written out here from its
formulas (SiLU q, k, v; causal linear attention with ALiBi-slope decay scaled per layer;
LayerNorm over the full width; low-rank sigmoid output gate; o_proj), weights shared: equal
outputs in fp64. The default per-head RMSNorm gives a different result (so the option is
not a no-op), and the layernorm variant still carries its state exactly. ~1 s."""
import torch
import torch.nn.functional as F

from loom.kernels.linear.reference import linear_attention_dense
from loom.models import HybridLM, ModelConfig
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

D, H = 32, 4
K = D // H


def _mixer(**opts):
    torch.manual_seed(0)
    cls = MIXERS["linear"]
    m = cls(MixerDims(D, H, H, K, layer_idx=1, n_layers=4, rope=RopeConfig()), cls.Config(**opts)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def tnl(m, x):
    """TNL's forward with the mixer's weights (names as in tnl_attn.py in the comments)."""
    B, T, _ = x.shape
    q, k, v = (F.silu(proj(x)).view(B, T, H, K) for proj in (m.q_proj, m.k_proj, m.v_proj))
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=x.dtype) * (1 - 1 / 3 + 1e-5)
    o = linear_attention_dense(q, k, v, slopes).reshape(B, T, D)            # lightning_attn_func
    o = F.layer_norm(o, (D,), m.norm.weight, m.norm.bias, eps=1e-5)        # self.norm = nn.LayerNorm(embed_dim)
    o = o * torch.sigmoid(m.gate[1](m.gate[0](x)))                         # self.output_gate
    return m.o_proj(o)


def test_layernorm_variant_is_tnl():
    x = torch.randn(2, 29, D, dtype=torch.float64)
    ctx = SeqContext(position_ids=torch.arange(29).expand(2, 29))
    m = _mixer(norm="layernorm", qk_scale=False, block=8)
    # the mixer builds its slopes in fp32 (a buffer): 1e-7 relative, against O(1) for a wrong norm
    torch.testing.assert_close(m(x, ctx)[0], tnl(m, x), rtol=1e-6, atol=1e-7)
    rms = _mixer(block=8, qk_scale=False)
    assert not torch.allclose(rms(x, ctx)[0], tnl(m, x), atol=1e-3)


def test_layernorm_variant_carries_state():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=D, n_heads=H, layers=["linear", "x2"],
                                 mixers={"linear": {"norm": "layernorm", "block": 4}})).double()
    assert model.blocks[0].mixer.norm.bias is not None and bool((model.blocks[0].mixer.norm.weight == 1).all())
    ids = torch.randint(0, 64, (2, 30))
    whole = model(ids).hidden
    first = model(ids[:, :13], want_state=True)
    second = model(ids[:, 13:], state=first.state)
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), whole, rtol=1e-9, atol=1e-9)
