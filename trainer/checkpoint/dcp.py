"""Sharded checkpoints with torch.distributed.checkpoint (DCP): `train.checkpoint_format: sharded`.

The default (`full`) checkpoint gathers the whole model and AdamW state on rank 0
(about 12 bytes per parameter: 84 GB for a 7B model) before writing. A sharded
checkpoint has every rank write only what it holds: FSDP2's DTensor shards, or
under `ddp` / `single` one copy of each tensor (DCP deduplicates replicas).
The folder keeps Loom's layout and guarantees::

    step-00000040/
        dcp/                 .metadata + one __<rank>_0.distcp per rank (model.* and optim.* tensors)
        trainer_state.pt     scheduler, data position, RNG states, layout, guard (rank 0, small)
        meta.json            recipe, tokenizer, ...; "checkpoint_format": "sharded"
        manifest.json        sha256 of every file above, written last

Saving: rank 0 opens the temporary folder (CheckpointManager.begin: stale
leftovers, free space) and broadcasts its name; every rank checks its own
shards are finite (all ranks agree through one all-reduce) and writes them
with `dcp.save`; rank 0 then writes trainer_state.pt and commits (manifest,
atomic rename, `latest`, keep-last-k). A failure on any rank leaves the
previous checkpoint and `latest` untouched. With `train.checkpoint_async`
the shards are staged in CPU memory and written in the background while
training goes on (`PendingSave`); the commit happens at the next save or at
the end of the run (the last save and a stop save are synchronous).

Loading: `load_sharded` fills the engine's own (sharded) state dict in place
with `dcp.load`, which reshards: a checkpoint of N FSDP ranks resumes on M
ranks, or under `ddp` / `single`. DeepSpeed's flat ZeRO partitions are not
DTensors, so DeepSpeed runs write and read the full format.

Full weights on demand: `checkpoint.consolidate_model(dcp_dir)` rebuilds the whole model
state dict in one process from the metadata (CheckpointManager.load does this
for `loom eval`, `loom generate` and conversion), and
`python -m loom.trainer.checkpoint.dcp export CHECKPOINT OUT.safetensors` writes it out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from loom.models.config import ConfigError
from loom.trainer.checkpoint.manager import (SHARD_DIR, STATE_FILE, CheckpointError, consolidate_model,
                                     step_dir_name)

SHARDED_ENGINES = ("single", "ddp", "fsdp")


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARD_DIR).is_dir()


def app_state(engine) -> dict:
    """The engine's model and optimizer state as DCP sees it: FQN-keyed, DTensor shards under FSDP."""
    return {"model": get_model_state_dict(engine.model),
            "optim": get_optimizer_state_dict(engine.model, engine.optimizer)}


def _first_non_finite(model_state: dict) -> str | None:
    for name, t in model_state.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def save_sharded(manager, env, engine, step: int, state: dict, meta: dict) -> tuple[str, str] | None:
    """A collective: write checkpoint ``step`` sharded. Returns None, or (kind, one-line message) on every
    rank, kind "nonfinite" (nothing written) or "write" (the previous checkpoint is intact)."""
    sd, tmp, problem = _open(manager, env, engine, step)
    if problem is not None:
        return problem
    error = None
    try:
        dcp.save(sd, checkpoint_id=tmp / SHARD_DIR, no_dist=env.world == 1)
    except Exception as e:  # DCP re-raises any rank's write error (ENOSPC, EIO) as a CheckpointException
        error = _last_line(e)
    return _commit(manager, env, tmp, step, state, meta, error)


class PendingSave:
    """A sharded save whose shards are being written in the background (`train.checkpoint_async`).

    `dcp.async_save` first copies each rank's shards to CPU memory (so training may
    change the weights at once), then writes them from a thread over a separate gloo
    group. `finish` (a collective) waits for the writes and commits, as `save_sharded`
    does; until then the previous checkpoint is `latest`, and a crash leaves only a
    temporary folder behind.
    """

    _group = None  # the gloo group of background writes (never the training group)

    def __init__(self, manager, env, engine, step: int, state: dict, meta: dict):
        self.manager, self.env, self.step, self.state, self.meta = manager, env, step, state, meta
        self.future = None
        self.problem = None
        sd, self.tmp, self.problem = _open(manager, env, engine, step)
        if self.problem is not None:
            return
        if env.world > 1 and PendingSave._group is None:
            PendingSave._group = torch.distributed.new_group(backend="gloo")
        self.future = dcp.async_save(sd, checkpoint_id=self.tmp / SHARD_DIR, process_group=PendingSave._group,
                                     no_dist=env.world == 1)

    def finish(self) -> tuple[str, str] | None:
        if self.future is None:
            return self.problem
        error = None
        try:
            self.future.result()
        except Exception as e:  # as in save_sharded
            error = _last_line(e)
        return _commit(self.manager, self.env, self.tmp, self.step, self.state, self.meta, error)


def _open(manager, env, engine, step: int):
    """Check finiteness and open the temporary folder: (state dict, folder, None), or (.., .., problem)."""
    name = step_dir_name(step)
    sd = app_state(engine)
    bad = _first_non_finite(sd["model"])
    if env.any(bad is not None):
        where = f"tensor {bad}" if bad else "a shard on another rank"
        return None, None, ("nonfinite", f"not saving {name}: {where} holds NaN or inf")
    opened = None
    if env.is_main:
        try:
            opened = ("ok", str(manager.begin(step)))
        except CheckpointError as e:
            opened = ("write", str(e))
    kind, tmp = env.broadcast_object(opened)
    return (sd, Path(tmp), None) if kind == "ok" else (None, None, (kind, tmp))


def _commit(manager, env, tmp: Path, step: int, state: dict, meta: dict, error: str | None):
    """After every rank wrote (or failed): rank 0 writes trainer_state.pt and publishes, or removes tmp."""
    gathered = env.gather_object(error)  # a collective: every rank calls it
    errors = [e for e in (gathered if env.world > 1 else [gathered]) if e]
    problem = None
    if env.is_main:
        try:
            if errors:
                manager.abort(tmp, step, OSError(errors[0]))
            try:
                torch.save(state, tmp / STATE_FILE)
            except (OSError, RuntimeError) as e:  # torch.save wraps ENOSPC in a RuntimeError
                manager.abort(tmp, step, e)
            manager.commit(tmp, step, json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
        except CheckpointError as e:
            problem = ("write", str(e))
    return env.broadcast_object(problem)


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [repr(e)])[-1]


def load_sharded(engine, path: str | Path, env) -> None:
    """A collective: fill the engine's model and optimizer state from ``path``/dcp, resharding as needed."""
    if engine.name not in SHARDED_ENGINES:
        raise ConfigError(f"{path} is a sharded checkpoint; parallel.engine={engine.name} reads only full ones "
                          f"(resume once with one of {', '.join(SHARDED_ENGINES)} and "
                          "train.checkpoint_format=full)")
    sd = app_state(engine)
    dcp.load(sd, checkpoint_id=Path(path) / SHARD_DIR, no_dist=env.world == 1)
    set_model_state_dict(engine.model, sd["model"])
    set_optimizer_state_dict(engine.model, engine.optimizer, sd["optim"])


def export(checkpoint: str | Path, out: str | Path) -> None:
    """Write a sharded checkpoint's full weights as one safetensors file."""
    from loom.trainer.checkpoint.manager import _saveable

    save_file(_saveable(consolidate_model(Path(checkpoint) / SHARD_DIR)), str(out))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m loom.trainer.checkpoint.dcp export CHECKPOINT_DIR OUT.safetensors")
    export(sys.argv[2], sys.argv[3])
