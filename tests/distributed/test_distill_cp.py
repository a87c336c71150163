"""Distillation under context parallelism and FSDP: `loom train` with distill.teacher on 2 gloo
processes (torchrun, parallel.cp=2: each rank holds half of every window, the teacher runs
on the same shard) gives the single-process losses, align and kl stages alike; under
parallel.engine=fsdp the teacher is FSDP2-sharded like the student, under deepspeed ZeRO-3 it is
partitioned like the student, and the kl stage matches too.
Cost: about 150 s on 2 shared cores (three 2-process launches, three single-process runs).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.config import config_from_dict, dump
from loom.trainer.data import load_tokenizer
from loom.trainer.observe.metrics import read_metrics
from loom.trainer.train import build_model

pytestmark = pytest.mark.distributed

RECIPE = """
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, layers: [attn, swa, gdn, attn], mixers: {swa: {window: 5}}}
data:
  seq_len: 48
  sources: [{kind: stdlib, weight: 1.0, max_bytes: 200000}]
  val_windows: 2
optim: {lr: 1.0e-3, warmup_steps: 1}
train: {steps: 4, batch_size: 2, log_every: 1, eval_every: 100, save_every: 100}
eval: {passkey_n: 0}
distill:
  stages: [{kind: align, steps: 2}, {kind: kl, steps: 2, temperature: 2.0, kl_weight: 0.7}]
"""


def _teacher(folder: Path) -> Path:
    """A run folder with a random std-0.1 attention teacher (what `loom train` leaves behind)."""
    cfg = config_from_dict({"output_dir": str(folder), "data": {"seq_len": 48},
                            "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "layers": ["attn", "x4"]}})
    net = build_model(cfg, load_tokenizer("byte"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump(cfg))
    CheckpointManager(folder).save(1, net.state_dict(), {}, {"loss": 1.0})
    return folder


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cp2_distillation_matches_one_process(tmp_path):
    teacher = _teacher(tmp_path / "teacher")
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(RECIPE)
    args = ["-m", "loom.trainer", "train", str(recipe), f"distill.teacher={teacher}"]
    _run([sys.executable, *args, f"output_dir={tmp_path / 'one'}"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
          *args, f"output_dir={tmp_path / 'cp2'}", "parallel.cp=2"], tmp_path)
    one = {r["step"]: r for r in read_metrics(tmp_path / "one") if "split" not in r}
    cp2 = {r["step"]: r for r in read_metrics(tmp_path / "cp2") if "split" not in r}
    assert sorted(one) == sorted(cp2) == [1, 2, 3, 4]
    assert [one[s]["distill_stage"] for s in one] == [0, 0, 1, 1]
    for s in one:
        for key in ("loss", "kl", "teacher_loss", "align_mse", "lm_loss", "grad_norm"):
            a, b = one[s].get(key), cp2[s].get(key)
            assert (a is None and b is None) or abs(a - b) <= 1e-5 * max(1.0, abs(a)), (s, key, a, b)
    assert one[4]["kl"] > 0


def test_fsdp_sharded_teacher_matches_one_process(tmp_path):
    """parallel.engine=fsdp on 2 ranks (dp=2): the student and the teacher are both FSDP2-sharded;
    the kl-stage losses equal one process's with the same global batch."""
    teacher = _teacher(tmp_path / "teacher")
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(RECIPE.replace("stages: [{kind: align, steps: 2}, ", "stages: ["))
    args = ["-m", "loom.trainer", "train", str(recipe), f"distill.teacher={teacher}", "train.steps=3"]
    _run([sys.executable, *args, f"output_dir={tmp_path / 'one'}", "train.batch_size=2"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
          *args, f"output_dir={tmp_path / 'fsdp'}", "parallel.engine=fsdp", "train.batch_size=1"], tmp_path)
    one = {r["step"]: r for r in read_metrics(tmp_path / "one") if "split" not in r}
    two = {r["step"]: r for r in read_metrics(tmp_path / "fsdp") if "split" not in r}
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        for key in ("loss", "kl", "teacher_loss", "lm_loss"):
            assert abs(one[s][key] - two[s][key]) <= 1e-5 * max(1.0, abs(one[s][key])), (s, key, one[s][key], two[s][key])


def test_zero3_partitioned_teacher_matches_one_process(tmp_path):
    """parallel.engine=deepspeed with ZeRO-3 on 2 ranks (dp=2): the teacher is partitioned like the
    student (persistence thresholds 0, so even this tiny model's tensors are split: each rank holds
    half), both head weights are gathered for the KL, and the kl-stage losses and gradient norms equal
    one process's with the same global batch."""
    teacher = _teacher(tmp_path / "teacher")
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(RECIPE.replace("stages: [{kind: align, steps: 2}, ", "stages: ["))
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {
                                  "stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_model_persistence_threshold": 0}}))
    args = ["-m", "loom.trainer", "train", str(recipe), f"distill.teacher={teacher}", "train.steps=3"]
    _run([sys.executable, *args, f"output_dir={tmp_path / 'one'}", "train.batch_size=2"], tmp_path)
    log = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_port()), *args, f"output_dir={tmp_path / 'z3'}", "parallel.engine=deepspeed",
                f"parallel.deepspeed_config={ds}", "train.batch_size=1"], tmp_path)
    held, total = map(int, re.search(r"teacher partitioned like the student \(ZeRO-3 over 2 rank\(s\)\): "
                                     r"(\d+) of (\d+) elements", log).groups())
    weights = load_file(next((teacher / "checkpoints").glob("step-*")) / "model.safetensors")
    assert total == sum(t.numel() for t in weights.values())
    assert held <= (total + 1) // 2 + 64, (held, total)
    one = {r["step"]: r for r in read_metrics(tmp_path / "one") if "split" not in r}
    two = {r["step"]: r for r in read_metrics(tmp_path / "z3") if "split" not in r}
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        for key in ("loss", "kl", "teacher_loss", "lm_loss", "grad_norm"):
            assert abs(one[s][key] - two[s][key]) <= 1e-5 * max(1.0, abs(one[s][key])), (s, key, one[s][key], two[s][key])
    assert one[3]["kl"] > 0
