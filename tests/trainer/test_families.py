"""`loom convert hf` / `loom convert to-hf` for the attention families: Qwen3, Mistral,
Gemma 3 (Gemma3ForCausalLM and the text tower of Gemma3ForConditionalGeneration), OLMo 3,
Llama with attention and MLP biases, and Qwen2 with sliding-window layers.

Each case is a tiny random transformers model built from its config class (never
downloaded) with every weight perturbed away from its initial value (norm weights by
0.3, so a swapped, misplaced or zero-centred-vs-plain norm, a dropped bias or a wrong
scale shows), saved with save_pretrained, then:
- the converted HybridLM's fp32 logits equal transformers' within 1e-5 at 37 tokens
  (no window, chunk or block divides it; windows of 4-8 tokens are crossed many times);
- greedy generation of 32 tokens with Loom's decoding state (KV caches, sliding-window
  ring buffers) equals transformers' generate token for token;
- `loom convert to-hf --target auto` picks the family's class back, plain transformers
  loads it with logits equal to the source's, and importing that folder again gives the
  same model.yaml and the same tensors (import -> export -> import is the identity).
The sweep covers GQA / MQA / MHA, tied and untied heads, head_dim != hidden / heads,
sliding windows on some, all or no layers (layer_types patterns, Qwen3's
max_window_layers, Mistral's null window), RoPE default / linear / yarn / llama3 and
per layer type, attention_bias, Gemma's query_pre_attn_scalar and GeGLU, and
final_logit_softcapping, and attn_logit_softcapping (ignored by transformers'
Gemma3Attention, hence by the import).
Also: transformers-4 style configs resolve as the config classes resolve them, and
what Loom cannot express is refused in one line naming the field.
Cost: about 1 s per case on one core (tiny models; transformers import ~5 s once).
"""
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from loom.models import HybridLM  # noqa: E402
from loom.trainer.checkpoint.manager import CheckpointManager  # noqa: E402
from loom.trainer.hf.convert import ConvertError, convert_hf, load_converted, model_config_from_hf  # noqa: E402
from loom.trainer.hf.export import export_hf  # noqa: E402
from loom.trainer.hf.families import FAMILIES  # noqa: E402

V, T = 128, 37
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LIN = {"rope_type": "linear", "factor": 2.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0}
FULL, SLIDING = "full_attention", "sliding_attention"

# name -> (config class, model class, config overrides, expected export target)
CASES = {
    "qwen3-gqa-untied-bias-window": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=24, use_sliding_window=True, sliding_window=7, max_window_layers=2, attention_bias=True,
        tie_word_embeddings=False), "qwen3"),
    "qwen3-mqa-tied-layer_types-linear": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
        layer_types=[SLIDING, FULL] * 3, rope_parameters={**LIN, "rope_theta": 5000.0}), "qwen3"),
    "qwen3-mha-yarn-full": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=4, head_dim=16, rope_parameters={**YARN, "rope_theta": 10000.0}), "qwen3"),
    "mistral-gqa-window-headdim": ("MistralConfig", "MistralForCausalLM", dict(
        head_dim=24, sliding_window=7), "mistral"),
    "mistral-tied-nowindow-llama3": ("MistralConfig", "MistralForCausalLM", dict(
        sliding_window=None, tie_word_embeddings=True, rope_parameters={**LLAMA3, "rope_theta": 10000.0}),
        "llama"),  # no window and the Llama layout: LlamaForCausalLM is the first class that fits
    "olmo3-3to1-rope-per-type": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_hidden_layers=8, sliding_window=6, rope_parameters={
            FULL: {**LIN, "rope_theta": 50000.0}, SLIDING: {"rope_type": "default", "rope_theta": 300.0}}), "olmo3"),
    "olmo3-mqa-bias-tied-pattern": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True, sliding_window=4,
        layer_types=[FULL, SLIDING, SLIDING, FULL, SLIDING, FULL],
        rope_parameters={FULL: {**YARN, "rope_theta": 10000.0}, SLIDING: {"rope_type": "default",
                                                                          "rope_theta": 10000.0}}), "olmo3"),
    "gemma3-5to1-headdim-qpas": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=24, sliding_window=7, query_pre_attn_scalar=20, rope_parameters={
            FULL: {**LIN, "rope_theta": 10000.0}, SLIDING: {"rope_type": "default", "rope_theta": 100.0}}),
        "gemma3"),
    "gemma3-untied-bias-mqa-softcap-yarn": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False, sliding_window=5,
        query_pre_attn_scalar=16, attn_logit_softcapping=50.0, layer_types=[SLIDING, SLIDING, FULL] * 2,
        rope_parameters={FULL: {**YARN, "rope_theta": 20000.0}, SLIDING: {"rope_type": "default",
                                                                          "rope_theta": 1000.0}}), "gemma3"),
    "gemma3-all-sliding-logit-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8, layer_types=[SLIDING] * 3,
        final_logit_softcapping=0.5), "gemma3"),  # |logits| ~ 1: a cap of 0.5 bends them
    "llama-attention-mlp-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True,
                                                                          head_dim=24), "llama"),
    "qwen2-max_window_layers": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=6, max_window_layers=2), "qwen2"),
    "qwen2-layer_types-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=4, tie_word_embeddings=True, num_key_value_heads=1,
        layer_types=[FULL, SLIDING] * 3), "qwen2"),
}


def perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return model.eval()


def hf_model(case: str):
    cfg_cls, model_cls, overrides, _ = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**BASE, **overrides})
    torch.manual_seed(0)
    return perturbed(getattr(transformers, model_cls)(config))


def loom_model(folder) -> HybridLM:
    cfg, state = load_converted(folder)
    model = HybridLM(cfg)
    model.load_state_dict(state)
    return model.eval()


def check_logits_and_generation(hf, loom, ids):
    with torch.no_grad():
        ref = hf(ids).logits
        got = loom.logits(loom(ids).hidden)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
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
    assert target == CASES[case][3]
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "auto_map" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    convert_hf(tmp_path / "back", tmp_path / "again")
    first, again = (yaml.safe_load((tmp_path / f / "model.yaml").read_text()) for f in ("loom", "again"))
    assert first == again
    state, state2 = load_converted(tmp_path / "loom")[1], load_converted(tmp_path / "again")[1]
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_gemma3_conditional_generation_imports_its_text_tower(tmp_path, capsys):
    text = transformers.Gemma3TextConfig(**{**BASE, **CASES["gemma3-5to1-headdim-qpas"][2]})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3,
                                       eoi_token_index=V - 2)
    torch.manual_seed(0)
    hf = perturbed(transformers.Gemma3ForConditionalGeneration(config))
    hf.save_pretrained(tmp_path / "hf")
    from loom.trainer.hf.convert import main_convert

    assert main_convert([str(tmp_path / "hf"), str(tmp_path / "loom")]) == 0
    assert "language model" in capsys.readouterr().out
    assert "vision tower" in (tmp_path / "loom" / "model.yaml").read_text()
    ids = torch.randint(0, V - 4, (2, T), generator=torch.Generator().manual_seed(3))  # no image tokens
    check_logits_and_generation(hf, loom_model(tmp_path / "loom"), ids)
    _, target = export_hf(tmp_path / "loom", tmp_path / "back")  # the text model as Gemma3ForCausalLM
    assert target == "gemma3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


# ----- config.json as the config classes resolve it -----

LEGACY = {  # transformers-4 style keys (rope_theta, rope_scaling, rope_local_base_freq, no layer_types)
    "olmo3": ("Olmo3Config", dict(rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                  sliding_window=9)),
    "gemma3_text": ("Gemma3TextConfig", dict(rope_theta=1000.0, rope_local_base_freq=50.0, sliding_window=9,
                                             rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen3": ("Qwen3Config", dict(rope_theta=1000.0, use_sliding_window=True, sliding_window=9,
                                  max_window_layers=4)),
    "qwen3-no-window": ("Qwen3Config", dict(use_sliding_window=False, sliding_window=9, max_window_layers=1)),
    "mistral": ("MistralConfig", dict(rope_theta=1000.0)),  # sliding_window absent: the class's 4096
}


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_config_resolves_as_the_config_class(name):
    cls, keys = LEGACY[name]
    model_type = {"Olmo3Config": "olmo3", "Gemma3TextConfig": "gemma3_text", "Qwen3Config": "qwen3",
                  "MistralConfig": "mistral"}[cls]
    raw = {"model_type": model_type, **BASE, "num_hidden_layers": 8, **keys}
    ref = getattr(transformers, cls)(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg = model_config_from_hf(raw).resolved()
    window = getattr(ref, "sliding_window", None)
    types = getattr(ref, "layer_types", None) or [SLIDING if window is not None else FULL] * 8
    assert cfg.layer_kinds() == ["swa" if t == SLIDING else "attn" for t in types]
    if "swa" in cfg.layer_kinds():
        assert cfg.mixers["swa"]["window"] == window - 1
    per_type = ref.rope_parameters if FULL in ref.rope_parameters else {FULL: ref.rope_parameters,
                                                                        SLIDING: ref.rope_parameters}
    assert cfg.rope.base == per_type[FULL]["rope_theta"]
    swa_rope = cfg.mixers.get("swa", {}).get("rope_config")
    if swa_rope is not None:
        assert swa_rope["base"] == per_type[SLIDING]["rope_theta"]
    elif "swa" in cfg.layer_kinds():
        assert per_type[SLIDING]["rope_theta"] == per_type[FULL]["rope_theta"]


@pytest.mark.parametrize("model_type,overrides,match", [
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"hidden_activation": "relu"}, "hidden_activation"),
    ("qwen3", {"layer_types": [SLIDING] * 6}, "sliding_window is null"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("olmo3", {"layer_types": [FULL, "chunked_attention"] * 3}, r"layer_types\[1\]"),
    ("olmo3", {"layer_types": [FULL] * 5}, "layer_types has 5 entries"),
    ("olmo3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "per layer type"),
    ("mistral", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ("mistral", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("mistral", {"architectures": ["MistralForSequenceClassification"]}, "MistralForSequenceClassification"),
])
def test_inexpressible_configs_are_refused_in_one_line(model_type, overrides, match):
    with pytest.raises(ConvertError, match=match) as e:
        model_config_from_hf({"model_type": model_type, **BASE, **overrides})
    assert "\n" not in str(e.value)


def test_export_target_refuses_what_the_class_cannot_express(tmp_path):
    hf = hf_model("qwen3-gqa-untied-bias-window")
    hf.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "loom")
    for target, match in [("gemma3", "norm_placement"), ("olmo3", "norm_placement"), ("mistral", "attn and swa"),
                          ("llama", "layer 2 is 'swa'")]:
        with pytest.raises(ConvertError, match=match):
            export_hf(tmp_path / "loom", tmp_path / f"out-{target}", target)


def test_every_family_is_registered():
    assert {f.architecture for f in FAMILIES.values()} == {
        "Qwen3ForCausalLM", "MistralForCausalLM", "Olmo3ForCausalLM", "Gemma3ForCausalLM", "Qwen3_5ForCausalLM",
        "OlmoHybridForCausalLM", "NemotronHForCausalLM", "BambaForCausalLM"}  # hybrids: test_hybrid_families.py


# ----- trained Loom models with a family's layout leave natively -----

LOOM_LAYOUTS = {  # name -> (model section, expected target)
    "gemma3": ({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 24, "layers": [["swa", "swa", "attn"], "x2"],
                "norm_placement": "sandwich", "norm_zero_centred": True, "mlp_kind": "geglu", "embed_scale": 8.0,
                "norm_eps": 1e-6, "rope": {"base": 1e5, "scaling": "linear", "factor": 2.0},
                "mixers": {"swa": {"window": 6, "qk_norm": True, "scale": 0.25, "rope_config": {"base": 100.0}},
                           "attn": {"qk_norm": True, "scale": 0.25}}}, "gemma3"),
    "olmo3": ({"d_model": 64, "n_heads": 4, "layers": [["swa", "swa", "swa", "attn"], "x2"], "norm_placement": "post",
               "norm_weight_fp32": True, "tie_embeddings": False,
               "mixers": {"swa": {"window": 4, "qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": 1e-5},
                          "attn": {"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": 1e-5}}}, "olmo3"),
    "qwen3": ({"d_model": 64, "n_heads": 4, "n_kv_heads": 1, "layers": ["swa", "attn", "swa"], "norm_eps": 1e-6,
               "mixers": {"swa": {"window": 9, "qk_norm": True}, "attn": {"qk_norm": True}}}, "qwen3"),
    "mistral": ({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "layers": ["swa", "x3"],
                 "mixers": {"swa": {"window": 5}}}, "mistral"),
}


@pytest.mark.parametrize("name", list(LOOM_LAYOUTS))
def test_trained_family_layout_exports_natively(tmp_path, make_run, name):
    model, target = LOOM_LAYOUTS[name]
    net = make_run(tmp_path / "run", model)
    if model.get("norm_zero_centred"):  # make_run draws norm weights near 1: stored as w, near 0 here
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "norm" in n:
                    p.sub_(1.0)
        CheckpointManager(tmp_path / "run").save(6, net.state_dict(), {}, {"loss": 1.0})
    _, chosen = export_hf(tmp_path / "run", tmp_path / "out")
    assert chosen == target
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == FAMILIES[json.loads((tmp_path / "out" / "config.json").read_text())
                                         ["model_type"]].architecture
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(4))
    check_logits_and_generation(hf, net, ids)


@pytest.mark.parametrize("case", ["gemma3-5to1-headdim-qpas", "olmo3-3to1-rope-per-type"])
def test_bf16_follows_transformers_rounding(tmp_path, case):
    """In bf16 Loom's error against transformers' fp32 logits is no larger than transformers'
    own bf16 error (plus a little): the norms round where the family's norms round, the
    embedding scale is rounded to bf16 first, as transformers does (STYLE 6: a baseline's
    own error sets the tolerance)."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "loom")
    loom = loom_model(tmp_path / "loom").bfloat16()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
        hf_err = (hf.bfloat16()(ids).logits.float() - ref).abs()
        loom_err = (loom.logits(loom(ids).hidden) - ref).abs()
    assert loom_err.mean() <= 1.5 * hf_err.mean() + 1e-3 and loom_err.max() <= 2 * hf_err.max() + 1e-2
