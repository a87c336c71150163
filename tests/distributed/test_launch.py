"""In-process checks of the distributed plumbing that needs no process group:
launcher variables (torchrun, SLURM, accelerate), the dp x cp mesh shape, the
DeepSpeed config built from a recipe or a JSON, and resuming across world sizes
(RNG reseeding, global-batch warning). Cost: about a second."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loom.models.config import ConfigError
from loom.trainer.config import ParallelConfig, RunConfig
from loom.trainer.distributed.dist import Env
from loom.trainer.distributed.parallelize import build_engine
from loom.trainer.distributed.deepspeed_engine import deepspeed_config
from loom.trainer.distributed.mesh import (detect_launch, engine_from_accelerate, first_host, launched_world_size,
                                      mesh_shape)
from loom.trainer.checkpoint.layout import check_layout, restore_rng, run_layout

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a1,a2", "a1"), ("x[12]", "x12"),
    ("dgx-[01-04]", "dgx-01"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_launch_from_torchrun_variables():
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world, launch.local_rank, launch.source) == (5, 8, 1, "torchrun")
    assert launched_world_size(env) == 8  # torchrun inside an sbatch allocation wins over SLURM's task count


def test_launch_from_slurm_variables_fills_the_rendezvous():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[017-018]"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world, launch.local_rank, launch.source) == (3, 4, 1, "slurm")
    assert env["MASTER_ADDR"] == "node017" and env["MASTER_PORT"] == str(20000 + 123456 % 10000)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert launched_world_size({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}) == 2
    assert detect_launch({}).world == 1 and launched_world_size({}) == 1


def test_mesh_shape():
    assert mesh_shape(8, 4) == (2, 4) and mesh_shape(2, 1) == (2, 1)
    with pytest.raises(ConfigError, match=r"parallel.cp=4 does not divide the number of processes \(6\)"):
        mesh_shape(6, 4)


def test_accelerate_config_selects_the_engine():
    p = ParallelConfig()
    engine_from_accelerate(p, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                               "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                               "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"})
    assert (p.engine, p.zero, p.offload_optimizer, p.offload_params) == ("deepspeed", 2, True, False)
    p = ParallelConfig()
    engine_from_accelerate(p, {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "false"})
    assert (p.engine, p.offload_params) == ("fsdp", False)
    p = ParallelConfig(engine="ddp")
    engine_from_accelerate(p, {})  # plain multi-GPU accelerate config: the recipe decides
    assert p.engine == "ddp"
    with pytest.raises(ConfigError, match="accelerate config selects fsdp but the recipe sets parallel.engine=ddp"):
        engine_from_accelerate(ParallelConfig(engine="ddp"), {"ACCELERATE_USE_FSDP": "true"})


def test_unknown_engine_names_the_valid_ones():
    with pytest.raises(ConfigError, match="did you mean 'fsdp'"):
        build_engine("fsdpp", None, None, 1, env=Env())


# ------------------------------------------------------------------ DeepSpeed config

def run_config(**parallel) -> RunConfig:
    cfg = RunConfig()
    cfg.parallel = replace(cfg.parallel, engine="deepspeed", **parallel)
    cfg.train = replace(cfg.train, batch_size=3, grad_accum=2)
    cfg.optim = replace(cfg.optim, grad_clip=0.5)
    return cfg


def test_generated_deepspeed_config_follows_the_recipe():
    ds = deepspeed_config(run_config(zero=3, offload_optimizer=True, offload_params=True), CPU)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (3, 2, 0.5)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3-offload", 3)])
def test_shipped_deepspeed_json_fills_auto_from_the_recipe(name, stage):
    ds = deepspeed_config(run_config(deepspeed_config=str(REPO / "recipes" / "deepspeed" / f"{name}.json")), CPU)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (3, 2, 0.5)
    assert ds["bf16"]["enabled"] is False  # "auto" on CPU


@pytest.mark.parametrize("content, parallel, needle", [
    ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu=8 but the recipe gives 3"),
    ({"optimizer": {"type": "Adam"}}, {}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 3}}, {"zero": 2}, "parallel.zero=2 but"),
    ({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}, {},
     "parameter offload needs ZeRO stage 3"),
    ({"bf16": {"enabled": True}}, {}, "bf16 needs CUDA"),
])
def test_deepspeed_json_that_contradicts_the_recipe_fails(tmp_path, content, parallel, needle):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=None) as e:
        deepspeed_config(run_config(deepspeed_config=str(path), **parallel), CPU)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_generated_config_rejects_offload_without_zero():
    with pytest.raises(ConfigError, match="optimizer offload needs ZeRO stage 1-3"):
        deepspeed_config(run_config(offload_optimizer=True), CPU)
    with pytest.raises(ConfigError, match="parallel.dtype=bf16 needs CUDA with parallel.engine=deepspeed"):
        deepspeed_config(run_config(dtype="bf16"), CPU)


# ------------------------------------------------------------------ resuming on another layout

def test_rng_restored_per_rank_or_reseeded(capsys):
    torch.manual_seed(7)
    random.seed(7)
    from loom.trainer.checkpoint.manager import rng_state

    saved = [rng_state(), rng_state()]
    expected = torch.rand(3)
    torch.manual_seed(0)
    restore_rng(saved, Env(rank=1, world=2, dp_size=2), seed=0, step=5)  # same world size: exact
    assert torch.equal(torch.rand(3), expected)
    restore_rng(saved, Env(rank=2, world=4, dp_size=4), seed=0, step=5)  # 2 -> 4 ranks: reseeded
    a = torch.rand(3)
    restore_rng(saved, Env(rank=2, world=4, dp_size=4), seed=0, step=5)
    assert torch.equal(torch.rand(3), a)
    restore_rng(saved, Env(rank=3, world=4, dp_size=4), seed=0, step=5)
    assert not torch.equal(torch.rand(3), a)  # every rank its own stream
    assert "reseeding every rank from (seed=0, step=5, rank)" in capsys.readouterr().out


def test_changed_global_batch_warns(capsys):
    cfg = RunConfig()
    cfg.train = replace(cfg.train, batch_size=4)
    saved = run_layout(Env(world=2, dp_size=2), replace(cfg, train=replace(cfg.train, batch_size=2)))
    check_layout(saved, Env(), cfg)  # 2 x 2 -> 1 x 4: same windows per step
    out = capsys.readouterr()
    assert "resuming a checkpoint of 2 rank(s)" in out.out and out.err == ""
    check_layout(saved, Env(world=2, dp_size=2), cfg)  # 2 x 4: twice the windows per step
    assert "global batch changes from 4 to 8 windows per step" in capsys.readouterr().err
