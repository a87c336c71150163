"""metrics.jsonl (one JSON object per logged step or evaluation) and TensorBoard.

Train lines: step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s.
Eval lines:  step, split ("val"), loss, ppl, and evaluation extras.
Event lines: step, event ("skip" | "rewind" | "checkpoint_failed"), reason and details (trainer/reliability/guard.py).

Append safety: a resumed run first truncates the file back to its checkpoint's
step (a fresh start to step 0), so no step is ever logged twice; a line torn by
a crash or a full disk is dropped with a warning naming the file; a failed
append (ENOSPC, EIO) is cut back to the last whole line and reported in one
line, and the run goes on (the checkpoint path decides whether it can).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from loom.trainer.reliability.faults import KILL_ENV, kill_point


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else [round(float(x), 6) for x in v.flatten()]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsError(ValueError):
    """metrics.jsonl cannot be read or replaced; the message is one user-facing line."""


def _parse_lines(path: Path, warn=None) -> list[tuple[str, dict]]:
    """(line, record) of every whole JSON line; a torn or garbled line is dropped with one warning."""
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise MetricsError(f"cannot read {path} ({e.strerror}); a resumed run rewrites it: move it aside "
                           "(the run starts a new one) or make it a readable file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if warn is not None:
                warn(f"warning: {path}: dropping unreadable line {n} (torn by a crash or a full disk?)")
            continue
        out.append((line, record))
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """Every whole record of a run folder's metrics.jsonl, in order."""
    return [r for _, r in _parse_lines(Path(run_dir) / "metrics.jsonl")]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss of a run folder (the train lines of metrics.jsonl)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "split" not in r and "event" not in r}


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (the seam tests wrap to simulate a full disk)."""
    view = memoryview(data)
    if os.environ.get(KILL_ENV, "").startswith("metrics.line"):  # test hook: die with half a line written
        view = view[os.write(fd, view[: len(view) // 2]):]
        kill_point("metrics.line")
    while view:
        view = view[os.write(fd, view):]


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, warn=print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.warn = warn
        self.failed_writes = 0
        self.tb = None
        if enabled and self.path.exists():  # before anything is written beside it (tb/)
            try:
                with open(self.path, "rb"):
                    pass
            except OSError as e:
                raise MetricsError(f"cannot read {self.path} ({e.strerror}); a resumed run rewrites it: move it "
                                   "aside (the run starts a new one) or make it a readable file") from None
            try:
                with open(self.path, "ab"):  # appends nothing; an existing file is neither created nor changed
                    pass
            except OSError as e:
                raise MetricsError(f"cannot write {self.path} ({e.strerror}); make it writable (or move it aside: "
                                   "the run starts a new one)") from None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # the `tb` extra is optional
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs them; step 0: a fresh start) and torn lines."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line, record in _parse_lines(self.path, self.warn) if record["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MetricsError(f"cannot rewrite {self.path} ({e.strerror}); make it and its folder writable") from None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        try:
            self._append(json.dumps(record) + "\n")
        except OSError as e:
            self.failed_writes += 1
            self.warn(f"warning: could not write {self.path} (errno {e.errno}, {e.strerror}); "
                      f"step {record.get('step')} is missing from it")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def _append(self, text: str) -> None:
        """Append one line, or on failure cut the file back to its last whole line and re-raise."""
        data = text.encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                _write_all(fd, data)
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
