"""`loom convert hf` / `loom convert to-hf` for the hybrid families: Qwen3.5 (the text
model, and the text tower of Qwen3_5ForConditionalGeneration), OLMo-hybrid, Nemotron-H
(dense layers) and Bamba.

As tests/trainer/test_families.py: each case is a tiny random transformers model built
from its config class, every weight perturbed away from its initial value (norm weights
by 0.3, so a zero-centred-vs-plain norm, a misplaced norm or a dropped bias shows), then
- fp32 logits equal transformers' within 1e-5 at 77 tokens (no GDN / SSD chunk divides
  it: Loom's 64-token chunks and transformers' chunks are both crossed);
- greedy generation of 32 tokens with Loom's decoding state (GDN / SSM states, conv
  caches, KV caches) equals transformers' generate;
- `loom convert to-hf --target auto` picks the family's class, plain transformers loads
  it with equal logits, and importing it again gives the same model.yaml and tensors.
The sweep covers layer patterns, GQA / MQA, GDN key/value head ratios and head dims,
Mamba-2 n_groups / heads / state / conv taps / biases / dt limits, tied and untied heads,
head_dim, partial rotary and RoPE scaling, NoPE, OLMo-hybrid's beta in (0, 2) or (0, 1).
Refusals are one line naming the field (Nemotron-H's moe layers name the layer).
Cost: ~1-2 s per case on one core.
"""
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from loom.models import HybridLM  # noqa: E402
from loom.trainer.hf.convert import ConvertError, convert_hf, load_converted, model_config_from_hf  # noqa: E402
from loom.trainer.hf.export import export_hf  # noqa: E402

V, T = 128, 77
LIN, FULL = "linear_attention", "full_attention"
QWEN = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, max_position_embeddings=256)
OLMO = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=12, max_position_embeddings=256, pad_token_id=0)
NEMO = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
            chunk_size=16, max_position_embeddings=256)
BAMBA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
             mamba_chunk_size=16, attn_layer_indices=[1, 3], max_position_embeddings=256)

# name -> (config class, model class, base, overrides, expected export target)
CASES = {
    "qwen3_5-interval-gqa": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN, dict(), "qwen3_5"),
    "qwen3_5-mrope-sections": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN, dict(  # text positions: one M-RoPE
        num_hidden_layers=2, layer_types=[FULL, LIN], rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}), "qwen3_5"),
    "qwen3_5-mqa-tied-bias-headdim-linear-rope": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN, dict(
        num_hidden_layers=5, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, attention_bias=True,
        layer_types=[FULL, LIN, LIN, FULL, LIN], linear_num_value_heads=2, linear_key_head_dim=12,
        linear_conv_kernel_dim=3, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0,
                                                   "partial_rotary_factor": 0.5}), "qwen3_5"),
    "qwen3_5-mha-yarn-full-rotary": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN, dict(
        num_key_value_heads=4, layer_types=[LIN, FULL, LIN, FULL], linear_num_key_heads=1,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 10000.0, "partial_rotary_factor": 1.0}), "qwen3_5"),
    "olmo_hybrid-rope-negeig": ("OlmoHybridConfig", "OlmoHybridForCausalLM", OLMO, dict(), "olmo_hybrid"),
    "olmo_hybrid-nope-sigmoid-bias-tied-mqa": ("OlmoHybridConfig", "OlmoHybridForCausalLM", OLMO, dict(
        num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True, linear_allow_neg_eigval=False,
        layer_types=[LIN, FULL, LIN, FULL], linear_num_key_heads=4, linear_conv_kernel_dim=3,
        rope_parameters={"rope_type": "default", "rope_theta": None}), "olmo_hybrid"),
    "olmo_hybrid-yarn-headdim-vsmall": ("OlmoHybridConfig", "OlmoHybridForCausalLM", OLMO, dict(
        num_hidden_layers=3, head_dim=24, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=8, linear_conv_kernel_dim=2, layer_types=[FULL, LIN, LIN],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 20000.0}), "olmo_hybrid"),
    "nemotron_h-mixed-groups": ("NemotronHConfig", "NemotronHForCausalLM", NEMO, dict(
        layers_block_type=[LIN, FULL, "mlp", LIN, "mlp", FULL]), "nemotron_h"),
    "nemotron_h-bias-tied-mqa-limit": ("NemotronHConfig", "NemotronHForCausalLM", NEMO, dict(
        layers_block_type=[LIN, "mlp", FULL, "mlp", LIN, LIN], num_key_value_heads=1, head_dim=24, n_groups=1,
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=12, conv_kernel=3, use_bias=True,
        use_conv_bias=False, mlp_bias=True, tie_word_embeddings=True, time_step_limit=(0.05, 0.8),
        layer_norm_epsilon=1e-6), "nemotron_h"),  # tie_word_embeddings is ignored by NemotronHForCausalLM
    "bamba-groups-gqa": ("BambaConfig", "BambaForCausalLM", BAMBA, dict(), "bamba"),
    "bamba-bias-tied-mqa-linear-limit": ("BambaConfig", "BambaForCausalLM", BAMBA, dict(
        num_hidden_layers=5, attn_layer_indices=[0, 3], num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        mamba_proj_bias=True, mamba_conv_bias=False, mamba_n_groups=1, mamba_n_heads=4, mamba_d_conv=3,
        tie_word_embeddings=True, time_step_limit=(0.05, 0.8),
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}), "bamba"),
    "bamba-headdim-auto-dhead": ("BambaConfig", "BambaForCausalLM", BAMBA, dict(
        head_dim=24, mamba_n_heads=4, mamba_expand=1, mamba_d_state=16, attn_layer_indices=[2]), "bamba"),
}


def perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return model.eval()


def hf_model(case: str):
    cfg_cls, model_cls, base, overrides, _ = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**base, **overrides})
    torch.manual_seed(0)
    return perturbed(getattr(transformers, model_cls)(config))


def loom_model(folder) -> HybridLM:
    cfg, state = load_converted(folder)
    model = HybridLM(cfg)
    model.load_state_dict(state)
    return model.eval()


def tolerance(hf, ids, ref) -> float:
    """1e-5, or 1.5x transformers' own fp32 error (against its fp64 forward) where that is
    larger: the GDN chunk recurrences with beta up to 2 reach ~1.3e-5 in fp32 (STYLE 6: a
    baseline's own error sets the tolerance)."""
    with torch.no_grad():
        own = (ref.double() - hf.double()(ids).logits).abs().max().item()
    hf.float()
    return max(1e-5, 1.5 * own)


def check_logits_and_generation(hf, loom, ids):
    with torch.no_grad():
        ref = hf(ids).logits
        got = loom.logits(loom(ids).hidden)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=0, atol=tolerance(hf, ids, ref))
    hf.generation_config.eos_token_id = None  # 32 tokens whatever they are
    hf.generation_config.pad_token_id = 0
    prompt = ids[:1, :10]
    expect = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(loom.generate(prompt, 32), expect)


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_exports_back(tmp_path, case):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "loom")
    loom = loom_model(tmp_path / "loom")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    check_logits_and_generation(hf, loom, ids)

    _, target = export_hf(tmp_path / "loom", tmp_path / "back")
    assert target == CASES[case][4]
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "auto_map" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == CASES[case][1]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    convert_hf(tmp_path / "back", tmp_path / "again")
    first, again = (yaml.safe_load((tmp_path / f / "model.yaml").read_text()) for f in ("loom", "again"))
    assert first == again
    state, state2 = load_converted(tmp_path / "loom")[1], load_converted(tmp_path / "again")[1]
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_qwen3_5_conditional_generation_imports_its_text_tower(tmp_path, capsys):
    text = transformers.Qwen3_5TextConfig(**QWEN)
    vision = transformers.models.qwen3_5.configuration_qwen3_5.Qwen3_5VisionConfig(
        depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
        temporal_patch_size=1, spatial_merge_size=1)
    config = transformers.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
                                        vision_end_token_id=V - 4)
    torch.manual_seed(0)
    hf = perturbed(transformers.Qwen3_5ForConditionalGeneration(config))
    hf.save_pretrained(tmp_path / "hf")
    from loom.trainer.hf.convert import main_convert

    assert main_convert([str(tmp_path / "hf"), str(tmp_path / "loom")]) == 0
    assert "language model" in capsys.readouterr().out
    ids = torch.randint(0, V - 4, (2, T), generator=torch.Generator().manual_seed(3))  # no image tokens
    loom = loom_model(tmp_path / "loom")
    with torch.no_grad():
        torch.testing.assert_close(loom.logits(loom(ids).hidden), hf(ids).logits, rtol=0, atol=1e-5)
    _, target = export_hf(tmp_path / "loom", tmp_path / "back")
    assert target == "qwen3_5"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "Qwen3_5ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_nemotron_h_legacy_pattern_resolves_as_the_config_class():
    raw = {"model_type": "nemotron_h", **NEMO, "hybrid_override_pattern": "M*-M"}
    ref = transformers.NemotronHConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    kinds = {LIN: "mamba2", FULL: "attn", "mlp": "mlp"}
    assert model_config_from_hf(raw).layer_kinds() == [kinds[t] for t in ref.layers_block_type]
    legacy = {"model_type": "nemotron_h", **NEMO, "layers_block_type": ["mamba", "attention", "mlp"]}
    assert model_config_from_hf(legacy).layer_kinds() == ["mamba2", "attn", "mlp"]


@pytest.mark.parametrize("model_type,base,overrides,match", [
    ("nemotron_h", NEMO, {"layers_block_type": [LIN, FULL, "moe", "mlp"]}, r"layers_block_type\[2\] is 'moe' \(layer 2\)"),
    ("nemotron_h", NEMO, {"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    ("nemotron_h", NEMO, {"mamba_hidden_act": "gelu"}, "mamba_hidden_act"),
    ("qwen3_5_text", QWEN, {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3_5_text", QWEN, {"layer_types": [LIN, "sliding_attention", LIN, FULL]}, r"layer_types\[1\]"),
    ("qwen3_5_text", QWEN, {"linear_num_key_heads": 3}, "linear_num_value_heads"),
    ("qwen3_5_text", QWEN, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "'dynamic'"),
    ("olmo_hybrid", OLMO, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("olmo_hybrid", OLMO, {"layer_types": [LIN, FULL]}, "layer_types has 2 entries"),
    ("bamba", BAMBA, {"mamba_d_head": 5}, "mamba_d_head"),
    ("bamba", BAMBA, {"mamba_n_groups": 3}, "mamba_n_groups"),
    ("nemotron_h", NEMO, {"n_groups": 3, "layers_block_type": [LIN, FULL]}, "n_groups"),
    ("nemotron_h", NEMO, {"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern"),
    ("bamba", BAMBA, {"hidden_act": "gelu"}, "hidden_act"),
    ("bamba", BAMBA, {"attn_layer_indices": [7]}, "attn_layer_indices"),
    ("bamba", BAMBA, {"architectures": ["BambaForSequenceClassification"]}, "BambaForSequenceClassification"),
])
def test_inexpressible_configs_are_refused_in_one_line(model_type, base, overrides, match):
    from loom.trainer.hf.convert import check_architecture

    with pytest.raises(ConvertError, match=match) as e:
        hf = {"model_type": model_type, **base, **overrides}
        check_architecture(hf)
        model_config_from_hf(hf)
    assert "\n" not in str(e.value)


def test_export_target_refuses_what_the_class_cannot_express(tmp_path):
    hf = hf_model("qwen3_5-interval-gqa")
    hf.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "loom")
    for target, match in [("olmo_hybrid", "norm_zero_centred|norm placement|mixers"),
                          ("nemotron_h", "layer 0 is 'gdn'"), ("bamba", "layer 0 is 'gdn'"),
                          ("llama", "layer 0 is 'gdn'")]:
        with pytest.raises(ConvertError, match=match) as e:
            export_hf(tmp_path / "loom", tmp_path / f"out-{target}", target)
        assert "\n" not in str(e.value)


# ----- trained Loom models with a family's layout leave natively -----

LOOM_LAYOUTS = {  # name -> (model section, expected target)
    "qwen3_5": ({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "layers": [["gdn", "gdn", "gdn", "attn"]],
                 "norm_zero_centred": True, "norm_eps": 1e-6, "tie_embeddings": False,
                 "mixers": {"attn": {"gate": "elementwise", "gate_packing": "head", "qk_norm": True,
                                     "rope_fraction": 0.25},
                            "gdn": {"n_v_heads": 4, "n_k_heads": 2, "head_k_dim": 16, "head_v_dim": 16}}}, "qwen3_5"),
    "olmo_hybrid": ({"d_model": 64, "n_heads": 4, "layers": [["gdn", "gdn", "gdn", "attn"]], "norm_placement": "post",
                     "norm_placements": {"gdn": "pre"}, "norm_weight_fp32": True, "tie_embeddings": False,
                     "mixers": {"attn": {"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": 1e-5},
                                "gdn": {"beta": "sigmoid2", "norm_eps": 1e-5, "head_k_dim": 16, "head_v_dim": 32}}},
                    "olmo_hybrid"),
    "nemotron_h": ({"d_model": 64, "n_heads": 4, "layers": ["mamba2", "attn", "mlp", "mamba2", "mlp"],
                    "block_mlp": False, "mlp_kind": "relu2", "norm_weight_fp32": True, "tie_embeddings": False,
                    "mixers": {"attn": {"rope": False}, "mamba2": {"d_state": 16, "head_dim": 16, "n_groups": 2,
                                                                   "chunk": 16}}}, "nemotron_h"),
    "bamba": ({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "layers": ["mamba2", "attn", "mamba2", "attn"],
               "mixers": {"attn": {"rope_fraction": 0.5}, "mamba2": {"d_state": 16, "head_dim": 16, "chunk": 16}}},
              "bamba"),
}


@pytest.mark.parametrize("name", list(LOOM_LAYOUTS))
def test_trained_family_layout_exports_natively(tmp_path, make_run, name):
    from loom.trainer.checkpoint.manager import CheckpointManager

    model, target = LOOM_LAYOUTS[name]
    net = make_run(tmp_path / "run", model, std=0.05)
    if model.get("norm_zero_centred"):  # make_run draws norm weights near 1: stored as w, near 0 here
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "norm" in n and "mixer.norm." not in n:  # the gdn's gated norm is plain
                    p.sub_(1.0)
        CheckpointManager(tmp_path / "run").save(6, net.state_dict(), {}, {"loss": 1.0})
    _, chosen = export_hf(tmp_path / "run", tmp_path / "out")
    assert chosen == target
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == CASES[next(c for c in CASES if c.startswith(target))][1]
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(4))
    check_logits_and_generation(hf, net, ids)
