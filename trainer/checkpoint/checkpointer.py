"""The checkpointer: when to save, the save still in flight, the last good checkpoint, rewind.

The training loop owns no checkpoint state of its own; after each step it asks

    if checkpointer.due(step, stopping):
        checkpointer.save(step, final, contents)

where `contents()` returns the loop's part of a checkpoint (data position, RNG
states, layout, guard; the meta's step, tokens and recipe) and the checkpointer
adds the engine's (weights, optimizer, scheduler). It keeps:

- the cadence: every `train.save_every` steps, at the last step, and when the
  run stops (signal or `train.stop_after_steps`);
- the save in flight: with `train.checkpoint_async` (sharded format) a save
  writes its shards in the background and is committed at the next save; the
  last save and a stop save are written in the foreground;
- the last good checkpoint: the newest one known to hold finite weights,
  where a rewind (`train.spike_rewind`) goes back to and what an error
  message names;
- what a failed save means: a checkpoint with non-finite weights stops the run
  (the weights diverged); a failed write is one warning line and the previous
  checkpoint stays, unless it is the last save or the disk has no room for the
  next one, which stop the run (TrainingError, one line).

Every method here that saves or restores is a collective: every rank calls it
at the same point. Only rank 0 holds a CheckpointManager (which prunes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from loom.trainer.checkpoint.dcp import PendingSave, is_sharded, load_sharded, save_sharded
from loom.trainer.checkpoint.layout import restore_rng
from loom.trainer.checkpoint.manager import (CheckpointError, CheckpointManager, NonFiniteCheckpoint, read_meta,
                                             step_dir_name)
from loom.trainer.checkpoint.resume_policy import apply_optim_settings
from loom.trainer.reliability.guard import TrainingError, resume_advice

Problem = tuple[str, str]   # (kind, one-line message); kind "nonfinite" or "write"


class Checkpointer:
    """Saves, restores and rewinds one run's checkpoints.

    run_dir: the run folder; manager: its CheckpointManager on rank 0, None on
    the other ranks; env: this process's Env; engine: the loop's engine; guard: the StepGuard
    (its state is saved, and a save resets its spike count); metrics: the
    MetricsWriter (failed saves and rewinds are lines there); train: train.*
    (save_every, steps, checkpoint_format, checkpoint_async); optim: optim.*
    (re-applied after a restore; its lr is in the advice after divergence);
    seed: the run's seed (a reseed across world sizes); say: prints a warning
    line; last_good: the checkpoint the run resumed from, if any.
    """

    def __init__(self, run_dir: Path, manager: CheckpointManager | None, env, engine, guard, metrics, train, optim,
                 seed: int, say: Callable[[str], None], last_good: str | None = None):
        self.run_dir, self.manager, self.env, self.engine = Path(run_dir), manager, env, engine
        self.guard, self.metrics = guard, metrics
        self.train, self.optim, self.seed, self.say = train, optim, seed, say
        self.last_good = last_good
        self.pending: PendingSave | None = None   # a background save not yet committed

    def due(self, step: int, stopping: bool) -> bool:
        """Whether the loop saves after `step` (steps done)."""
        return step % self.train.save_every == 0 or step == self.train.steps or stopping

    # ------------------------------------------------------------------ saving

    def save(self, step: int, final: bool, contents: Callable[[], tuple[dict, dict]]) -> None:
        """Commit the save in flight, then save `step` (in the background when async and not
        `final`); go on, or raise TrainingError naming the last good checkpoint.
        contents() -> (state, meta), called once every rank is ready to write."""
        if self.pending is not None:
            done, self.pending = self.pending, None
            self._outcome(done.step, done.finish(), final=False)
        if self.train.checkpoint_async and not final:
            self.pending = self._write(step, *contents(), background=True)
            if self.pending.problem is not None:
                done, self.pending = self.pending, None
                self._outcome(step, done.problem, final=False)
            return
        self._outcome(step, self._write(step, *contents()), final)

    def _write(self, step: int, state: dict, meta: dict, background: bool = False):
        """A collective: None, or the Problem on every rank; with `background`, a PendingSave
        whose finish() returns that later."""
        if self.train.checkpoint_format == "sharded":
            state["engine"] = {"scheduler": self.engine.scheduler.state_dict()}
            if background:
                return PendingSave(self.manager, self.env, self.engine, step, state, meta)
            return save_sharded(self.manager, self.env, self.engine, step, state, meta)
        tensors, state["engine"] = self.engine.checkpoint_state()
        problem = None
        if self.env.is_main:
            try:
                self.manager.save(step, tensors, state, meta)
            except NonFiniteCheckpoint as e:
                problem = ("nonfinite", str(e))
            except CheckpointError as e:
                problem = ("write", str(e))
        return self.env.broadcast_object(problem)

    def _outcome(self, step: int, problem: Problem | None, final: bool) -> None:
        if problem is None:
            self.last_good = str(self.run_dir / "checkpoints" / step_dir_name(step))
            self.guard.checkpointed()
            return
        kind, message = problem
        room = kind == "write" and self.env.broadcast_object(
            self.manager.has_room_for_next() if self.env.is_main else None)
        self.metrics.write({"step": step, "event": "checkpoint_failed", "reason": message})
        if kind == "nonfinite":
            raise TrainingError(f"{message}: the weights diverged by step {step}; "
                                + resume_advice(self.last_good, self.optim.lr))
        if final or not room:
            raise TrainingError(f"{message}; stopping (not enough free space to go on). "
                                f"The last good checkpoint is {self.last_good or 'none'}")
        self.say(f"warning: {message}; the previous checkpoint is intact, training goes on to the next save")

    # ------------------------------------------------------------------ restoring

    def restore(self, path: str | Path) -> tuple[dict, dict]:
        """Load the checkpoint at `path` into the engine, the guard and the RNGs; returns its
        (state, meta). Every rank reads the (verified) files itself."""
        manager = self.manager or CheckpointManager(Path(path).parent.parent)
        if is_sharded(path):
            _, state, meta = manager.load(path, weights=False)
            load_sharded(self.engine, path, self.env)
            self.engine.scheduler.load_state_dict(state["engine"]["scheduler"])
        else:
            tensors, state, meta = manager.load(path)
            self.engine.load_checkpoint_state(tensors, state["engine"])
        apply_optim_settings(self.engine, self.optim)
        self.guard.load_state_dict(state.get("guard"))
        restore_rng(state["rng"], self.env, self.seed, meta["step"])
        return state, meta

    def rewind(self, at_step: int, position: int) -> tuple[int, int]:
        """Back to the last good checkpoint after the guard's spikes at `at_step`; the data
        position (`position`, windows read) stays, so the windows since are skipped.
        Returns the checkpoint's (step, tokens)."""
        spikes = self.guard.spikes
        skip_from = self.restore(self.last_good)[0]["data"]["position"]
        meta = read_meta(self.last_good)
        self.guard.checkpointed()
        self.metrics.truncate_after(meta["step"])
        self.metrics.write({"step": meta["step"], "event": "rewind", "from_step": at_step, "spikes": spikes,
                            "skipped_windows": [skip_from, position]})
        self.say(f"warning: {len(spikes)} loss spikes (steps {spikes}); rewound from step {at_step} to "
                 f"{Path(self.last_good).name}, skipping windows {skip_from}..{position - 1}")
        return meta["step"], meta["tokens"]
