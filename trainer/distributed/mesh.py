"""Process groups and the (dp x cp) device mesh.

Where rank and world size come from, in order:
    1. torchrun, `deepspeed`, `accelerate launch`: RANK, WORLD_SIZE, LOCAL_RANK,
       MASTER_ADDR, MASTER_PORT (all three launchers set the torchrun variables;
       under accelerate, its config file's FSDP / DeepSpeed choice also selects
       the engine: engine_from_accelerate);
    2. SLURM without a launcher (`srun python -m loom.trainer ...`, one task per
       process): SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS inside a step),
       SLURM_LOCALID; MASTER_ADDR is the first host of SLURM_JOB_NODELIST and
       MASTER_PORT defaults to 20000 + SLURM_JOB_ID % 10000.
Backend: NCCL when CUDA is available (device cuda:LOCAL_RANK), gloo otherwise.

Mesh: world = dp x cp, row-major, so the ranks of one cp group are consecutive:
global rank = dp_rank * cp + cp_rank. Example, 8 ranks with cp = 4:
    cp groups [0 1 2 3] [4 5 6 7];   dp groups [0 4] [1 5] [2 6] [3 7].
Every rank of a cp group reads the same window (Batcher(dp_rank, dp_size)) and
keeps its zigzag shard of it (Env.shard_batch).

Why gradients are averaged over all dp x cp ranks: the parameters are
replicated over cp ranks as well as dp ranks. With S_r the summed token loss
of rank r's rows and tokens, and N the labelled tokens of the whole global
micro-batch (an all-reduced scalar), Env.reduce_loss returns
loss_r = world * S_r / N. The cp attention backward sends every key/value
gradient home, so the parameter gradient on rank r is d(sum_s loss_s)/d(theta
used at r's tokens); summed over all ranks that is world * dL/dtheta with
L = S / N the single-process loss of the global micro-batch, and the engines'
mean over the world is exactly dL/dtheta, whatever the split of rows and
tokens. tests/distributed/test_engines.py checks it for dp, cp and both.
The trainer counts N over the whole step (all grad_accum micro-batches,
Env.count_labels) and passes it to reduce_loss, so the summed micro-batch
losses are the mean over every labelled token of the global batch
(tests/trainer/test_sft.py: grad_accum=2 and dp=2 equal one batch).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from loom.models.config import ConfigError
from loom.trainer.distributed.dist import Env


@dataclass(frozen=True)
class Launch:
    """This process's place, as the launcher described it."""

    rank: int
    world: int
    local_rank: int
    source: str  # "torchrun" (also deepspeed / accelerate) or "slurm"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003".

    Same answer as `scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`,
    without needing scontrol on the compute node.
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launch(environ=None) -> Launch:
    """Rank, world size and local rank from the launcher's environment variables.

    Fills MASTER_ADDR / MASTER_PORT (and RANK, WORLD_SIZE, LOCAL_RANK) from
    SLURM when no launcher set them, so that `init_method="env://"` and
    DeepSpeed see one consistent description.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return Launch(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                      "torchrun")
    if "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"))
        launch = Launch(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), "slurm")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if "MASTER_ADDR" not in env:
            if not nodes:
                raise ConfigError("SLURM launch without SLURM_JOB_NODELIST: set MASTER_ADDR")
            env["MASTER_ADDR"] = first_host(nodes)
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank))
        return launch
    return Launch(0, 1, 0, "none")


def launched_world_size(environ=None) -> int:
    """Number of processes of this run (1 without a launcher); reads no state but the environment."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"))
    return 1


def mesh_shape(world: int, cp_size: int) -> tuple[int, int]:
    """(dp_size, cp_size) for `world` ranks; ConfigError unless cp_size divides world."""
    if cp_size < 1 or world % cp_size:
        raise ConfigError(f"parallel.cp={cp_size} does not divide the number of processes ({world}); "
                          f"launch a multiple of {cp_size} processes or change parallel.cp")
    return world // cp_size, cp_size


def backend_and_device(local_rank: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def engine_from_accelerate(parallel, environ=None) -> None:
    """Under `accelerate launch`, take the engine its config file names.

    ACCELERATE_USE_FSDP -> parallel.engine=fsdp (FSDP_OFFLOAD_PARAMS -> offload_params);
    ACCELERATE_USE_DEEPSPEED -> engine=deepspeed with ACCELERATE_DEEPSPEED_ZERO_STAGE,
    the offload devices and ACCELERATE_DEEPSPEED_CONFIG_FILE; otherwise nothing
    changes. Batch size, accumulation, clipping and precision stay the recipe's.
    Sets `parallel` in place (so the run's config.yaml records it); ConfigError
    when the recipe chose a different engine.
    """
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        wanted = "deepspeed"
    elif env.get("ACCELERATE_USE_FSDP") == "true":
        wanted = "fsdp"
    else:
        return
    if parallel.engine not in ("single", wanted):
        raise ConfigError(f"the accelerate config selects {wanted} but the recipe sets parallel.engine="
                          f"{parallel.engine}; drop one of them")
    parallel.engine = wanted
    if wanted == "fsdp":
        parallel.offload_params |= env.get("FSDP_OFFLOAD_PARAMS") == "true"
        return
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        parallel.deepspeed_config = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    elif env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        parallel.zero = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    parallel.offload_optimizer |= env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    parallel.offload_params |= env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"


def setup_env(parallel_cfg) -> Env:
    """This process's Env: `Env()` when one process runs (no launcher), else the
    process groups and mesh of init_process_groups. ConfigError when parallel.cp
    needs more processes than were launched."""
    if launched_world_size() == 1:
        if parallel_cfg.cp > 1:
            raise ConfigError(f"parallel.cp={parallel_cfg.cp} needs {parallel_cfg.cp} processes per data-parallel "
                              "group; launch with torchrun --nproc_per_node N")
        return Env()
    return init_process_groups(parallel_cfg)


def init_process_groups(parallel_cfg) -> Env:
    """Initialise torch.distributed and the dp x cp mesh; returns this rank's Env.

    Raises ConfigError (before any process group exists) when parallel.cp
    does not divide the world size.
    """
    launch = detect_launch()
    engine_from_accelerate(parallel_cfg)
    dp_size, cp_size = mesh_shape(launch.world, parallel_cfg.cp)
    backend, device = backend_and_device(launch.local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp_size, cp_size), mesh_dim_names=("dp", "cp"))
    rank = tdist.get_rank()
    cp = None
    if cp_size > 1:
        from loom.kernels.context_parallel import CPContext

        cp = CPContext.from_group(mesh.get_group("cp"), impl=parallel_cfg.cp_impl, layout="zigzag")
    return Env(rank=rank, world=launch.world, dp_rank=rank // cp_size, dp_size=dp_size, cp_rank=rank % cp_size,
               cp_size=cp_size, cp=cp, device=device)


def ensure_process_group(env) -> None:
    """A one-rank process group for engines that need one (FSDP, DeepSpeed) in a
    single-process run; a no-op when torch.distributed is initialised."""
    if tdist.is_initialized():
        return
    backend, _ = backend_and_device(0)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # DeepSpeed reads these even when the group exists
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
