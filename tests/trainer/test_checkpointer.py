"""The Checkpointer (trainer/checkpoint/checkpointer.py) on its own, one process: the save
cadence, the last good checkpoint, what a failed save means (a non-finite checkpoint
stops, a failed write warns unless it is the last save), and restore / rewind putting
back the engine's weights, the guard and the data position. The loop's use of it
(SIGTERM, async sharded saves, rewind in a run) is in tests/reliability. About 2 s."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.trainer.checkpoint.checkpointer import Checkpointer
from loom.trainer.checkpoint.manager import CheckpointError, CheckpointManager, rng_state
from loom.trainer.config import OptimConfig, TrainConfig
from loom.trainer.distributed.dist import Env
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.observe.metrics import MetricsWriter
from loom.trainer.reliability.guard import StepGuard, TrainingError


def _checkpointer(tmp_path, **train):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=["attn"]))
    engine = SingleEngine(model, OptimConfig(), total_steps=10)
    guard = StepGuard(max_bad_steps=3, spike_skip=2.0, spike_rewind=1)
    said = []
    ckpt = Checkpointer(tmp_path, CheckpointManager(tmp_path), Env(), engine, guard, MetricsWriter(tmp_path),
                        replace(TrainConfig(), steps=10, save_every=3, **train), OptimConfig(), 0, said.append)
    return ckpt, said


def _contents(position: int = 0, step: int = 0):
    def contents():
        return ({"data": {"position": position}, "rng": rng_state(), "layout": {}, "guard": {}},
                {"step": step, "tokens": 100 * step})
    return contents


def _events(tmp_path) -> list[dict]:
    return [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def test_save_cadence(tmp_path):
    ckpt, _ = _checkpointer(tmp_path)
    assert [s for s in range(1, 11) if ckpt.due(s, stopping=False)] == [3, 6, 9, 10]
    assert ckpt.due(4, stopping=True)


def test_a_save_becomes_the_last_good_checkpoint(tmp_path):
    ckpt, said = _checkpointer(tmp_path)
    ckpt.guard.spikes = [2]
    ckpt.save(3, final=False, contents=_contents(step=3))
    assert ckpt.last_good == str(tmp_path / "checkpoints" / "step-00000003")
    assert (tmp_path / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    assert ckpt.guard.spikes == [] and said == []   # spikes before a checkpoint cannot be rewound


def test_non_finite_weights_stop_the_run(tmp_path):
    ckpt, _ = _checkpointer(tmp_path)
    ckpt.save(3, final=False, contents=_contents(step=3))
    with torch.no_grad():
        next(ckpt.engine.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"diverged by step 6.*step-00000003"):
        ckpt.save(6, final=False, contents=_contents(step=6))
    assert _events(tmp_path)[-1]["event"] == "checkpoint_failed"
    assert ckpt.last_good.endswith("step-00000003")


def test_a_failed_write_warns_then_stops_at_the_last_save(tmp_path, monkeypatch):
    ckpt, said = _checkpointer(tmp_path)
    ckpt.save(3, final=False, contents=_contents(step=3))

    def full(*args, **kwargs):
        raise CheckpointError("cannot save step-00000006: no space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full)
    ckpt.save(6, final=False, contents=_contents(step=6))
    assert len(said) == 1 and "the previous checkpoint is intact" in said[0]
    assert ckpt.last_good.endswith("step-00000003")
    with pytest.raises(TrainingError, match=r"no space left.*last good checkpoint is .*step-00000003"):
        ckpt.save(10, final=True, contents=_contents(step=10))


def test_restore_and_rewind_put_back_the_saved_weights(tmp_path):
    ckpt, said = _checkpointer(tmp_path)
    saved = {n: p.detach().clone() for n, p in ckpt.engine.model.named_parameters()}
    ckpt.save(3, final=False, contents=_contents(position=24, step=3))
    with torch.no_grad():
        for p in ckpt.engine.model.parameters():
            p.add_(1.0)
    ckpt.guard.spikes = [5]
    step, tokens = ckpt.rewind(at_step=5, position=40)
    assert (step, tokens) == (3, 300)
    for n, p in ckpt.engine.model.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n
    assert ckpt.guard.spikes == []
    event = _events(tmp_path)[-1]
    assert event == {"step": 3, "event": "rewind", "from_step": 5, "spikes": [5], "skipped_windows": [24, 40]}
    assert "rewound from step 5 to step-00000003, skipping windows 24..39" in said[-1]
