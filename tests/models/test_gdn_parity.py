"""The `gdn` mixer against transformers' own layers, weights copied one to one (for Qwen3.5 and
OLMo-hybrid through the HF importer's own adapters, trainer/hf/families/): Qwen3_5GatedDeltaNet (separate in_proj_qkv / z / b / a),
Qwen3NextGatedDeltaNet (in_proj_qkvz / in_proj_ba interleaved per key head) and
OlmoHybridGatedDeltaNet (q/k/v/g/a/b_proj, beta = 2 sigmoid: `beta: sigmoid2`), grouped heads
(HV = 2 HK), K != V; and the op against transformers' torch_chunk_gated_delta_rule. fp32
(transformers computes the rule in fp32). Cost: ~2 s.
"""
import pytest
import torch

from loom.kernels.gated_delta_rule import gated_delta_rule
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig
from loom.trainer.hf.families.hybrid import conv_from_hf

qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

D, HK, HV, K, V, W = 32, 2, 4, 8, 6, 4
SIZES = dict(hidden_size=D, linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=K,
             linear_value_head_dim=V, linear_conv_kernel_dim=W, rms_norm_eps=1e-6, num_hidden_layers=1,
             layer_types=["linear_attention"], hidden_act="silu")


def loom_gdn(**opts):
    dims = MixerDims(D, HV, HV, 16, layer_idx=0, n_layers=1, rope=RopeConfig())
    cls = MIXERS["gdn"]
    return cls(dims, cls.Config(n_v_heads=HV, n_k_heads=HK, head_k_dim=K, head_v_dim=V, conv_size=W, chunk=16,
                                **opts))


def randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def copy_common(hf, ours, norm="norm", out="out_proj"):
    with torch.no_grad():
        ours.conv1d.weight.copy_(conv_from_hf(hf.conv1d.weight))  # HF's tap W-1-j multiplies x_{t-j}
        ours.dt_bias.copy_(hf.dt_bias)
        ours.A_log.copy_(hf.A_log)
        ours.norm.weight.copy_(getattr(hf, norm).weight)
        ours.out_proj.weight.copy_(getattr(hf, out).weight)


def load_through_adapter(family, hf, ours, layer_prefix="model.layers.0.linear_attn."):
    """hf's tensors named as in a checkpoint, mapped by the family adapter, loaded into ours."""
    state = family.tensors_from_hf({layer_prefix + k: v for k, v in hf.state_dict().items()})
    mixer = {family.from_hf(k).removeprefix("blocks.0.mixer."): v for k, v in state.items()}
    ours.load_state_dict(mixer, strict=True)


def compare(hf, ours, T=77):
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    want = hf(x)
    want = want[0] if isinstance(want, tuple) else want
    got, _ = ours(x, SeqContext(position_ids=torch.arange(T).expand(2, T)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_matches_qwen3_5_gated_delta_net():
    from loom.trainer.hf.families import Qwen3_5

    hf = randomise(qwen3_5.Qwen3_5GatedDeltaNet(qwen3_5.Qwen3_5TextConfig(**SIZES), layer_idx=0)).eval()
    ours = loom_gdn()
    load_through_adapter(Qwen3_5(), hf, ours)
    compare(hf, ours)


def test_matches_qwen3_next_gated_delta_net():
    hf = randomise(qwen3_next.Qwen3NextGatedDeltaNet(qwen3_next.Qwen3NextConfig(**SIZES), layer_idx=0)).eval()
    ours = loom_gdn()
    copy_common(hf, ours)
    G = HV // HK
    qkvz = hf.in_proj_qkvz.weight.view(HK, 2 * K + 2 * G * V, D)  # per key head: [q, k, v group, z group]
    q, k, v, z = qkvz.split([K, K, G * V, G * V], dim=1)
    b, a = hf.in_proj_ba.weight.view(HK, 2 * G, D).split([G, G], dim=1)  # per key head: [b group, a group]
    with torch.no_grad():
        ours.in_proj_qkv.weight.copy_(torch.cat([q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)]))
        ours.in_proj_z.weight.copy_(z.reshape(-1, D))
        ours.in_proj_b.weight.copy_(b.reshape(-1, D))
        ours.in_proj_a.weight.copy_(a.reshape(-1, D))
    compare(hf, ours)


def test_matches_olmo_hybrid_gated_delta_net():
    olmo = pytest.importorskip("transformers.models.olmo_hybrid.modeling_olmo_hybrid")
    sizes = {**SIZES, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
    cfg = olmo.OlmoHybridConfig(**sizes, num_attention_heads=2, linear_allow_neg_eigval=True)
    hf = randomise(olmo.OlmoHybridGatedDeltaNet(cfg, layer_idx=0)).eval()
    ours = loom_gdn(beta="sigmoid2", norm_eps=1e-5)  # OLMo-hybrid's gated norm: eps 1e-5
    from loom.trainer.hf.families import OlmoHybrid

    load_through_adapter(OlmoHybrid(), hf, ours)
    compare(hf, ours)


@pytest.mark.parametrize("T", [1, 100])
def test_op_matches_transformers_chunk_gated_delta_rule(T):
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, T, HK, K, generator=gen), torch.randn(2, T, HK, K, generator=gen)
    v = torch.randn(2, T, HV, V, generator=gen)
    g = -torch.rand(2, T, HV, generator=gen)
    beta = torch.rand(2, T, HV, generator=gen)
    S0 = torch.randn(2, HV, K, V, generator=gen)
    want, S_want = qwen3_next.torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                                           use_qk_l2norm_in_kernel=True)
    got, S = gated_delta_rule(q, k, v, g, beta, initial_state=S0, use_qk_l2norm=True, return_state=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_want, rtol=1e-4, atol=1e-5)
