"""Continued pre-training from converted checkpoints, end to end through the real CLI: a tiny
Gemma 3 (Gemma3ForCausalLM, 2:1 sliding / global layers, per-type RoPE with linear scaling on
the global layers) and a tiny Qwen3.5 text model (GDN + gated attention, partial rotary, YaRN),
built from transformers' classes with every weight perturbed, saved with a byte-level BPE
tokenizer.json, `loom convert hf`-ed, then trained with init_from the converted folder, its
tokenizer and a two-stage seq_len_schedule:
- exact resume: N steps in one go equal N/2, stop, resume to N (losses to 1e-6);
- `loom eval` runs on the result, and lm-eval through Loom's `loom` model (LoomLM, offline on
  the local tasks of tests/trainer/lm_eval_tasks) scores the trained run;
- parallel.cp=2 (torchrun, gloo) gives the single-process losses and grad norms (slow tier).
Cost: ~15 s per family for resume, ~60 s per family for the cp=2 case (2 processes).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from loom.trainer.cli import main  # noqa: E402
from loom.trainer.observe.metrics import train_losses  # noqa: E402

V = 320  # > the tokenizer's 300 entries (Loom's byte-level BPE below)
FULL, SLIDING, LIN = "full_attention", "sliding_attention", "linear_attention"
FAMILIES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
        layer_types=[SLIDING, SLIDING, FULL], max_position_embeddings=256,
        rope_parameters={FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 1000.0}})),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, max_position_embeddings=256,
        layer_types=[LIN, LIN, LIN, FULL],
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                         "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
}
WORDS = ("the model reads long documents and keeps what matters across windows while the optimiser "
         "moves every weight a little at each step so the loss falls").split()


def tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tok.save(str(path))


def converted(family: str, tmp: Path) -> Path:
    """A tiny perturbed transformers model of `family` with a tokenizer, through `loom convert hf`."""
    cfg_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    model.save_pretrained(tmp / "hf")
    tokenizer_json(tmp / "hf" / "tokenizer.json")
    assert main(["convert", "hf", str(tmp / "hf"), str(tmp / "conv")]) == 0
    return tmp / "conv"


def recipe(conv: Path, tmp: Path) -> Path:
    """The converted model section plus a short run: its tokenizer, a 48 -> 96 token schedule."""
    section = yaml.safe_load((conv / "model.yaml").read_text())
    assert section["model"]["rope"].get("scaling") or any(
        m.get("rope", {}).get("scaling") for m in section["model"].get("mixers", {}).values()), section
    recipe = {
        "base": "conv/model.yaml",  # the model section `loom convert hf` wrote, as the README shows
        "init_from": str(conv),
        "data": {"tokenizer": str(conv / "tokenizer.json"), "cache_dir": str(tmp / "cache"), "seq_len": 48,
                 "seq_len_schedule": [{"step": 0, "seq_len": 48}, {"step": 3, "seq_len": 96}],
                 "sources": [{"kind": "stdlib", "weight": 1.0, "max_bytes": 200000}], "val_windows": 2},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 2, "log_every": 1, "eval_every": 6, "save_every": 3, "keep_last": 2},
        "eval": {"passkey_n": 0},
    }
    assert conv == tmp / "conv"
    path = tmp / "cpt.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "split" not in r and "loss" in r}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_from_converted_is_exact_and_evaluates(tmp_path, family, capsys):
    conv = converted(family, tmp_path)
    cpt = recipe(conv, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(cpt), f"output_dir={a}"]) == 0
    assert main(["train", str(cpt), f"output_dir={b}", "train.stop_after_steps=3"]) == 0
    assert sorted(train_losses(b)) == [1, 2, 3]
    assert main(["train", str(cpt), f"output_dir={b}"]) == 0
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
    capsys.readouterr()
    assert main(["eval", str(cpt), f"output_dir={a}", "--out", str(tmp_path / "eval"), "--no-generate",
                 "--n", "1"]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lm_eval_runs_on_the_trained_run(tmp_path, family):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from loom.trainer.eval.lm_eval_model import LoomLM

    conv = converted(family, tmp_path)
    cpt = recipe(conv, tmp_path)
    assert main(["train", str(cpt), f"output_dir={tmp_path / 'run'}", "train.steps=2"]) == 0
    tasks = Path(__file__).parent / "lm_eval_tasks"
    folder = tmp_path / "tasks"
    folder.mkdir()
    task = yaml.safe_load((tasks / "loom_mc.yaml").read_text())
    task["dataset_kwargs"] = {"data_files": {k: str(tasks / v) for k, v in task["dataset_kwargs"]["data_files"].items()},
                              "cache_dir": str(tmp_path / "hf-datasets")}
    (folder / "loom_mc.yaml").write_text(yaml.safe_dump(task))
    lm = LoomLM(checkpoint=str(tmp_path / "run"), batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["loom_mc"], verbosity="ERROR",
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    acc = out["results"]["loom_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cp2_matches_one_process(tmp_path, family):
    conv = converted(family, tmp_path)
    cpt = recipe(conv, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "loom.trainer", "train", str(cpt), "train.steps=4"]
    for cmd in ([sys.executable, *args, f"output_dir={tmp_path / 'one'}"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(_port()), *args, f"output_dir={tmp_path / 'cp2'}", "parallel.cp=2"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    one, cp2 = metrics(tmp_path / "one"), metrics(tmp_path / "cp2")
    assert sorted(one) == sorted(cp2) == [1, 2, 3, 4]
    for s in one:
        for key in ("loss", "grad_norm"):
            x, y = one[s][key], cp2[s][key]
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (s, key, x, y)
