"""End-to-end runs of a tiny model through the real CLI and trainer:
exact resume, SIGTERM, finished runs, corrupt checkpoints, CLI errors.
Cost: about a minute in all (the SIGTERM test spawns a process)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.trainer.cli import main
from loom.trainer.observe.metrics import read_metrics, train_losses as losses

from loomtest import TINY


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.read_text())
    return p


def test_resume_is_exact(recipe, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(recipe), f"output_dir={a}"]) == 0
    assert main(["train", str(recipe), f"output_dir={b}", "train.stop_after_steps=3"]) == 0
    assert "stopped at step 3" in capsys.readouterr().out
    assert max(losses(b)) == 3
    assert main(["train", str(recipe), f"output_dir={b}"]) == 0
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
    evals = [r for r in read_metrics(a) if "split" in r]
    assert [e["step"] for e in evals] == [4, 8] and all("ppl" in e for e in evals)
    # keep_last=2, and the latest pointer names the final step.
    steps = sorted(p.name for p in (a / "checkpoints").glob("step-*"))
    assert steps == ["step-00000006", "step-00000008"]
    assert (a / "checkpoints" / "latest").read_text().strip() == "step-00000008"


def test_finished_run_says_so(recipe, tmp_path, capsys):
    out = tmp_path / "done"
    assert main(["train", str(recipe), f"output_dir={out}", "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", str(recipe), f"output_dir={out}", "train.steps=2"]) == 0
    assert "already finished at step 2" in capsys.readouterr().out


def test_corrupt_checkpoint_falls_back(recipe, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["train", str(recipe), f"output_dir={out}", "train.stop_after_steps=4"]) == 0
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", str(recipe), f"output_dir={out}", "train.stop_after_steps=1"]) == 0
    captured = capsys.readouterr()
    assert "skipping corrupt checkpoint step-00000004" in captured.err
    assert "resumed" in captured.out and "from step 2" in captured.out


@pytest.mark.parametrize("args, needle", [
    (["train", "recipes/does-not-exist.yaml"], "error: recipe not found"),
    (["train", "{recipe}", "model.nonexistent=3"], "error: unknown key 'model.nonexistent'"),
    (["train", "{recipe}", "data.sources=[{kind: files, path: /no/such/file.jsonl}]"], "/no/such/file.jsonl"),
])
def test_cli_errors_are_one_line(recipe, tmp_path, capsys, args, needle):
    args = [a.replace("{recipe}", str(recipe)) for a in args] + [f"output_dir={tmp_path / 'e'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_sigterm_checkpoints_and_resumes(recipe, tmp_path):
    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={out}", "train.steps=400",
           "train.save_every=1000", "train.eval_every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "checkpoint saved" in stdout
    step = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert 3 <= step < 400
    assert max(losses(out)) == step


def test_hybrid_of_every_mixer_trains(tmp_path):
    """recipes/hybrid-all.yaml (one layer of every kind) trains through the real
    trainer: finite losses that fall, and a checkpoint that `loom eval` reads."""
    from loom.models.mixers import MIXERS

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "all"
    args = ["train", str(repo / "recipes/hybrid-all.yaml"), f"output_dir={out}", "model.d_model=64",
            "data.seq_len=128", "train.batch_size=4", "train.steps=12", "train.log_every=1",
            "train.eval_every=12", "train.save_every=12", "optim.warmup_steps=2", "eval.passkey_n=2",
            "data.val_windows=2", "data.sources=[{kind: stdlib, max_bytes: 200000}, {kind: passkey}]"]
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    assert all(kind in config for kind in MIXERS)
    lo = losses(out)
    assert all(v == v and v < 20 for v in lo.values())
    assert sum(lo[s] for s in (10, 11, 12)) < sum(lo[s] for s in (1, 2, 3))
    assert main(["eval", str(repo / "recipes/hybrid-all.yaml"), *args[2:], "--n", "1", "--lengths", "128,256"]) == 0



def test_startup_names_the_kernel_backends(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'k'}", "train.steps=1",
                 "model.layers=[attn, swa, linear]"]) == 0
    out = capsys.readouterr().out.splitlines()
    kernel_lines = [line for line in out if line.startswith("kernel: ")]
    assert kernel_lines[:4] == ["kernel: attention: sdpa", "kernel: sliding-window attention: banded",
                                "kernel: linear attention: chunked", "kernel: cross-entropy: fused"], kernel_lines
    # a window that packs several documents adds the tiled attention path (whether one does is up to the data)
    assert kernel_lines[4:] in ([], ["kernel: attention: tiled"]), kernel_lines
    assert "activation checkpointing: none; compile: off (auto on cpu)" in out
