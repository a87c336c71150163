"""One owner per run folder: an advisory lock on ``<output_dir>/.lock``.

The lock is ``fcntl.flock`` on that file, held by the training process (rank 0
of a distributed run) from start-up to exit; the kernel releases it when the
process dies, even by kill -9, so a lock can never outlive its owner. The file
also holds one line naming the owner (pid, host, start time): a second run on
the same folder fails with that line, and a run that takes over a file whose
owner died without releasing (a crash) says so. The file itself is never
deleted while the folder holds anything else (deleting a lock file races with
a process that is about to lock it); a run that fails before writing anything
removes the folder it created, so bad input never leaves an empty run folder.

flock is advisory and local: it does not stop a process that ignores it, and
on some network file systems it only excludes processes of the same host.

Example::

    lock = RunLock("runs/debug")
    problem = lock.acquire()        # None, or "run folder runs/debug is in use by ..." (or not writable)
    ...
    lock.release()
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False  # acquire() made run_dir
        self.stale_owner: str | None = None  # set by acquire when a dead owner's line was found

    def acquire(self) -> str | None:
        """Take the lock; return None, or a one-line reason naming the process that holds it."""
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return (f"cannot create run folder {self.run_dir} ({e.strerror}); make its parent writable "
                    "or choose another output_dir")
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            return (f"run folder lock {self.path} is not a file; remove it (it holds no state) "
                    "or choose another output_dir")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return (f"cannot open the run folder lock {self.path} ({e.strerror}); make {self.run_dir} and the "
                    "file writable (a read-only folder cannot be trained in) or choose another output_dir")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd) or "another process"
            os.close(fd)
            return (f"run folder {self.run_dir} is in use by {owner}; wait for it to finish, stop it, "
                    "or choose another output_dir")
        except OSError as e:
            os.close(fd)
            return (f"cannot lock {self.path} ({e.strerror}; a file system without flock?); "
                    "choose an output_dir on a local disk")
        self.stale_owner = _read(fd) or None  # a line left behind means its owner died holding the lock
        host = socket.gethostname()
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {host} (started {started})\n".encode(), 0)
            os.fsync(fd)
        except OSError as e:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return (f"cannot write the run folder lock {self.path} ({e.strerror}); make it writable "
                    "or choose another output_dir")
        self._fd = fd
        problem = unwritable(self.run_dir, self.run_dir / "checkpoints")
        if problem is not None:
            self.release()
            return problem
        return None

    def release(self) -> None:
        """Clear the owner line and unlock (also done by the kernel when the process exits)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # the file became read-only meanwhile: the stale line only says who held it
            pass
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # still locked by us: nobody can be waiting on this file
            self.run_dir.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def unwritable(*folders: Path) -> str | None:
    """One line naming the first existing folder a file cannot be created in (read-only mount,
    immutable folder, permissions), found by creating and removing a probe file; None if all can."""
    for folder in folders:
        if not folder.is_dir():
            continue
        probe = folder / f".loom-write-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(probe)
        except OSError as e:
            return (f"run folder {folder} is not writable ({e.strerror}); a run writes its checkpoints and "
                    "metrics there: make it writable, or copy the run elsewhere and point output_dir at the copy")
    return None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
