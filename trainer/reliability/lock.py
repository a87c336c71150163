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
    problem = lock.acquire()        # None, or "run folder runs/debug is in use by ..."
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd) or "another process"
            os.close(fd)
            return (f"run folder {self.run_dir} is in use by {owner}; wait for it to finish, stop it, "
                    "or choose another output_dir")
        self.stale_owner = _read(fd) or None  # a line left behind means its owner died holding the lock
        host = socket.gethostname()
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {host} (started {started})\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        """Clear the owner line and unlock (also done by the kernel when the process exits)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # still locked by us: nobody can be waiting on this file
            self.run_dir.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
