"""Llama / Qwen2 parity: a checkpoint converted by `loom convert hf` computes the
same logits in HybridLM as in transformers (fp32, max abs diff < 1e-5).

Tiny random models (2 layers, width 64, 4 heads, 2 KV heads, vocab 128) are
built with transformers, saved with save_pretrained, converted and compared on
random tokens; no download. Also checks that HybridLM's RoPE tables equal
transformers' at long positions for real model configurations. Cost: ~10 s
on one CPU core, most of it importing transformers.
"""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.models import HybridLM  # noqa: E402
from loom.models.rope import Rotary  # noqa: E402
from loom.trainer.hf.convert import convert_hf, load_converted, model_config_from_hf  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256)
# Scaled cases use a pretrained length below the test length (T = 80), so the
# interpolated and blended frequency bands are all exercised.
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}
CASES = [("llama", False, "default"), ("llama", True, "default"), ("llama", False, "linear"),
         ("llama", True, "llama3"), ("llama", False, "yarn"), ("qwen2", False, "default"),
         ("qwen2", True, "yarn")]


def tiny_hf_model(family: str, tie: bool, rope: str):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    extra = {"rope_parameters": dict(ROPE[rope])} if ROPE[rope] else {}
    model = cls[1](cls[0](**TINY, tie_word_embeddings=tie, **extra)).eval()
    # transformers initialises norms to 1 and biases to 0, which would hide a
    # swapped norm or a dropped bias; std 0.1 (not 0.02) makes attention far
    # from uniform, so a RoPE error changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def convert_and_load(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    cfg, state = load_converted(convert_hf(tmp_path / "hf", tmp_path / "loom"))
    loom = HybridLM(cfg).eval()
    loom.load_state_dict(state)  # strict: every name maps, nothing is left over
    return loom


@pytest.mark.parametrize("family,tie,rope", CASES, ids=[f"{f}-{'tied' if t else 'untied'}-{r}" for f, t, r in CASES])
def test_logits_match_transformers(family, tie, rope, tmp_path):
    hf = tiny_hf_model(family, tie, rope)
    loom = convert_and_load(hf, tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 80))
    with torch.no_grad():
        want = hf(ids).logits
        got = loom.logits(loom(ids).hidden)
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff:.2e} (logits up to {want.abs().max():.2f})"


def test_wrong_rope_is_detected(tmp_path):
    """Negative control: the parity test is sensitive to the RoPE scaling."""
    hf = tiny_hf_model("llama", False, "llama3")
    loom = convert_and_load(hf, tmp_path)
    plain = HybridLM(dataclasses.replace(loom.cfg, rope=dataclasses.replace(loom.cfg.rope, scaling="none"))).eval()
    plain.load_state_dict(loom.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (1, 80))
    with torch.no_grad():
        diff = (plain.logits(plain(ids).hidden) - hf(ids).logits).abs().max().item()
    assert diff > 1e-2


REAL_ROPE = {  # head_dim 128, as in the released models
    "llama-3.1-8b": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    "qwen2.5-7b-yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                        "rope_theta": 1000000.0},
    "linear-x4": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama-2": {"rope_type": "default", "rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", list(REAL_ROPE))
def test_rope_tables_equal_at_long_positions(name):
    """cos/sin are bit-identical up to position 131071, where a 1-ulp
    difference in a frequency would show as a phase error of ~1e-3."""
    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                                      rope_parameters=dict(REAL_ROPE[name]))
    cfg = model_config_from_hf(json.loads(config.to_json_string()))
    pos = torch.tensor([[0, 1, 4095, 8192, 32767, 65536, 131071]])
    x = torch.zeros(1, pos.shape[1], cfg.head_dim)
    want_cos, want_sin = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)(x, pos)
    got_cos, got_sin = Rotary(cfg.head_dim, cfg.rope)(pos)
    assert torch.equal(got_cos, want_cos) and torch.equal(got_sin, want_sin)


def test_next_to_hugging_face_kernels(tmp_path):
    """Loom installs as `loom.*` only, so Hugging Face's `kernels` package (which
    transformers >= 5.25 imports) is importable next to it, and the Llama parity
    holds in that environment. Both are dev dependencies, installed by `make test`."""
    import importlib

    import loom.kernels

    kernels = importlib.import_module("kernels")  # Hugging Face's kernel hub, not Loom's loom.kernels

    assert hasattr(kernels, "get_kernel") and "site-packages" in kernels.__file__, kernels.__file__
    assert loom.kernels.__file__ != kernels.__file__
    test_logits_match_transformers("llama", False, "default", tmp_path)
