"""`loom convert to-hf`: Loom runs leave as Hugging Face folders that transformers loads.

Checks, on run folders fabricated with random weights (no training):
- attention-only models export as LlamaForCausalLM / Qwen2ForCausalLM that plain
  transformers loads: fp32 logits within 1e-5 of HybridLM's, greedy
  generations identical (RoPE none, linear, yarn, llama3; tied and untied; GQA);
- a hybrid (every mixer kind, gate and MoH) exports with modeling code loaded by
  trust_remote_code: logits equal, generate (greedy, with the carried decoding
  state, and a left-padded batch) equal to HybridLM's;
- import -> export -> import is the identity (model.yaml and tensors), and so
  is export -> import -> export (config fields and tensors);
- the byte tokenizer's tokenizer.json encodes and decodes as ByteTokenizer; a
  run's HF tokenizer.json goes with it;
- kinds a target cannot express, bad sources and existing outputs are one line.
Cost: ~30 s on one CPU core (transformers import and model loads).
"""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from loom.trainer.cli import main  # noqa: E402
from loom.trainer.hf.convert import ConvertError, convert_hf, load_converted  # noqa: E402
from loom.trainer.data import ByteTokenizer, load_tokenizer  # noqa: E402
from loom.trainer.hf.export import export_hf  # noqa: E402
from loom.trainer.hf.source import load_source  # noqa: E402

ATTN = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "layers": ["attn", "x2"]}
NATIVE = {  # name: (model overrides, expected architecture)
    "llama-untied": ({"tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-tied-llama3": ({"rope": {"scaling": "llama3", "factor": 8.0, "original_max_len": 16,
                                    "base": 500000.0}}, "LlamaForCausalLM"),
    "llama-linear": ({"rope": {"scaling": "linear", "factor": 4.0}}, "LlamaForCausalLM"),
    "qwen2-yarn": ({"mixers": {"attn": {"qkv_bias": True}}, "tie_embeddings": False,
                    "rope": {"scaling": "yarn", "factor": 4.0, "original_max_len": 16}}, "Qwen2ForCausalLM"),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def loom_logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids).hidden)


@pytest.mark.parametrize("name", list(NATIVE))
def test_attention_model_loads_natively_with_equal_logits_and_generations(name, tmp_path, make_run):
    overrides, arch = NATIVE[name]
    loom = make_run(tmp_path / "run", {**ATTN, **overrides})
    out, target = export_hf(tmp_path / "run", tmp_path / f"hf-{name}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch and target == arch[:5].lower()
    ids = torch.randint(0, 259, (2, 80))  # past the rope scalings' original length (16)
    diff = (hf_logits(hf, ids) - loom_logits(loom, ids)).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff:.2e}"
    prompt = ids[:1, :12]
    want = loom.generate(prompt, 16)
    got = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)


def test_wrong_rope_in_export_is_detected(tmp_path, make_run):
    """Negative control: a Llama config with plain RoPE gives different logits for a llama3-scaled model."""
    loom = make_run(tmp_path / "run", {**ATTN, **NATIVE["llama-tied-llama3"][0]})
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    config["rope_scaling"] = None
    (out / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 259, (1, 80))
    assert (hf_logits(hf, ids) - loom_logits(loom, ids)).abs().max().item() > 1e-2


def test_hybrid_loads_with_trust_remote_code(tmp_path, make_run, hybrid_model):
    loom = make_run(tmp_path / "run", hybrid_model)
    out, target = export_hf(tmp_path / "run", tmp_path / "hf-hybrid")
    assert target == "remote"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loom.LoomForCausalLM"
    assert "Loom" in config["loom_requires"] and "Loom package must be installed" in (out / "README.md").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 259, (2, 45))
    diff = (hf_logits(hf, ids) - loom_logits(loom, ids)).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff:.2e}"

    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        want_loss = loom.loss(loom(ids).hidden[:, :-1], labels[:, 1:])
        assert torch.allclose(hf(ids, labels=labels).loss, want_loss, atol=1e-6)

    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    prompts = ["The pass key is 123", "hi"]
    enc = tok(prompts[:1], return_tensors="pt")
    got = hf.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(got, loom.generate(enc["input_ids"], 10))
    # a left-padded batch: each row generates what it generates alone
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    rows = hf.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, -6:]
    for r, text in enumerate(prompts):
        alone = loom.generate(torch.tensor([tok(text)["input_ids"]]), 6)[:, -6:]
        assert torch.equal(rows[r:r + 1], alone), text
    with pytest.raises(ValueError, match="beam search"):
        hf.generate(**enc, max_new_tokens=4, num_beams=2)


def test_import_export_import_is_identity(tmp_path, make_run):
    make_run(tmp_path / "run", {**ATTN, "mixers": {"attn": {"qkv_bias": True}}, "tie_embeddings": False})
    convert_hf(export_hf(tmp_path / "run", tmp_path / "hf1")[0], tmp_path / "loom1")  # import
    export_hf(tmp_path / "loom1", tmp_path / "hf2")                                     # export
    convert_hf(tmp_path / "hf2", tmp_path / "loom2")                                    # import
    model1 = yaml.safe_load((tmp_path / "loom1" / "model.yaml").read_text())
    model2 = yaml.safe_load((tmp_path / "loom2" / "model.yaml").read_text())
    assert model1 == model2
    (_, w1), (_, w2) = load_converted(tmp_path / "loom1"), load_converted(tmp_path / "loom2")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # and both equal the run's own weights
    run = load_source(tmp_path / "run")
    assert w1.keys() == run.state.keys() and all(torch.equal(w1[k], run.state[k]) for k in w1)
    # the exported HF folders hold the same tensors and architecture fields
    h1, h2 = load_file(str(tmp_path / "hf1" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert h1.keys() == h2.keys() and all(torch.equal(h1[k], h2[k]) for k in h1)
    c1, c2 = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("hf1", "hf2"))
    assert c1 == c2


def test_transformers_checkpoint_survives_import_and_export(tmp_path):
    """HF -> Loom -> HF: a save_pretrained Qwen2 (biases, GQA, yarn) comes back with the
    same tensors and the same architecture fields."""
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, rope_parameters={
                                          "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 64})
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "loom")
    out, target = export_hf(tmp_path / "loom", tmp_path / "back")
    assert target == "qwen2"
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    c0, c1 = (json.loads((f / "config.json").read_text()) for f in (tmp_path / "hf", out))
    keys = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"]
    assert {k: c0[k] for k in keys} == {k: c1[k] for k in keys}
    # for yarn, max_position_embeddings is the pretrained length: transformers 4.x reads yarn's
    # original length from it (the convention of Qwen2.5's configs); 5.x reads rope_parameters
    assert c1["max_position_embeddings"] == 64
    assert {k: v for k, v in c1["rope_parameters"].items() if k in c0["rope_parameters"]} == c0["rope_parameters"]
    ids = torch.randint(0, 128, (1, 100))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf_logits(back, ids) - hf_logits(model.eval(), ids)).abs().max().item() < 1e-5


def test_byte_tokenizer_json_is_the_byte_tokenizer(tmp_path, make_run):
    make_run(tmp_path / "run", ATTN)
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    byte = ByteTokenizer()
    exported = load_tokenizer(str(out))  # Loom reading the exported file
    assert (exported.bos_id, exported.eos_id, exported.pad_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["héllo wörld — 日本語 🙂\n\tend", "  two  spaces", "\x00\x7f\xff", ""]:
        ids = byte.encode(text)
        assert exported.encode(text) == ids
        assert hf_tok(text)["input_ids"] == [byte.bos_id] + ids  # bos first, as every training document
        assert hf_tok.decode(ids) == text and exported.decode(ids + [byte.eos_id]) == text


def test_run_hf_tokenizer_goes_with_it(tmp_path, make_run):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, a tokenizer for the export test"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    make_run(tmp_path / "run", ATTN, tokenizer=str(tmp_path / "tokenizer.json"))
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    text = "hello world, unseen wörds"
    assert load_tokenizer(str(out)).encode(text) == load_tokenizer(str(tmp_path)).encode(text)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (0, 1, 320)
    assert transformers.AutoTokenizer.from_pretrained(out).decode(tok.encode(text).ids) == text


def test_checkpoint_folder_exports_that_step(tmp_path, make_run):
    make_run(tmp_path / "run", ATTN, step=5)
    second = make_run(tmp_path / "run", ATTN, step=9)  # latest
    src5 = load_source(tmp_path / "run" / "checkpoints" / "step-00000005")
    src9 = load_source(tmp_path / "run")
    assert torch.equal(src9.state["embed.weight"], second.embed.weight)
    assert not torch.equal(src5.state["embed.weight"], src9.state["embed.weight"])


@pytest.mark.parametrize("model,target,match,auto", [
    ("hybrid", "llama", "layer 1 is 'swa'", "remote"),
    ({**ATTN, "mixers": {"attn": {"gate": "elementwise"}}}, "llama", "gate is 'elementwise'", "remote"),
    ({**ATTN, "mixers": {"attn": {"qkv_bias": True}}}, "llama", "qkv_bias and out_bias differ", "qwen2"),
    ({**ATTN, "rope": {"scaling": "ntk", "factor": 2.0}}, "qwen2", "'ntk'", "remote"),
    ({**ATTN, "mixers": {"attn": {"qk_norm": True}}}, "qwen2", "qk_norm", "remote"),
    ({**ATTN, "mixers": {"attn": {"conv_size": 4}}}, "llama", "conv_size is 4", "remote"),
])
def test_inexpressible_model_is_refused_in_one_line(tmp_path, make_run, hybrid_model, capsys, model, target, match,
                                                    auto):
    make_run(tmp_path / "run", hybrid_model if model == "hybrid" else model)
    with pytest.raises(ConvertError, match=match):
        export_hf(tmp_path / "run", tmp_path / "out", target)
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--target", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export as") and err.count("\n") == 1 and "--target remote" in err
    assert not (tmp_path / "out").exists()
    # auto picks the target that expresses the model (the trust_remote_code folder as the last resort)
    assert export_hf(tmp_path / "run", tmp_path / "auto")[1] == auto


def test_bad_sources_and_outputs_are_one_line(tmp_path, make_run, capsys):
    def run(*args):
        code = main(["convert", "to-hf", *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no such folder" in run(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "not a run folder" in run(tmp_path / "empty", tmp_path / "out")
    make_run(tmp_path / "run", ATTN)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert "already exists" in run(tmp_path / "run", tmp_path / "taken")
    assert "unknown target" in run(tmp_path / "run", tmp_path / "out", "--target", "gpt2")
    weights = tmp_path / "run" / "checkpoints" / "step-00000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert "corrupt" in run(tmp_path / "run" / "checkpoints" / "step-00000005", tmp_path / "out")
    # from the run folder: the skipped checkpoint is named in a warning, then the error line
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: skipping corrupt checkpoint step-00000005")
    assert error.startswith("error: ") and "no valid checkpoint" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run", "taken"]


def test_cli_prints_one_line_without_importing_transformers(tmp_path, make_run):
    make_run(tmp_path / "run", ATTN)
    code = ("import sys; from loom.trainer.cli import main; rc = main(sys.argv[1:]); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "convert", "to-hf", str(tmp_path / "run"),
                          str(tmp_path / "hf")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "llama" in run.stdout
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.slow
def test_trained_run_through_the_command_line(tmp_path):
    """`loom train` (tests/tiny.yaml, 8 steps) -> `loom convert to-hf` -> transformers (~25 s)."""
    from pathlib import Path

    from loomtest import TINY as tiny
    env_run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=600)
    loom_bin = Path(sys.executable).parent / "loom"
    train = subprocess.run([str(loom_bin), "train", str(tiny), f"output_dir={tmp_path / 'run'}"], **env_run)
    assert train.returncode == 0, train.stderr[-2000:]
    export = subprocess.run([str(loom_bin), "convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")], **env_run)
    assert export.returncode == 0 and "llama" in export.stdout, export.stderr
    loom = load_source(tmp_path / "run").build()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(["The pass key is 12345. Remember it. What is the pass key? The pass key is"],
              return_tensors="pt")["input_ids"]
    assert (hf_logits(hf, ids) - loom_logits(loom, ids)).abs().max().item() < 1e-5
    got = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert torch.equal(got, loom.generate(ids, 20))
