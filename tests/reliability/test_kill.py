"""kill -9 at exact points (inside a checkpoint save, in the middle of a metrics line) and at random times:
after every restart the run resumes from an intact checkpoint, no metrics step appears twice, and the
losses equal an uninterrupted run's. One kill inside a save runs in the default tier; the sweep of every
kill point and the random-time loop are marked slow (each kill costs a fresh interpreter)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.reliability.faults import KILL_ENV


def _train(recipe, run, env=None, timeout=120):
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_killed(proc):
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def test_kill_inside_a_save_resumes_exactly(recipe, tmp_path, run_cli, same_losses):
    run = tmp_path / "run"
    _assert_killed(_train(recipe, run, {KILL_ENV: "checkpoint.manifest:2"}))  # inside the save of step 4
    assert CheckpointManager(run).latest_valid().name == "step-00000002"
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and f"resumed {run} from step 2" in out and "Traceback" not in err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    same_losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint.payload:1", "checkpoint.latest:2", "checkpoint.prune:3",
                                   "checkpoint.prune:4", "metrics.line:3", "metrics.line:6"])
def test_kill_at_every_point_resumes_exactly(point, recipe, tmp_path, run_cli, same_losses):
    run = tmp_path / "run"
    _assert_killed(_train(recipe, run, {KILL_ENV: point}))
    rc, _, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err
    same_losses(run)


@pytest.mark.slow
def test_random_kills_resume_exactly(recipe, tmp_path, run_cli, same_losses):
    """Six kill -9s at random moments (start-up, steps, saves), then a final uninterrupted finish."""
    run = tmp_path / "run"
    rng = random.Random(15)
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(6):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(4.0, 12.0))
        proc.kill()
        _, err = proc.communicate()
        assert "Traceback" not in err, err[-2000:]
        if proc.returncode == 0:  # finished before the kill; restart from scratch for a new trial
            break
    rc, _, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err
    same_losses(run)
