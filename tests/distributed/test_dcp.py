"""Sharded checkpoints (train.checkpoint_format=sharded, torch.distributed.checkpoint) through the real CLI:
a 2-rank FSDP run writes one shard per rank under the manifest, resumes on 1 rank with the single engine
(DCP reshards) with the losses of the uninterrupted full-format run, and its consolidated full weights
(what `loom eval` and export read) equal that run's; slow: 2 FSDP ranks resumed on 4, DDP resumed by FSDP.
Background (async) saves resume exactly, on 1 process (default) and 2 FSDP ranks (slow).
A sharded save refuses DeepSpeed in one line. Cost: ~50 s default (one 2-process launch)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.cli import main
from loom.trainer.checkpoint.dcp import export
from loom.trainer.observe.metrics import train_losses as losses
from loomtest import TINY

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_port()), "-m", "loom.trainer", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    p.write_text(f"base: {TINY}\n"
                 "train: {steps: 6, batch_size: 4, eval_every: 3, save_every: 3}\n")
    return p


@pytest.fixture(scope="module")
def full_run(recipe, tmp_path_factory) -> Path:
    """The uninterrupted 1-process run with full-format checkpoints."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", str(recipe), f"output_dir={out}"]) == 0
    return out


def assert_same_losses(ref: dict, got: dict, steps) -> None:
    for step in steps:
        assert abs(ref[step] - got[step]) <= 1e-5, (step, ref[step], got[step])


def test_fsdp_sharded_checkpoint_resumes_on_one_rank(recipe, full_run, tmp_path, capsys):
    run = tmp_path / "run"
    torchrun(2, [str(recipe), f"output_dir={run}", "parallel.engine=fsdp", "train.batch_size=2",
                 "train.checkpoint_format=sharded", "train.stop_after_steps=3"], tmp_path)
    ckpt = run / "checkpoints" / "step-00000003"
    shards = sorted(p.name for p in (ckpt / "dcp").glob("*.distcp"))
    assert len(shards) == 2 and not (ckpt / "model.safetensors").exists()
    CheckpointManager(run).verify(ckpt)  # the manifest covers every shard
    ref = losses(full_run)
    assert_same_losses(ref, losses(run), [1, 2, 3])

    assert main(["train", str(recipe), f"output_dir={run}", "train.checkpoint_format=sharded"]) == 0
    assert "resuming a checkpoint of 2 rank(s)" in capsys.readouterr().out
    assert_same_losses(ref, losses(run), [4, 5, 6])

    full = load_file(str(full_run / "checkpoints" / "step-00000006" / "model.safetensors"))
    tensors, _, _ = CheckpointManager(run).load(run / "checkpoints" / "step-00000006")
    assert tensors.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(tensors[name], full[name], atol=1e-5, rtol=1e-4)
    export(run / "checkpoints" / "step-00000006", tmp_path / "w.safetensors")
    exported = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(exported[n], tensors[n]) for n in full)
    assert main(["eval", str(recipe), f"output_dir={run}"]) == 0
    assert "eval step 6" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("fsdp:2", "fsdp:4"), ("ddp:2", "fsdp:2")])
def test_sharded_checkpoint_across_world_sizes_and_engines(recipe, full_run, tmp_path, first, second):
    run = tmp_path / "run"
    (e1, n1), (e2, n2) = [(s.split(":")[0], int(s.split(":")[1])) for s in (first, second)]
    torchrun(n1, [str(recipe), f"output_dir={run}", f"parallel.engine={e1}", f"train.batch_size={4 // n1}",
                  "train.checkpoint_format=sharded", "train.stop_after_steps=3"], tmp_path)
    torchrun(n2, [str(recipe), f"output_dir={run}", f"parallel.engine={e2}", f"train.batch_size={4 // n2}",
                  "train.checkpoint_format=sharded"], tmp_path)
    assert_same_losses(losses(full_run), losses(run), range(1, 7))


def test_sharded_with_deepspeed_is_one_line(recipe, tmp_path, capsys):
    rc = main(["train", str(recipe), f"output_dir={tmp_path / 'r'}", "parallel.engine=deepspeed",
               "train.checkpoint_format=sharded"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: train.checkpoint_format=sharded needs parallel.engine single")


def test_async_sharded_saves_resume_exactly(recipe, full_run, tmp_path):
    """Background saves (train.checkpoint_async): committed at the next save, the stop save in the
    foreground; the resumed run's losses equal the uninterrupted full-format run's."""
    run = tmp_path / "run"
    args = ["train", str(recipe), f"output_dir={run}", "train.checkpoint_format=sharded",
            "train.checkpoint_async=true", "train.save_every=1"]
    assert main([*args, "train.stop_after_steps=4"]) == 0
    assert [s for s, _ in CheckpointManager(run).list()] == [3, 4]  # keep_last=2; 1-3 written in the background
    assert main(args) == 0
    assert_same_losses(losses(full_run), losses(run), range(1, 7))
    assert all(CheckpointManager(run).verify(p) is None for _, p in CheckpointManager(run).list())


@pytest.mark.slow
def test_async_sharded_saves_on_two_fsdp_ranks(recipe, full_run, tmp_path):
    run = tmp_path / "run"
    torchrun(2, [str(recipe), f"output_dir={run}", "parallel.engine=fsdp", "train.batch_size=2",
                 "train.checkpoint_format=sharded", "train.checkpoint_async=true", "train.save_every=1",
                 "train.stop_after_steps=4"], tmp_path)
    assert [s for s, _ in CheckpointManager(run).list()] == [3, 4]
    torchrun(2, [str(recipe), f"output_dir={run}", "parallel.engine=fsdp", "train.batch_size=2",
                 "train.checkpoint_format=sharded", "train.checkpoint_async=true"], tmp_path)
    assert_same_losses(losses(full_run), losses(run), range(1, 7))
