"""`loom convert hf`: folder handling, refusals and the output format.

Checkpoints are fabricated as plain safetensors with transformers' tensor names
(no transformers import): unknown architectures and inexact settings are
refused with one line, a missing config.json or shard is a FileNotFoundError,
sharded checkpoints convert like single-file ones, and the output loads
strictly into HybridLM. Numerical parity with transformers is in
tests/models/test_llama_parity.py. Cost: ~5 s on one CPU core.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from loom.models import HybridLM
from loom.models.config import build
from loom.trainer.hf.convert import ConvertError, convert_hf, load_converted, main_convert, model_config_from_hf

REPO = Path(__file__).resolve().parents[2]


def hf_config(model_type="llama", **overrides):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(model_type, "Phi3ForCausalLM")
    cfg = {"architectures": [arch], "model_type": model_type, "vocab_size": 96, "hidden_size": 32,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "num_hidden_layers": 2,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}
    return {**cfg, **overrides}


def hf_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as transformers saves a *ForCausalLM."""
    D, V, F = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    K = D // cfg["num_attention_heads"]
    H, G = cfg["num_attention_heads"] * K, cfg["num_key_value_heads"] * K
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
              p + "self_attn.q_proj.weight": (H, D), p + "self_attn.k_proj.weight": (G, D),
              p + "self_attn.v_proj.weight": (G, D), p + "self_attn.o_proj.weight": (D, H),
              p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
        if cfg["model_type"] == "qwen2":
            t |= {p + "self_attn.q_proj.bias": (H,), p + "self_attn.k_proj.bias": (G,),
                  p + "self_attn.v_proj.bias": (G,)}
    return {name: torch.randn(shape) for name, shape in t.items()}


def write_hf(folder: Path, cfg: dict, tensors: dict, shards: int = 1) -> Path:
    """A Hugging Face folder; with shards > 1, model-0000i-of-0000n.safetensors + index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_unknown_architecture_is_refused_in_one_line(tmp_path, capsys):
    cfg = hf_config("phi3")
    src = write_hf(tmp_path / "hf", cfg, hf_tensors({**cfg, "model_type": "llama"}))
    with pytest.raises(ConvertError, match="Phi3ForCausalLM") as e:
        convert_hf(src, tmp_path / "out")
    assert "\n" not in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert main_convert([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unsupported architecture Phi3ForCausalLM") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_other_head_on_known_model_type_is_refused():
    with pytest.raises(ConvertError, match="LlamaForSequenceClassification"):
        model_config_from_hf(hf_config(architectures=["LlamaForSequenceClassification"]))


def test_missing_config_json(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        convert_hf(tmp_path / "absent", tmp_path / "out")
    assert main_convert([str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_weights_and_missing_shard(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin, re-save it with safetensors"):
        convert_hf(tmp_path / "bin", tmp_path / "out")
    cfg = hf_config()
    src = write_hf(tmp_path / "sharded", cfg, hf_tensors(cfg), shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00003.safetensors"):
        convert_hf(src, tmp_path / "out")


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True)])
def test_sharded_equals_single_file(tmp_path, model_type, tie):
    cfg = hf_config(model_type, tie_word_embeddings=tie)
    tensors = hf_tensors(cfg)
    one = convert_hf(write_hf(tmp_path / "one", cfg, tensors), tmp_path / "out-one")
    many_src = write_hf(tmp_path / "many", cfg, tensors, shards=3)
    (many_src / "tokenizer.json").write_text('{"version": "1.0"}')
    many = convert_hf(many_src, tmp_path / "out-many")
    assert (many / "tokenizer.json").read_text() == '{"version": "1.0"}'
    (cfg1, sd1), (cfg3, sd3) = load_converted(one), load_converted(many)
    assert cfg1 == cfg3 and sd1.keys() == sd3.keys()
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert torch.equal(sd1["blocks.1.mlp_norm.weight"], tensors["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(sd1["blocks.0.mixer.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"])
    assert ("lm_head.weight" in sd1) == (not tie)
    HybridLM(cfg1).load_state_dict(sd1)  # strict


def test_model_yaml_is_a_recipe_model_section(tmp_path):
    cfg = hf_config("qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                              "original_max_position_embeddings": 32})
    out = convert_hf(write_hf(tmp_path / "hf", cfg, hf_tensors(cfg)), tmp_path / "out")
    section = yaml.safe_load((out / "model.yaml").read_text())
    assert list(section) == ["model"]
    model = build(type(model_config_from_hf(cfg)), section["model"], "model")
    assert model == model_config_from_hf(cfg)
    assert model.mixers == {"attn": {"qkv_bias": True}} and model.layer_kinds() == ["attn", "attn"]
    assert (model.rope.scaling, model.rope.factor, model.rope.original_max_len, model.rope.base) == \
        ("yarn", 4.0, 32, 1e6)


def test_v4_style_rope_scaling_is_read():
    cfg = hf_config(rope_parameters=None, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    rope = model_config_from_hf(cfg).rope
    assert (rope.scaling, rope.base, rope.factor, rope.original_max_len) == ("llama3", 500000.0, 8.0, 64)
    linear = model_config_from_hf(hf_config(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (linear.rope.scaling, linear.rope.factor, linear.rope.base) == ("linear", 2.0, 10000.0)


@pytest.mark.parametrize("overrides,match", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "attention_factor": 1.0}},
     "attention factor"),
    ({"mlp_bias": True, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_inexact_settings_are_refused(overrides, match):
    with pytest.raises(ConvertError, match=match) as e:
        model_config_from_hf(hf_config(**overrides))
    assert "\n" not in str(e.value)


def test_qwen2_sliding_window_flag_without_sliding_layers_is_full_attention():
    cfg = hf_config("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=28)
    assert model_config_from_hf(cfg).layer_kinds() == ["attn", "attn"]
    assert model_config_from_hf(hf_config("qwen2", use_sliding_window=False, sliding_window=64, max_window_layers=0))


def test_unexpected_tensor_and_wrong_shape(tmp_path):
    cfg = hf_config()
    extra = {**hf_tensors(cfg), "model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}
    with pytest.raises(ConvertError, match="o_proj.bias"):
        convert_hf(write_hf(tmp_path / "a", cfg, extra), tmp_path / "out")
    wrong = {**hf_tensors(cfg), "model.norm.weight": torch.ones(31)}
    with pytest.raises(ConvertError, match=r"model.norm.weight.*\(31,\)"):
        convert_hf(write_hf(tmp_path / "b", cfg, wrong), tmp_path / "out")
    missing = hf_tensors(cfg)
    del missing["lm_head.weight"]
    with pytest.raises(ConvertError, match="lm_head.weight"):
        convert_hf(write_hf(tmp_path / "c", cfg, missing), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path):
    cfg = hf_config()
    src = write_hf(tmp_path / "hf", cfg, hf_tensors(cfg))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        convert_hf(src, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_loom_convert_hf_prints_one_line_without_importing_transformers(tmp_path):
    cfg = hf_config()
    src = write_hf(tmp_path / "hf", cfg, hf_tensors(cfg))
    code = ("import sys; from loom.trainer.cli import main; rc = main(sys.argv[1:]); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "convert", "hf", str(src), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "init_from" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "model.yaml"]


def test_bf16_checkpoint_keeps_its_dtype_and_loads(tmp_path):
    cfg = hf_config()
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_tensors(cfg).items()}
    out = convert_hf(write_hf(tmp_path / "hf", cfg, tensors), tmp_path / "out")
    model_cfg, state = load_converted(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "bfloat16" in (out / "model.yaml").read_text().splitlines()[0]
    model = HybridLM(model_cfg)
    model.load_state_dict(state)
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, tensors["model.embed_tokens.weight"].float())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad-header"])
def test_corrupt_safetensors_is_one_line_naming_the_file(tmp_path, capsys, damage):
    """A damaged weight file (cut short by a failed download, or not safetensors
    at all) is one `error:` line naming that file, not a traceback."""
    cfg = hf_config()
    src = write_hf(tmp_path / "hf", cfg, hf_tensors(cfg), shards=2)
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file",
                       "empty": b"", "bad-header": (20).to_bytes(8, "little") + b"{not json" + b" " * 11}[damage])
    with pytest.raises(ConvertError, match="model-00002-of-00002.safetensors"):
        convert_hf(src, tmp_path / "out")
    assert main_convert([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(shard) in err
    assert not (tmp_path / "out").exists()


def test_corrupt_converted_folder_is_one_line(tmp_path):
    cfg = hf_config()
    out = convert_hf(write_hf(tmp_path / "hf", cfg, hf_tensors(cfg)), tmp_path / "out")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConvertError, match="truncated or corrupt") as e:
        load_converted(out)
    assert "\n" not in str(e.value) and str(weights) in str(e.value)
