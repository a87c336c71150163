"""Files a run writes to or reads its state from, when they are unwritable or unreadable: a read-only
run folder or checkpoints folder, a lock file that is a directory or cannot be written, a `latest`
pointer holding bytes that are not text (or a directory), a metrics.jsonl that cannot be read, an
unreadable checkpoint file or manifest.

Each case either stops the run before a step in one `error:` line naming the path (nothing in the
run folder changed; once repaired, the run resumes from step 4 with the losses of an uninterrupted
run), or takes the safe fallback (scan the checkpoints, newest valid first) and resumes exactly.

We run as root, which reads and writes through permission bits, so "read-only" is `chattr +i`
(immutable; skipped where the file system lacks it) and "unreadable" is a directory where a file is
expected, or an `open` that raises PermissionError."""
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

import loom.trainer.checkpoint.manager as manager_mod


def snapshot(root: Path) -> dict:
    """Every entry under root: a folder, or a file with its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _chattr(flag: str, *paths: Path) -> None:
    r = subprocess.run(["chattr", "-R", flag, *map(str, paths)], capture_output=True)
    if r.returncode:
        pytest.skip(f"chattr unsupported here: {r.stderr.decode().strip()}")


@pytest.fixture
def immutable():
    """chattr +i on paths (a read-only file or folder even for root); undone after the test."""
    done = []

    def make(*paths):
        _chattr("+i", *paths)
        done.extend(paths)
    yield make
    if done:
        subprocess.run(["chattr", "-R", "-i", *map(str, done)], capture_output=True)


def _lock_dir(run, immutable):
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").mkdir()
    return lambda: (run / ".lock").rmdir()


def _latest_dir(run, immutable):
    (run / "checkpoints" / "latest").rename(run / "latest.aside")
    (run / "checkpoints" / "latest").mkdir()
    return lambda: ((run / "checkpoints" / "latest").rmdir(),
                    (run / "latest.aside").rename(run / "checkpoints" / "latest"))


def _metrics_dir(run, immutable):
    (run / "metrics.jsonl").rename(run / "metrics.aside")
    (run / "metrics.jsonl").mkdir()
    return lambda: ((run / "metrics.jsonl").rmdir(), (run / "metrics.aside").rename(run / "metrics.jsonl"))


def _immutable(*rel):
    def damage(run, immutable):
        (run / ".lock").touch()
        immutable(*(run / r for r in rel))
        return lambda: _chattr("-i", *(run / r for r in rel))
    return damage


STOPS = {  # damage(run, immutable) -> repair; what the error line names
    "read_only_run_folder": (_immutable("."), "{run}/.lock"),
    "read_only_lock_file": (_immutable(".lock"), "{run}/.lock"),
    "read_only_checkpoints": (_immutable("checkpoints"), "{run}/checkpoints is not writable"),
    "read_only_metrics": (_immutable("metrics.jsonl"), "{run}/metrics.jsonl"),
    "lock_is_a_directory": (_lock_dir, "{run}/.lock is not a file"),
    "latest_is_a_directory": (_latest_dir, "{run}/checkpoints/latest is not a file"),
    "metrics_is_a_directory": (_metrics_dir, "cannot read {run}/metrics.jsonl"),
}


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_stops_before_a_step_then_resumes(kind, stopped, tmp_path, run_cli, immutable, same_losses):
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / ".lock").touch()
    damage, needle = STOPS[kind]
    repair = damage(run, immutable)
    before = snapshot(run)
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.format(run=run) in lines[0], lines[0]
    assert "train step" not in out and "step 5" not in out
    assert snapshot(run) == before  # nothing written, nothing deleted
    repair()
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0, err
    assert f"resumed {run} from step 4" in out
    same_losses(run)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00\x81\x00garbage", b"\x00" * 64, "step-0000000\u00e9".encode()])
def test_latest_with_bytes_that_are_not_text_scans_the_checkpoints(pointer, stopped, tmp_path, run_cli, same_losses):
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "checkpoints" / "latest").write_bytes(pointer)
    assert manager_mod.CheckpointManager(run).latest_valid(log=print).name == "step-00000004"
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err, err
    assert f"resumed {run} from step 4" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    same_losses(run)


def test_unreadable_manifest_falls_back(stopped, tmp_path, run_cli, same_losses):
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)
    manifest = run / "checkpoints" / "step-00000004" / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err, err
    warn = [l for l in (out + err).splitlines() if l.startswith("warning: skipping corrupt checkpoint")]
    assert len(warn) == 1 and "step-00000004 (unreadable manifest (Is a directory))" in warn[0], warn
    assert f"resumed {run} from step 2" in out
    same_losses(run)


def test_unreadable_checkpoint_file_falls_back(stopped, tmp_path, run_cli, same_losses, monkeypatch):
    """open() of the newest checkpoint's weights fails with EACCES (what a non-root user sees on a
    file without read permission): that checkpoint is skipped in one warning, the older one used."""
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)
    bad = run / "checkpoints" / "step-00000004" / "model.safetensors"

    def guarded_open(path, *a, **k):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(manager_mod, "open", guarded_open, raising=False)
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err, err
    warn = [l for l in (out + err).splitlines() if l.startswith("warning: skipping corrupt checkpoint")]
    assert len(warn) == 1 and "(unreadable file model.safetensors (Permission denied))" in warn[0], warn
    assert f"resumed {run} from step 2" in out
    monkeypatch.undo()
    assert manager_mod.CheckpointManager(run).latest_valid(log=print).name == "step-00000008"
    same_losses(run)
