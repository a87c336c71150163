"""Atomic, checksummed checkpoints of one training run.

Layout of a run folder::

    <run_dir>/checkpoints/
        step-00000040/              one finished checkpoint
            model.safetensors       model tensors (contiguous, CPU)
            trainer_state.pt        optimizer, scheduler, RNG states, data position (torch.save)
            meta.json               JSON: step, config dump, loss, versions, ...
            manifest.json           {"format": 1, "step": 40, "files": {name: {"sha256", "bytes"}}}
        latest                      text file naming the checkpoint to resume from

Why a crash never damages the run: a save writes everything into
``checkpoints/.tmp-step-NNNNNNNN-<pid>/``, hashes and fsyncs every file, writes
the manifest last, and only then renames the folder to ``step-NNNNNNNN`` (one
atomic rename on a POSIX file system), points ``latest`` at it (``os.replace``
of a small file) and prunes old checkpoints (renamed into a ``.tmp-`` folder
before deletion, so a half-deleted checkpoint is never visible). Re-saving an
existing step moves the old folder aside to ``.old-step-NNNNNNNN-<pid>`` for
the moment of the swap; if the process dies in that moment, the next manager
renames it back. Leftover ``.tmp-*`` entries of dead processes are deleted when
a manager is created and before every save.

Refusals that protect the good checkpoints: ``save`` writes nothing when a
floating-point tensor is not finite (NonFiniteCheckpoint; a diverged model
never replaces or prunes a good one), and nothing when the file system has
less free space than the newest checkpoint took (CheckpointError naming the
folder, ENOSPC); a write that fails anyway (a full disk) removes its temporary
folder and raises CheckpointError with the path and errno, leaving ``latest``
and every finished checkpoint untouched.

One writer per run folder (trainer/reliability/lock.py enforces it for `loom train`).
Cleaning leftovers skips entries whose pid is a live process on this host, so
a reader (``loom eval`` on a live run) does not delete the trainer's in-flight
save.

Sharded checkpoints (trainer/checkpoint/dcp.py) use the two halves of ``save``: the
coordinator calls ``begin`` (leftovers, free space, temporary folder), every
rank writes its shards into that folder under ``dcp/``, and the coordinator
calls ``commit`` (meta, manifest over every file found recursively, rename,
``latest``, prune). ``load`` consolidates their full weights on demand.

Example::

    manager = CheckpointManager("runs/debug", keep_last=3)
    manager.save(step, model.state_dict(), {"optim": opt.state_dict(), "rng": rng_state()},
                 meta={"loss": 2.31})
    path = manager.latest_valid()
    if path is not None:
        tensors, state, meta = manager.load(path)
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from loom.trainer.reliability.faults import kill_point

FORMAT = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
SHARD_DIR = "dcp"  # sharded checkpoints (trainer/checkpoint/dcp.py): one torch.distributed.checkpoint folder

_STEP_DIR = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_PID_SUFFIX = re.compile(r"-(\d+)$")
_HASH_BLOCK = 8 << 20  # bytes read per hash update
# DCP warns on every single-process (no_dist) save and load, which Loom does on purpose
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class CheckpointError(Exception):
    """A checkpoint cannot be written, found or trusted. The message is one user-facing line."""


class NonFiniteCheckpoint(CheckpointError):
    """save() refused weights holding NaN or inf; nothing was written."""


def step_dir_name(step: int) -> str:
    """``40 -> "step-00000040"``."""
    return f"step-{step:08d}"


class CheckpointManager:
    """Saves, lists, verifies, prunes and loads the checkpoints under ``<run_dir>/checkpoints``.

    Args:
        run_dir: the run folder; ``checkpoints/`` is created by the first save.
        keep_last: how many of the newest checkpoints to keep after a save
            (the one ``latest`` names is always kept); ``<= 0`` keeps all.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        # resolved path -> (dir inode, manifest mtime_ns) of checkpoints that passed verify
        self._verified: dict[Path, tuple[int, int]] = {}
        self._remove_stale()

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        meta: dict | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and return its folder.

        ``tensors`` go to model.safetensors, ``state`` (anything picklable) to
        trainer_state.pt, ``meta`` (JSON-able; ``step`` is filled in) to
        meta.json. Raises CheckpointError on bad meta or a failed write; the
        previous checkpoints and ``latest`` are untouched in that case.
        """
        if step < 0:
            raise CheckpointError(f"cannot save a checkpoint for negative step {step}")
        name = step_dir_name(step)
        try:
            meta_text = json.dumps({**(meta or {}), "step": step}, indent=2, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"cannot save {name}: meta is not JSON-serialisable ({e})") from None

        bad = _first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteCheckpoint(f"not saving {name}: tensor {bad} holds NaN or inf")
        tmp = self.begin(step)
        try:
            self._write_payload(tmp, tensors, state)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap ENOSPC
            self.abort(tmp, step, e)
        kill_point("checkpoint.payload")
        return self.commit(tmp, step, meta_text)

    def begin(self, step: int) -> Path:
        """Clean leftovers, check free space, create and return the temporary folder of ``step``.

        The first half of ``save``; a sharded writer (trainer/checkpoint/dcp.py) calls it on the coordinator,
        lets every rank write into the folder, then calls ``commit``.
        """
        name = step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self._check_free_space(name)
            tmp.mkdir()
        except OSError as e:
            self.abort(tmp, step, e)
        return tmp

    def commit(self, tmp: Path, step: int, meta_text: str) -> Path:
        """Write meta.json and the manifest into ``tmp``, publish it as ``step``, point ``latest``, prune."""
        name = step_dir_name(step)
        try:
            _write_text(tmp / META_FILE, meta_text)
            self._write_manifest(tmp, step)
            kill_point("checkpoint.manifest")
            final = self._swap_in(tmp, name)
            kill_point("checkpoint.latest")
            self._point_latest(name)
            kill_point("checkpoint.prune")
            self._prune()
        except OSError as e:
            self.abort(tmp, step, e)
        return final

    def abort(self, tmp: Path, step: int, error: BaseException):
        """Remove ``tmp`` (give the space back; the previous checkpoint is intact) and raise CheckpointError."""
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {step_dir_name(step)}: {_one_line(error)}") from error

    def last_size(self) -> int:
        """Bytes of the newest finished checkpoint (its manifest's files), 0 if there is none."""
        for _, path in reversed(self.list()):
            try:
                files = json.loads((path / MANIFEST_FILE).read_text())["files"]
                return sum(int(e["bytes"]) for e in files.values())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 0

    def has_room_for_next(self) -> bool:
        """Whether the file system has as much free space as the newest checkpoint took."""
        return free_bytes(self.root if self.root.is_dir() else self.run_dir) >= self.last_size()

    def _check_free_space(self, name: str) -> None:
        need, free = self.last_size(), free_bytes(self.root)
        if free < need:
            raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free, the last checkpoint took "
                                        f"{need / 2**20:.1f} MiB", str(self.root))

    def _write_payload(self, tmp: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Turn tensors and state into files under ``tmp`` (the seam for sharded writers)."""
        save_file(_saveable(tensors), str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)

    def _write_manifest(self, tmp: Path, step: int) -> None:
        """Hash and fsync every file under ``tmp``, then write the manifest last."""
        names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        digests = _sha256_files([tmp / n for n in names], fsync=True)
        files = {n: {"sha256": d, "bytes": (tmp / n).stat().st_size} for n, d in zip(names, digests)}
        manifest = {"format": FORMAT, "step": step, "files": files}
        _write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2))
        _fsync_dir(tmp)

    def _swap_in(self, tmp: Path, name: str) -> Path:
        """Rename ``tmp`` to ``name``, replacing an existing folder of the same step."""
        final = self.root / name
        old = None
        if final.exists():
            old = self.root / f"{_OLD_PREFIX}{name}-{os.getpid()}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)
            raise
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old)
        return final

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
        _write_text(tmp, name + "\n")
        os.replace(tmp, self.root / LATEST_FILE)
        _fsync_dir(self.root)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        pinned = self._read_latest()
        for _, path in self.list()[: -self.keep_last]:
            if path.name == pinned:
                continue
            trash = self.root / f"{_TMP_PREFIX}prune-{path.name}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash)

    def _remove_stale(self) -> None:
        """Delete leftovers of dead writers; restore a step folder a crash left moved aside."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if not entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                continue
            match = _PID_SUFFIX.search(entry.name)
            if match and _is_other_live_process(int(match.group(1))):
                continue
            if entry.name.startswith(_OLD_PREFIX):
                final = self.root / _PID_SUFFIX.sub("", entry.name[len(_OLD_PREFIX):])
                if not final.exists():
                    os.rename(entry, final)
                    continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ------------------------------------------------------------ inspection

    def list(self) -> list[tuple[int, Path]]:
        """Finished checkpoints as ``(step, folder)``, ascending by step."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def verify(self, path: str | Path) -> None:
        """Check the manifest, every file's size and SHA-256; raise CheckpointError if any fails."""
        path = Path(path)
        problem = self._problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
        self._verified[path.resolve()] = _identity(path)

    def latest_valid(self, log: Callable[[str], Any] = print) -> Path | None:
        """The checkpoint to resume from, or None if there is no valid one.

        Tries the folder ``latest`` names, then the others from newest to
        oldest; each one that fails verification is reported through ``log``
        in one ``warning: ...`` line.
        """
        candidates = [path for _, path in reversed(self.list())]
        skipped: list[tuple[str, str]] = []
        pointer_file = self.root / LATEST_FILE
        if pointer_file.exists() and not pointer_file.is_file():
            raise CheckpointError(f"{pointer_file} is not a file (the pointer to the checkpoint to resume from); "
                                  "remove it: the run then resumes from the newest valid checkpoint")
        pointer = self._read_latest()
        if pointer is not None:
            named = [p for p in candidates if p.name == pointer]
            if named:
                candidates.remove(named[0])
                candidates.insert(0, named[0])
            else:
                skipped.append((pointer, "directory missing"))

        chosen = None
        for path in candidates:
            problem = self._problem(path)
            if problem is None:
                chosen = path
                self._verified[path.resolve()] = _identity(path)
                break
            skipped.append((path.name, problem))

        fallback = f"using {chosen.name}" if chosen is not None else "no valid checkpoint left"
        for name, problem in skipped:
            log(f"warning: skipping corrupt checkpoint {name} ({problem}); {fallback}")
        return chosen

    def load(self, path: str | Path,
             weights: bool = True) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], dict]:
        """Verify, then return ``(tensors, state, meta)``, all on CPU.

        A checkpoint this manager verified already (via ``verify`` or
        ``latest_valid``) is not hashed again unless its folder or manifest
        changed since. ``state`` is unpickled with ``weights_only=False``
        (it holds RNG states and numpy values): load only checkpoints you trust.
        A sharded checkpoint (trainer/checkpoint/dcp.py) has its full weights consolidated in
        this process; ``weights=False`` skips the weights (``tensors`` is None).
        """
        path = Path(path)
        if self._verified.get(path.resolve()) != _identity(path):
            self.verify(path)
        tensors, state = self._read_payload(path, weights)
        meta = json.loads((path / META_FILE).read_text())
        return tensors, state, meta

    def _read_payload(self, path: Path, weights: bool = True) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """Inverse of ``_write_payload``, and the reader of sharded checkpoints' weights."""
        tensors = None
        if weights and (path / SHARD_DIR).is_dir():
            tensors = consolidate_model(path / SHARD_DIR)
        elif weights:
            tensors = load_file(str(path / MODEL_FILE), device="cpu")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        return tensors, state

    def _problem(self, path: Path) -> str | None:
        """Why ``path`` is not a valid checkpoint, in a few words; None if it is valid."""
        if not path.is_dir():
            return "directory missing"
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            return "missing manifest"
        except ValueError:
            return "unreadable manifest"
        except OSError as e:
            return f"unreadable manifest ({e.strerror})"
        try:
            if manifest["format"] != FORMAT:
                return f"unsupported manifest format {manifest['format']!r}"
            expected = {n: (int(e["bytes"]), str(e["sha256"])) for n, e in manifest["files"].items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            return "unreadable manifest"

        for name, (size, _) in expected.items():
            file = path / name
            if not file.is_file():
                return f"missing file {name}"
            if file.stat().st_size != size:
                return f"{name} size mismatch ({file.stat().st_size} bytes, manifest says {size})"
        try:
            digests = _sha256_files([path / name for name in expected])
        except OSError as e:
            return f"unreadable file {Path(e.filename or '?').name} ({e.strerror})"
        for (name, (_, sha)), digest in zip(expected.items(), digests):
            if digest != sha:
                return f"{name} checksum mismatch"
        return None

    def latest_pointer(self) -> Path | None:
        """The folder ``latest`` names (not verified), or None."""
        name = self._read_latest()
        return None if name is None else self.root / name

    def _read_latest(self) -> str | None:
        """The step folder name ``latest`` holds; None when it is missing, unreadable, not text or not a
        step name (the callers then scan the checkpoints, newest first)."""
        try:
            raw = (self.root / LATEST_FILE).read_bytes()
        except OSError:
            return None
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        return name if _STEP_DIR.fullmatch(name) else None


def consolidate_model(dcp_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full model weights (CPU, by name) of a sharded checkpoint (trainer/checkpoint/dcp.py), assembled in this
    one process from the shards its metadata lists."""
    reader = FileSystemReader(str(dcp_dir))
    metadata = reader.read_metadata()
    template = {key: torch.empty(md.size, dtype=md.properties.dtype)
                for key, md in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    dcp.load(template, storage_reader=reader, no_dist=True)
    return {key[len("model."):]: t for key, t in template.items()}


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint folder (cheap: nothing is verified or loaded)."""
    return json.loads((Path(path) / META_FILE).read_text())


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global, torch CPU and (when present) all CUDA RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured; CUDA states are skipped on a machine without CUDA."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ helpers


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) get their own copy,
    which safetensors requires."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        elif ptr != 0:
            seen.add(ptr)
        out[name] = tensor
    return out


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (the seam tests replace to fake a full disk)."""
    return shutil.disk_usage(path).free


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256_files(paths: list[Path], fsync: bool = False) -> list[str]:
    """Hash files in parallel threads (hashlib and file reads release the GIL)."""
    if len(paths) <= 1:
        return [_sha256(p, fsync) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return list(pool.map(lambda p: _sha256(p, fsync), paths))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int]:
    """Changes when the folder is replaced or its manifest rewritten; (-1, -1) if either is gone."""
    try:
        return path.stat().st_ino, (path / MANIFEST_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return -1, -1


def _is_other_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
