"""Distributed engines against the single-process run (gloo, CPU, 2 and 4 processes).

Parity: tests/distributed/engine_worker.py runs 3 optimiser steps (2 micro-batches
each, packed documents, rows with different numbers of labelled tokens) of a tiny
HybridLM through one engine; each case is compared with the single-process run
on the same global batch:
    losses per step          |diff| <= 1e-5
    grad norms, lrs          rel 1e-5
    full gradients, step 1   atol 1e-6, rtol 1e-5 (observed: ~1e-8)
    final weights            atol 1e-5 (observed: ~1e-7); the worker uses AdamW
                             eps=1e-4 so that the update is a well-conditioned
                             function of the gradient (with eps=1e-8 a 1e-9 change
                             of a 1e-8 gradient moves a weight by a sizeable part of lr)
    optimizer state          name-keyed, equal step, exp_avg / exp_avg_sq close
Default tier: ddp, fsdp, deepspeed ZeRO-3, cp=2 x dp=1 with ring and with ulysses.
Slow tier: ZeRO 0/1/2, ZeRO-3 with CPU offload from recipes/deepspeed/zero3-offload.json,
fsdp x cp=2, dp=2 x cp=2 (4 ranks), cp=4 (4 ranks), a [swa, rat, linear, attn]
model under cp=2 (ring with ddp, ulysses with fsdp), ZeRO-3 with activation
checkpointing, and a non-finite loss at step 2 (engine.skip_step(): no update,
the schedule advances) for ddp, fsdp, ZeRO-0 and ZeRO-2.

Through the real CLI (`python -m torch.distributed.run ... -m loom.trainer train`):
a 2-rank FSDP run equals the 1-rank run step by step, stops at step 3, and
resumes on 1 rank with the single engine (exact losses, RNG reseeded, `loom eval`
reads its checkpoint); slow: ZeRO-3 on 2 ranks resumed by ZeRO-2 on 4, cp=2
through the CLI, SIGTERM to torchrun (every rank stops at the same step and the
checkpoint resumes), the `deepspeed` launcher script, `accelerate launch` with
launch/accelerate/ddp.yaml, and a launch from SLURM variables alone.
Cost: default tier 40-110 s on 2 shared cores (each 2-process launch pays 5-20 s of
imports and DeepSpeed start-up); slow tier a few minutes more.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loom.trainer.cli import main
from loom.trainer.observe.metrics import train_losses as losses
from loomtest import TINY

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("engine_worker.py")
pytestmark = pytest.mark.distributed


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(_port()), *args], cwd, timeout)


# ------------------------------------------------------------------ parity of the engines

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run for the worker's extra arguments (--nan-step, model.* keys), cached."""
    cache: dict[tuple, dict] = {}

    def get(flags: tuple[str, ...] = ()) -> dict:
        if flags not in cache:
            d = tmp_path_factory.mktemp("single")
            _run([sys.executable, str(WORKER), str(d / "out.pt"), "single", *flags], d)
            cache[flags] = torch.load(d / "out.pt", weights_only=False)
        return cache[flags]

    return get


slow = pytest.mark.slow
# Every layer kind whose cp op passes a halo or states (swa, rat, linear) next to attention.
HYBRID = ["model.layers=[swa, rat, linear, attn]",
          "model.mixers={swa: {window: 5}, rat: {chunk: 8}, linear: {block: 4}}"]
CASES = {  # name -> (processes, worker arguments)
    "ddp": (2, ["ddp"]),
    "fsdp": (2, ["fsdp"]),
    "zero3": (2, ["deepspeed", "parallel.zero=3"]),
    "cp2-ring": (2, ["ddp", "parallel.cp=2"]),
    "zero0": (2, ["deepspeed", "parallel.zero=0"]),
    "zero1": (2, ["deepspeed", "parallel.zero=1"]),
    "zero2": (2, ["deepspeed", "parallel.zero=2"]),
    "zero3-offload-json": (2, ["deepspeed", f"parallel.deepspeed_config={REPO}/recipes/deepspeed/zero3-offload.json"]),
    "cp2-ulysses": (2, ["ddp", "parallel.cp=2", "parallel.cp_impl=ulysses"]),
    "fsdp-cp2": (2, ["fsdp", "parallel.cp=2"]),
    "dp2xcp2-zero2": (4, ["deepspeed", "parallel.zero=2", "parallel.cp=2"]),
    "cp4-ring": (4, ["ddp", "parallel.cp=4"]),
    "cp2-ring-hybrid": (2, ["ddp", "parallel.cp=2", *HYBRID]),
    "cp2-ulysses-hybrid-fsdp": (2, ["fsdp", "parallel.cp=2", "parallel.cp_impl=ulysses", *HYBRID]),
    "zero3-activation-checkpointing": (2, ["deepspeed", "parallel.zero=3", "train.activation_checkpointing=full"]),
    "ddp-skip-nonfinite": (2, ["ddp", "--nan-step=1"]),
    "fsdp-skip-nonfinite": (2, ["fsdp", "--nan-step=1"]),
    "zero0-skip-nonfinite": (2, ["deepspeed", "parallel.zero=0", "--nan-step=1"]),
    "zero2-skip-nonfinite": (2, ["deepspeed", "parallel.zero=2", "--nan-step=1"]),
}
DEFAULT_TIER = {"ddp", "fsdp", "zero3", "cp2-ring", "cp2-ulysses"}


def assert_parity(ref: dict, got: dict) -> None:
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"], strict=True), 1):
        assert abs(a - b) <= 1e-5 or (math.isnan(a) and math.isnan(b)), f"loss at step {step}: single {a}, engine {b}"
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0,
                               equal_nan=True)
    assert got["lrs"] == pytest.approx(ref["lrs"], rel=1e-12)
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")
    assert set(got["params"]) == set(ref["params"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=1e-5, rtol=0, msg=lambda m: f"weight {name}: {m}")
    ours, theirs = got["state"]["optimizer"], ref["state"]["optimizer"]
    assert set(ours["state"]) == set(theirs["state"]) == set(ref["params"])
    assert sorted(n for g in ours["param_groups"] for n in g["params"]) == sorted(ref["params"])
    for name, s in theirs["state"].items():
        assert float(ours["state"][name]["step"]) == float(s["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][name][key], s[key], atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"{key} of {name}: {m}")


@pytest.mark.parametrize("case", [c if c in DEFAULT_TIER else pytest.param(c, marks=slow) for c in CASES])
def test_engine_matches_single_process(reference, tmp_path, case):
    nproc, args = CASES[case]
    torchrun(nproc, [str(WORKER), str(tmp_path / "out.pt"), *args], tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["world"] == nproc
    assert_parity(reference(tuple(a for a in args if a.startswith("--") or a.startswith("model."))), got)


# ------------------------------------------------------------------ the real CLI, resharding

@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """tests/tiny.yaml with 6 steps of 4 windows, evaluated and saved every 3."""
    p = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    p.write_text(f"base: {TINY}\n"
                 "train: {steps: 6, batch_size: 4, eval_every: 3, save_every: 3}\n")
    return p


def assert_same_losses(ref: dict[int, float], got: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(ref[step] - got[step]) <= 1e-5, (step, ref[step], got[step])


@pytest.fixture(scope="module")
def single_run(recipe, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 1-process run: 4 windows per step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", str(recipe), f"output_dir={out}"]) == 0
    return losses(out)


def test_torchrun_fsdp_run_resumes_on_one_rank(recipe, single_run, tmp_path, capsys):
    run = tmp_path / "run"
    torchrun(2, ["-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "parallel.engine=fsdp",
                 "train.batch_size=2", "train.stop_after_steps=3"], tmp_path)
    assert_same_losses(single_run, losses(run), [1, 2, 3])
    weights = load_file(str(run / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert weights["embed.weight"].shape[1] == 32 and "blocks.1.mixer.q_proj.weight" in weights  # full, unsharded

    # 1 rank, the single engine, the same global batch: the steps the 2-rank run did not take
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "resuming a checkpoint of 2 rank(s)" in out and "reseeding every rank" in out
    assert_same_losses(single_run, losses(run), [4, 5, 6])
    assert main(["eval", str(recipe), f"output_dir={run}", "--n", "1", "--tasks", "passkey"]) == 0
    assert "eval step 6" in capsys.readouterr().out


@pytest.mark.slow
def test_zero3_on_two_ranks_resumes_on_four(recipe, single_run, tmp_path):
    run = tmp_path / "run"
    torchrun(2, ["-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "parallel.engine=deepspeed",
                 "parallel.zero=3", "train.batch_size=2", "train.stop_after_steps=3"], tmp_path)
    proc = torchrun(4, ["-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "parallel.engine=deepspeed",
                        "parallel.zero=2", "train.batch_size=1"], tmp_path)
    assert "resuming a checkpoint of 2 rank(s)" in proc.stdout
    assert_same_losses(single_run, losses(run), range(1, 7))


@pytest.mark.slow
def test_cli_context_parallel_run_matches_single_process(recipe, single_run, tmp_path):
    run = tmp_path / "run"
    torchrun(2, ["-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "parallel.cp=2"], tmp_path)
    assert_same_losses(single_run, losses(run), range(1, 7))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(recipe, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "train.batch_size=2", "train.steps=400",
           "train.save_every=1000", "train.eval_every=1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert "checkpoint saved" in stdout, stderr[-3000:]
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert 3 <= step < 400 and max(losses(run)) == step
    torchrun(2, ["-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "train.batch_size=2",
                 "train.steps=400", "train.stop_after_steps=1", "train.save_every=1000"], tmp_path)
    assert max(losses(run)) == step + 1


@pytest.mark.slow
def test_deepspeed_launcher_script(recipe, single_run, tmp_path):
    run = tmp_path / "run"
    env = {**_env(), "MASTER_PORT": str(_port()), "DEEPSPEED": str(Path(sys.executable).with_name("deepspeed"))}
    _run([str(REPO / "launch" / "deepspeed.sh"), "2", str(recipe), f"output_dir={run}", "parallel.zero=1",
          "train.batch_size=2"], tmp_path, env=env)
    assert_same_losses(single_run, losses(run), range(1, 7))


@pytest.mark.slow
def test_accelerate_launch_ddp_config(recipe, single_run, tmp_path):
    run = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    _run([str(accelerate), "launch", "--config_file", str(REPO / "launch" / "accelerate" / "ddp.yaml"),
          "--main_process_port", str(_port()), "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}",
          "train.batch_size=2"], tmp_path)
    assert_same_losses(single_run, losses(run), range(1, 7))


@pytest.mark.slow
def test_launch_from_slurm_variables(recipe, single_run, tmp_path):
    """`srun --ntasks 2 python -m loom.trainer train ...` without torchrun: rank, world
    and rendezvous come from SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST."""
    run = tmp_path / "run"
    base = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(_port()))
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "train.batch_size=2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_same_losses(single_run, losses(run), range(1, 7))


def test_cp_that_does_not_divide_the_world_is_a_one_line_error(recipe, tmp_path, monkeypatch, capsys):
    """The check runs before any process group exists, so rank 0 alone shows what every rank prints."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'e'}", "parallel.cp=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: parallel.cp=4 does not divide the number of processes (2); launch a multiple of 4 "
                   "processes or change parallel.cp")
    assert not (tmp_path / "e").exists()
