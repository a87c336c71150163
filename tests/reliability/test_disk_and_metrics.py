"""A full disk and a torn metrics file: a checkpoint write failing with ENOSPC is one line naming the path
and errno, the previous checkpoint stays intact, and the run goes on when space allows or stops cleanly
when it does not (then resumes exactly); a failed metrics append leaves no torn line; a torn last line is
dropped with a warning naming the file; a fresh start clears the lines of an earlier attempt."""
import errno
import os

import loom.trainer.checkpoint.manager as checkpoint
import loom.trainer.observe.metrics as metrics
from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.observe.metrics import read_metrics


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail_save_file_at(monkeypatch, failing_calls):
    """safetensors' writer that writes a few bytes, then hits a full disk, on the listed calls."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) in failing_calls:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise _enospc(path)
        real(tensors, path)
    monkeypatch.setattr(checkpoint, "save_file", save_file)


def test_failed_save_with_room_goes_on(recipe, tmp_path, run_cli, monkeypatch, same_losses):
    run = tmp_path / "run"
    _fail_save_file_at(monkeypatch, {2})  # the save of step 4
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in out + err
    [line] = [l for l in out.splitlines() if "could not save checkpoint" in l]
    assert line.startswith("warning: could not save checkpoint step-00000004: [Errno 28] No space left on device: ")
    assert "model.safetensors" in line and line.endswith("training goes on to the next save")
    assert [s for s, _ in CheckpointManager(run).list()] == [6, 8]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    [event] = [r for r in read_metrics(run) if r.get("event") == "checkpoint_failed"]
    assert event["step"] == 4
    same_losses(run)


def test_full_disk_stops_cleanly_and_resumes(recipe, tmp_path, run_cli, monkeypatch, same_losses):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        saves = []
        real_free = checkpoint.free_bytes
        # after the first checkpoint, the disk holds less than one more
        m.setattr(checkpoint, "free_bytes", lambda p: real_free(p) if len(saves) < 1 else 1000)
        real_save = CheckpointManager.save
        m.setattr(CheckpointManager, "save", lambda self, *a, **k: (saves.append(1), real_save(self, *a, **k))[1])
        rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in out + err
    assert err.startswith("error: could not save checkpoint step-00000004: [Errno 28] 0.0 MiB free, the last "
                          f"checkpoint took ")
    assert f"stopping (not enough free space to go on). The last good checkpoint is {run / 'checkpoints'}" in err
    assert CheckpointManager(run).latest_valid().name == "step-00000002"
    rc, out, _ = run_cli("train", recipe, f"output_dir={run}")  # space is back
    assert rc == 0 and f"resumed {run} from step 2" in out
    same_losses(run)


def test_failed_metrics_append_leaves_no_torn_line(recipe, tmp_path, run_cli, monkeypatch, same_losses):
    run = tmp_path / "run"
    real, calls = metrics._write_all, []

    def write_all(fd, data):
        calls.append(1)
        if len(calls) == 3:
            os.write(fd, data[:7])
            raise _enospc(run / "metrics.jsonl")
        real(fd, data)
    monkeypatch.setattr(metrics, "_write_all", write_all)
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0
    assert (f"warning: could not write {run / 'metrics.jsonl'} (errno 28, No space left on device); "
            "step 3 is missing from it") in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
    assert sorted(r["step"] for r in read_metrics(run) if "split" not in r) == [1, 2, 4, 5, 6, 7, 8]


def test_torn_last_line_is_dropped_with_a_warning(recipe, tmp_path, run_cli, same_losses):
    run = tmp_path / "run"
    rc, _, _ = run_cli("train", recipe, f"output_dir={run}", "train.stop_after_steps=4")
    assert rc == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 5.1, "lr"')  # what a crash in the middle of an append leaves
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0
    assert f"warning: {run / 'metrics.jsonl'}: dropping unreadable line" in err
    same_losses(run)


def test_fresh_start_clears_an_earlier_attempt(recipe, tmp_path, run_cli, same_losses):
    run = tmp_path / "run"
    run.mkdir()
    # a kill -9 before the first checkpoint leaves lines but no checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "split": "val", "loss": 9.0}\n')
    rc, _, _ = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0
    same_losses(run)
