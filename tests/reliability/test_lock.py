"""One owner per run folder: a second `loom train` on a locked folder is refused in one line naming the
owner (in-process and with a real concurrent process), a dead owner's lock is taken over, and the lock is
released when a run ends."""
import os
import subprocess
import sys
import time

from loom.trainer.reliability.lock import RunLock
from loom.trainer.observe.metrics import read_metrics


def test_locked_folder_is_refused(recipe, tmp_path, run_cli):
    run = tmp_path / "run"
    holder = RunLock(run)
    assert holder.acquire() is None
    try:
        rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    finally:
        holder.release()
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: run folder {run} is in use by process {os.getpid()} on ")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    # released: the same command now runs, and releases the lock when it ends
    rc, _, _ = run_cli("train", recipe, f"output_dir={run}", "train.steps=1")
    assert rc == 0 and RunLock(run).acquire() is None


def test_dead_owner_is_taken_over(recipe, tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("process 4194000 on elsewhere (started 2026-01-01 00:00:00 UTC)\n")
    rc, out, _ = run_cli("train", recipe, f"output_dir={run}", "train.steps=1")
    assert rc == 0
    assert "run folder lock: taking over from process 4194000 on elsewhere" in out


def test_concurrent_process_is_refused(recipe, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}", "train.steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        lock_file = run / ".lock"
        while not (lock_file.exists() and lock_file.read_text()):  # the first run holds the lock
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip() == second.stderr.strip().splitlines()[0]
        assert f"is in use by process {first.pid} on " in second.stderr
        assert first.poll() is None  # the owner is undisturbed
    finally:
        first.kill()
        first.wait()
    if (run / "metrics.jsonl").exists():
        steps = [r["step"] for r in read_metrics(run) if "split" not in r and "event" not in r]
        assert steps == sorted(set(steps))  # one writer: no interleaved or repeated steps
