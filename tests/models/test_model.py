"""HybridLM assembly: layer expansion, accounting, chunked loss, init, RoPE scalings."""
import math

import pytest
import torch
import torch.nn.functional as F

from loom.models import ConfigError, HybridLM, ModelConfig, expand_layers
from loom.models.rope import RopeConfig, Rotary


def test_expand_layers():
    assert expand_layers([["rat", "swa"], "x3"]) == ["rat", "swa"] * 3
    assert expand_layers(["attn", "x2", "rat"]) == ["attn", "attn", "rat"]
    with pytest.raises(ConfigError):
        expand_layers(["x2"])


def test_unknown_kind_and_option_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'attn'"):
        ModelConfig(layers=["atn"]).resolved()
    with pytest.raises(ConfigError, match="model.mixers.attn.qkv_bais"):
        ModelConfig(mixers={"attn": {"qkv_bais": True}}).resolved()


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=96, d_model=32, n_heads=2, layers=["attn"]))
    h = torch.randn(2, 50, 32, requires_grad=True)
    y = torch.randint(0, 96, (2, 50))
    y[0, :3] = -100
    chunked = model.loss(h, y, chunk=7)
    full = F.cross_entropy(F.linear(h, model.head_weight).flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(chunked, full)
    g1, = torch.autograd.grad(chunked, h)
    g2, = torch.autograd.grad(full, h)
    torch.testing.assert_close(g1, g2)


def test_accounting():
    cfg = ModelConfig(vocab_size=128, d_model=64, n_heads=4, layers=["attn", "x2"])
    model = HybridLM(cfg)
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters())
    # 6N for matmul weights (tied head counted once as a matmul) + attention term.
    flops = model.flops_per_token(256)
    assert flops > 6 * model.num_params(non_embedding=True)
    assert model.state_bytes(100)["0:attn"] == 2 * 100 * 4 * 16 * 2


def test_init_scales_output_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=256, n_heads=4, layers=["attn", "x8"], init_std=0.02)
    model = HybridLM(cfg)
    o = model.blocks[0].mixer.o_proj.weight.std().item()
    q = model.blocks[0].mixer.q_proj.weight.std().item()
    assert abs(q - 0.02) < 0.002
    assert abs(o - 0.02 / math.sqrt(16)) < 0.001


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn", "llama3"])
def test_rope_scalings_are_rotations_and_identity_at_zero(scaling):
    """cos/sin are a rotation scaled by the attention temperature (cos^2 + sin^2 = mscale^2) and the
    identity at position 0; each scaling's frequencies are checked against their closed form and
    transformers in tests/models/reference/test_rope.py."""
    rope = Rotary(32, RopeConfig(scaling=scaling, factor=4.0, original_max_len=64))
    cos, sin = rope(torch.arange(10)[None])
    mscale = 0.1 * math.log(4.0) + 1.0 if scaling == "yarn" else 1.0
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, mscale ** 2))
    torch.testing.assert_close(sin[0, 0], torch.zeros(32))
    torch.testing.assert_close(cos[0, 0], torch.full((32,), mscale))


def test_linear_scaling_is_position_interpolation():
    a = Rotary(16, RopeConfig(scaling="linear", factor=2.0))
    b = Rotary(16, RopeConfig())
    pos = torch.arange(0, 20, 2)[None]
    torch.testing.assert_close(a(pos)[0], b(pos // 2)[0])


@pytest.mark.parametrize("layers", [["attn"], ["swa"], ["s2"], ["rat"], ["linear"], ["memory"]])
def test_packed_positions_alone_separate_documents(layers):
    """position_ids with resets and no seq_ids: each document sees only itself,
    exactly as when the documents run one by one."""
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=layers,
                                 mixers={"swa": {"window": 6}, "s2": {"block": 4, "local_blocks": 1,
                                                                       "vert_stride": 2},
                                         "rat": {"chunk": 4}, "memory": {"chunk_size": 4}})).double()
    ids = torch.randint(0, 64, (1, 21))
    lengths = [7, 9, 5]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=pos).hidden
    pieces = [model(piece).hidden for piece in ids.split(lengths, dim=1)]
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), rtol=1e-10, atol=1e-10)
