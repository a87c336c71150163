"""`loom convert to-hf --target auto` exports Loom's own hybrid recipes natively.

recipes/gdn-hybrid.yaml becomes a Qwen3_5ForCausalLM and recipes/mamba2-hybrid.yaml a
BambaForCausalLM, through the exact rewrites of trainer/hf/families/transforms.py
(zero-centred norms as w - 1, the block / q-k norms' eps by rescaling, the gate packed
into q_proj, an untied head, NoPE heads widened with zero rotated dims). For each recipe,
with tiny sizes and random weights (conftest make_run: norms near 1, so a missed w - 1
shows), on a run folder as `loom train` leaves it (and a Nemotron-H layout with a tied head,
the plain-rounding norm and a Mamba-2 norm eps of its own: untied copy, rescaled stream):
- auto picks the native class and plain transformers loads the folder (no auto_map,
  no trust_remote_code); fp32 logits equal Loom's within 1e-5 at 77 tokens (no 64-token
  chunk divides it); greedy generation of 24 tokens is identical;
- exactly the style-following norms are shifted (the GDN gated norm is written as is);
- import of the folder gives a model computing the same function, and export -> import ->
  export gives the same tensors;
- every recipe of the two families (350m, 1.3b included) passes the expressibility check,
  and a variant with a real difference is refused in one line naming the field.
Cost: ~10 s on one core.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from loom.models import HybridLM  # noqa: E402
from loom.trainer.cli import main  # noqa: E402
from loom.trainer.config import deep_merge, load_config, read_recipe  # noqa: E402
from loom.trainer.hf.convert import ConvertError, convert_hf, load_converted  # noqa: E402
from loom.trainer.hf.export import export_hf, native_problem  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
T, NEW = 77, 24
TINY = {"d_model": 64, "n_heads": 4}
TINY_OVERRIDES = {  # recipe -> tiny sizes
    "gdn-hybrid": {**TINY, "mixers": {"gdn": {"head_k_dim": 16, "head_v_dim": 16}}},
    "mamba2-hybrid": {**TINY, "mixers": {"mamba2": {"d_state": 16, "head_dim": 16}}},
}


def recipe_model(recipe: str, overrides: dict) -> dict:
    return deep_merge(read_recipe(RECIPES / f"{recipe}.yaml")["model"], overrides)


CASES = {  # name -> (model section, target, transformers class)
    "gdn-hybrid": (recipe_model("gdn-hybrid", TINY_OVERRIDES["gdn-hybrid"]), "qwen3_5", "Qwen3_5ForCausalLM"),
    "mamba2-hybrid": (recipe_model("mamba2-hybrid", TINY_OVERRIDES["mamba2-hybrid"]), "bamba", "BambaForCausalLM"),
    # Nemotron-H's layout with a tied head, the weight multiplied after rounding and a Mamba-2 gated
    # norm eps other than the blocks': untied copy, norm_weight_fp32 and the stream rescaled
    "nemotron_h-layout-tied": ({**TINY, "layers": ["mamba2", "attn", "mlp", "mamba2", "mlp"], "block_mlp": False,
                                "mlp_kind": "relu2", "tie_embeddings": True,
                                "mixers": {"attn": {"rope": False}, "mamba2": {"d_state": 16, "head_dim": 16,
                                                                               "n_groups": 2, "norm_eps": 1e-6}}},
                               "nemotron_h", "NemotronHForCausalLM"),
}


def check_same_function(hf, net, ids):
    with torch.no_grad():
        ref = net.logits(net(ids).hidden)
        got = hf(ids).logits
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    hf.generation_config.eos_token_id = None  # NEW tokens whatever they are
    hf.generation_config.pad_token_id = 0
    prompt = ids[:1, :10]
    assert torch.equal(hf.generate(prompt, max_new_tokens=NEW, do_sample=False), net.generate(prompt, NEW))


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_exports_natively(tmp_path, make_run, case):
    model, target, cls = CASES[case]
    net = make_run(tmp_path / "run", model, std=0.05)
    _, chosen = export_hf(tmp_path / "run", tmp_path / "out")
    assert chosen == target
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == [cls]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == cls
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(4))
    check_same_function(hf, net, ids)

    convert_hf(tmp_path / "out", tmp_path / "loom")  # import: an equivalent Loom model
    cfg, state = load_converted(tmp_path / "loom")
    back = HybridLM(cfg).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(back(ids).hidden), net.logits(net(ids).hidden), rtol=0, atol=1e-5)
    _, again = export_hf(tmp_path / "loom", tmp_path / "out2")
    assert again == target
    first, second = (load_file(tmp_path / f / "model.safetensors") for f in ("out", "out2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_gdn_hybrid_shifts_exactly_the_zero_centred_norms(tmp_path, make_run):
    net = make_run(tmp_path / "run", CASES["gdn-hybrid"][0], std=0.05)
    export_hf(tmp_path / "run", tmp_path / "out")
    out, mine = load_file(tmp_path / "out" / "model.safetensors"), net.state_dict()
    assert "lm_head.weight" in out  # the recipe ties; the eps rescaling of the stream unties
    for loom, hf in [("norm.weight", "model.norm.weight"),
                     ("blocks.0.mixer_norm.weight", "model.layers.0.input_layernorm.weight"),
                     ("blocks.3.mlp_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
                     ("blocks.3.mixer.q_norm.weight", "model.layers.3.self_attn.q_norm.weight"),
                     ("blocks.3.mixer.k_norm.weight", "model.layers.3.self_attn.k_norm.weight")]:
        torch.testing.assert_close(out[hf], mine[loom] - 1, rtol=0, atol=1e-7)
    assert torch.equal(out["model.layers.0.linear_attn.norm.weight"], mine["blocks.0.mixer.norm.weight"])
    model = json.loads((tmp_path / "out" / "config.json").read_text())
    assert model["rms_norm_eps"] == 1e-6  # the GDN gated norm's, which no rewrite changes


@pytest.mark.parametrize("recipe,target", [("gdn-hybrid", "qwen3_5"), ("gdn-hybrid-350m", "qwen3_5"),
                                           ("gdn-hybrid-1.3b", "qwen3_5"), ("mamba2-hybrid", "bamba"),
                                           ("mamba2-hybrid-350m", "bamba"), ("mamba2-hybrid-1.3b", "bamba")])
def test_every_recipe_of_the_families_is_expressible(recipe, target):
    cfg = load_config(RECIPES / f"{recipe}.yaml").model
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 320).resolved()
    assert native_problem(cfg, target) is None


@pytest.mark.parametrize("recipe,overrides,target,match", [
    ("gdn-hybrid", {"mixers": {"attn": {"qk_norm": False}}}, "qwen3_5", r"model\.mixers\.attn\.qk_norm is False"),
    ("gdn-hybrid", {"mixers": {"gdn": {"beta": "sigmoid2"}}}, "qwen3_5", r"model\.mixers\.gdn\.beta"),
    ("mamba2-hybrid", {}, "nemotron_h", r"model\.mlp_kind is 'swiglu'"),  # Nemotron-H's MLPs are relu2
    ("mamba2-hybrid", {"mixers": {"attn": {"gate": "headwise"}}}, "bamba", r"model\.mixers\.attn"),
])
def test_real_differences_are_refused_naming_the_field(tmp_path, make_run, capsys, recipe, overrides, target, match):
    make_run(tmp_path / "run", recipe_model(recipe, deep_merge(TINY_OVERRIDES[recipe], overrides)))
    with pytest.raises(ConvertError, match=match) as e:
        export_hf(tmp_path / "run", tmp_path / "out", target)
    assert "\n" not in str(e.value)
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "cli"), "--target", target]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match.split(" ")[0].replace("\\", "") in err
    if target != "nemotron_h":  # auto leaves through trust_remote_code instead
        assert export_hf(tmp_path / "run", tmp_path / "auto")[1] == "remote"
