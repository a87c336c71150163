"""Every RoPE scaling of models/rope.py against its closed form (conftest.rope_inv_freq,
written from the papers) and against transformers' ROPE_INIT_FUNCTIONS where it has
the scaling; the rotation itself against rotate-half at the position; partial rotary."""
import math

import pytest
import torch
from _refs import rope_inv_freq, rope_vec

from loom.models.rope import RopeConfig, Rotary, apply_rotary

SCALINGS = {
    "none": RopeConfig(base=10000.0),
    "linear": RopeConfig(base=10000.0, scaling="linear", factor=4.0),
    "ntk": RopeConfig(base=10000.0, scaling="ntk", factor=4.0),
    "yarn": RopeConfig(base=10000.0, scaling="yarn", factor=8.0, original_max_len=256),
    "llama3": RopeConfig(base=500000.0, scaling="llama3", factor=8.0, original_max_len=512,
                         low_freq_factor=1.0, high_freq_factor=4.0),
}


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("R", [16, 64])
def test_inv_freq_closed_form(name, R):
    cfg = SCALINGS[name]
    rot = Rotary(R, cfg)
    want, mscale = rope_inv_freq(R, cfg)
    torch.testing.assert_close(rot.inv_freq.double(), want, rtol=1e-6, atol=0)
    assert rot.mscale == pytest.approx(mscale, rel=1e-12)
    # every scaling but none really changes something at these sizes
    if name != "none":
        plain, _ = rope_inv_freq(R, SCALINGS["none"])
        assert (want - plain).abs().max() > 1e-4 * plain.max()


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_rotation_at_positions(name, fraction):
    """apply_rotary(x, Rotary(pos)) equals the rotate-half rotation at each position, the
    last K - R dims passing; positions past the original length included."""
    cfg, Kh = SCALINGS[name], 32
    pos = torch.tensor([[0, 1, 2, 7, 13, 100, 300, 1000, 5000]])
    x = torch.randn(1, pos.shape[1], 3, Kh, dtype=torch.float64)
    cos, sin = Rotary(Kh, cfg, fraction)(pos)
    got = apply_rotary(x, cos.double(), sin.double())
    for t in range(pos.shape[1]):
        want = rope_vec(x[0, t], int(pos[0, t]), cfg, fraction)
        torch.testing.assert_close(got[0, t], want, rtol=1e-5, atol=1e-5 * max(1, int(pos[0, t]) / 100))
    if fraction < 1:
        R = int(Kh * fraction)
        assert torch.equal(got[..., R:], x[..., R:])


def test_rotation_is_relative():
    """q(m) . k(n) depends on m - n only: the property RoPE is built for."""
    cfg = SCALINGS["yarn"]
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    a = rope_vec(q, 40, cfg) @ rope_vec(k, 33, cfg)
    b = rope_vec(q, 107, cfg) @ rope_vec(k, 100, cfg)
    assert a == pytest.approx(float(b), rel=1e-9)


# ---- transformers ----

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def hf_config(R: int, params: dict, fraction: float = 1.0, max_pos: int = 4096):
    head_dim = int(R / fraction)
    return transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                    max_position_embeddings=max_pos, partial_rotary_factor=fraction,
                                    rope_parameters=dict(params))


HF = {  # name -> (transformers rope_parameters, seq_len passed to the init function)
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, None),
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
              "rope_theta": 10000.0}, None),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512, "rope_theta": 500000.0}, None),
}


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_against_transformers(name, fraction):
    R = 64
    params, _ = HF[name]
    cfg = hf_config(R, params, fraction, max_pos=256 * 8 if name == "yarn" else 4096)
    want, attn_factor = ROPE_INIT_FUNCTIONS[name](cfg, "cpu")
    got = Rotary(int(R / fraction), SCALINGS[name], fraction)
    assert got.inv_freq.shape == want.shape
    torch.testing.assert_close(got.inv_freq, want.float(), rtol=1e-6, atol=0)
    assert got.mscale == pytest.approx(attn_factor, rel=1e-6)


def test_ntk_against_transformers_dynamic():
    """transformers' dynamic NTK at seq_len L' uses base * (s L'/L - (s - 1))^(R/(R-2)); at
    L' = L (2s - 1)/s that is the static NTK-aware base with factor s."""
    R, s, L = 64, 4.0, 1024
    seq_len = int(L * (2 * s - 1) / s)
    cfg = hf_config(R, {"rope_type": "dynamic", "factor": s, "rope_theta": 10000.0}, max_pos=L)
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)
    got = Rotary(R, RopeConfig(base=10000.0, scaling="ntk", factor=s))
    torch.testing.assert_close(got.inv_freq, want.float(), rtol=1e-5, atol=0)
    assert math.isclose(s * seq_len / L - (s - 1), s)


def test_plain_against_transformers_default():
    """Plain RoPE (partial rotary is covered by the scalings above, whose init functions honour
    partial_rotary_factor)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    want = LlamaRotaryEmbedding(hf_config(32, {"rope_type": "default", "rope_theta": 10000.0})).inv_freq
    torch.testing.assert_close(Rotary(32, SCALINGS["none"]).inv_freq, want.float(), rtol=1e-6, atol=0)
