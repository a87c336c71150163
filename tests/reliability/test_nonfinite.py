"""Never apply or checkpoint a diverged update: a NaN gradient (injected by the LOOM_TEST_NAN_STEPS hook)
skips its step and is logged; max_bad_steps stops the run naming the last good checkpoint; weights that
turn non-finite are never saved and never prune a good checkpoint; a lower lr on resume takes effect;
loss spikes are skipped and, after n of them, the run rewinds to its checkpoint and skips their data."""
import pytest
import torch

import loom.trainer.train as train_mod
from loom.trainer.checkpoint.manager import CheckpointManager, NonFiniteCheckpoint
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.reliability.faults import NAN_STEPS_ENV
from loom.trainer.reliability.guard import StepGuard
from loom.trainer.observe.metrics import read_metrics, train_losses


def _events(run, kind):
    return [r for r in read_metrics(run) if r.get("event") == kind]


def _assert_checkpoints_finite(run):
    manager = CheckpointManager(run)
    assert manager.list()
    for _, path in manager.list():
        tensors, _, _ = manager.load(path)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), path


def test_nan_gradient_skips_the_step(recipe, tmp_path, run_cli, monkeypatch, reference):
    run = tmp_path / "run"
    monkeypatch.setenv(NAN_STEPS_ENV, "3")
    rc, out, _ = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "warning: step 3: nonfinite grad norm; update skipped" in out
    [skip] = _events(run, "skip")
    assert skip["step"] == 3 and skip["reason"] == "nonfinite_grad_norm"
    losses = train_losses(run)
    assert losses[1] == reference[1] and losses[2] == reference[2]
    assert losses[4] != reference[4]  # step 3's update was not applied
    _assert_checkpoints_finite(run)


def test_max_bad_steps_names_the_last_good_checkpoint_and_lower_lr_resumes(recipe, tmp_path, run_cli,
                                                                           monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(NAN_STEPS_ENV, "3,4,5,6")
    rc, _, err = run_cli("train", recipe, f"output_dir={run}", "train.max_bad_steps=3")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: 3 consecutive steps with a non-finite loss or gradient norm (last at step 5); "
                          f"the last good checkpoint is {run / 'checkpoints' / 'step-00000004'}; "
                          "run the same command with optim.lr=0.0003")
    _assert_checkpoints_finite(run)
    monkeypatch.delenv(NAN_STEPS_ENV)
    rc, out, _ = run_cli("train", recipe, f"output_dir={run}", "train.max_bad_steps=3", "optim.lr=0.0003")
    assert rc == 0 and "resumed" in out and "optim.lr 0.003 -> 0.0003" in out
    lr5 = next(r["lr"] for r in read_metrics(run) if r["step"] == 5 and "loss" in r and "event" not in r)
    assert lr5 < 0.0003 * 1.0001  # the new base lr is in force (cosine decay below it)
    _assert_checkpoints_finite(run)


def test_non_finite_weights_are_never_saved_nor_prune_good_ones(recipe, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"
    step = SingleEngine.step
    calls = []

    def diverging_step(self):
        norm = step(self)
        calls.append(1)
        if len(calls) == 5:  # the update of step 5 leaves NaN weights behind, with a finite loss and norm
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return norm
    monkeypatch.setattr(SingleEngine, "step", diverging_step)
    rc, _, err = run_cli("train", recipe, f"output_dir={run}", "train.keep_last=1")
    assert rc == 2 and err.count("\n") == 1
    assert "not saving step-00000006: tensor" in err and "holds NaN or inf: the weights diverged by step 6" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-00000004'}" in err
    assert [s for s, _ in CheckpointManager(run).list()] == [4]  # kept, although keep_last=1 and 6 came later
    assert CheckpointManager(run).latest_valid().name == "step-00000004"
    _assert_checkpoints_finite(run)


def test_manager_refuses_non_finite_tensors(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, {"w": torch.ones(3)}, {})
    with pytest.raises(NonFiniteCheckpoint, match="tensor w holds NaN or inf"):
        manager.save(2, {"w": torch.tensor([1.0, float("inf"), 0.0])}, {})
    assert [s for s, _ in manager.list()] == [1] and manager.latest_valid().name == "step-00000001"


def test_guard_spike_rule():
    guard = StepGuard(max_bad_steps=3, spike_skip=2.0, spike_window=4, spike_rewind=2)
    for step, loss in enumerate([9.0, 2.0, 2.0, 2.0, 2.0], 1):  # the window keeps the last four
        assert guard.check_loss(loss) is None
        assert guard.record(step, loss, 1.0, None) is None
    assert guard.check_loss(3.9) is None and guard.check_loss(4.1) == "spike"
    assert guard.check_loss(float("inf")) == "nonfinite_loss"
    event = guard.record(6, 4.1, float("nan"), "spike")
    assert event == {"step": 6, "event": "skip", "reason": "spike", "loss": 4.1, "running_mean": 2.0}
    assert not guard.should_rewind
    guard.record(7, 5.0, float("nan"), "spike")
    assert guard.should_rewind and guard.spikes == [6, 7]
    guard.checkpointed()
    assert not guard.should_rewind
    for step in (8, 9, 10):
        assert guard.record(step, 2.0, float("nan"), None)["reason"] == "nonfinite_grad_norm"
    assert guard.should_stop


def test_spikes_rewind_to_the_checkpoint_and_skip_their_windows(recipe, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"
    check = StepGuard.check_loss
    calls = []

    def spikes_at_5_and_6(self, loss):
        calls.append(1)
        return "spike" if len(calls) in (5, 6) else check(self, loss)
    monkeypatch.setattr(StepGuard, "check_loss", spikes_at_5_and_6)
    rc, out, _ = run_cli("train", recipe, f"output_dir={run}", "train.spike_skip=3", "train.spike_rewind=2")
    assert rc == 0
    assert "rewound from step 6 to step-00000004, skipping windows 8..11" in out
    [rewind] = _events(run, "rewind")
    assert rewind == {"step": 4, "event": "rewind", "from_step": 6, "spikes": [5, 6], "skipped_windows": [8, 12]}
    steps = [r["step"] for r in read_metrics(run) if "split" not in r and "event" not in r]
    assert steps == list(range(1, 9))  # no step twice, although 5 and 6 ran twice
    _, state, _ = CheckpointManager(run).load(CheckpointManager(run).latest_valid())
    assert state["data"]["position"] == 8 * 2 + 4  # 8 steps of 2 windows, plus the 4 skipped
