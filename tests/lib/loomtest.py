"""Helpers shared by the test suite (tests/lib is on sys.path through pytest's `pythonpath`):
the tiny recipe the end-to-end tests train, and the plumbing of the multi-process (gloo, CPU) tests.

    TINY                      tests/tiny.yaml: the debug recipe (attn x2, seconds on a CPU)
    tiny_recipe(folder, ...)  a copy of it in `folder` (a run's recipe must not be shared), extra YAML appended
    launch / worker_main      a test file runs itself as `world` worker processes (no torchrun, no pickling
                              of test code, so it works under any pytest import mode): `launch` starts them
                              and reads back what each rank wrote; the file's `if __name__ == "__main__":`
                              calls `worker_main(run_case)`, which runs every named case on every rank,
                              records a failure per case (the other cases still run) and writes the rank's
                              results as JSON. Workers get this folder on PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "tiny.yaml"
LIB = Path(__file__).resolve().parent


def tiny_recipe(folder: Path, extra: str = "") -> Path:
    """tests/tiny.yaml copied into `folder` as tiny.yaml, with `extra` YAML lines appended."""
    path = Path(folder) / "tiny.yaml"
    path.write_text(TINY.read_text() + extra)
    return path


def launch(script: str | Path, world: int, names: Sequence[str], d: Path, timeout_s: float = 240.0) -> dict:
    """Runs `script` as `world` worker processes on the cases `names` (files in `d`); raises
    with their logs on failure. Returns {"world": world, case: [result of each rank]}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(LIB), os.environ.get("PYTHONPATH")]))}
    logs = [d / f"rank{r}.log" for r in range(world)]
    args = [str(d / "store"), str(d), ",".join(names)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), *args],
                              env=env, stdout=open(logs[r], "w"), stderr=subprocess.STDOUT) for r in range(world)]
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"cp workers exited with {codes}:\n" + "\n".join(f.read_text()[-3000:] for f in logs))
    per_rank = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
    return {"world": world, **{name: [res[name] for res in per_rank] for name in names}}


def worker_main(run_case: Callable[[str, int], dict | None]) -> None:
    """One worker process started by `launch` (arguments: rank, world, store, out dir, cases);
    run_case(name, world) raises on a mismatch and may return a JSON-able dict of measurements."""
    rank, world, store_path, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    names = sys.argv[5].split(",")
    torch.set_num_threads(1)
    # A short collective timeout turns a hang after one rank's failure into a recorded error.
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                results[name] = run_case(name, world) or {}
            except Exception:  # recorded per case; the other cases still run
                results[name] = {"error": f"rank {rank}: {traceback.format_exc()}"}
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def assert_no_errors(per_rank: list[dict]) -> None:
    """One case's results of every rank: none recorded an error."""
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, "\n".join(errors)


def busiest_bytes(per_rank: list[dict]) -> list[int]:
    """[forward, backward] bytes sent by the busiest rank (each rank's run_case returned {"bytes": [fwd, bwd]})."""
    assert_no_errors(per_rank)
    return [max(r["bytes"][i] for r in per_rank) for i in (0, 1)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch.distributed call -> bytes one rank sends through it, from the call's arguments.
SENT = {
    "batch_isend_irecv": lambda world, ops: sum(_nbytes(o.tensor) for o in ops if o.op is dist.isend),
    "all_to_all_single": lambda world, out, x, **kw: _nbytes(x) * (world - 1) // world,
    "all_gather": lambda world, outs, x, **kw: _nbytes(x) * (world - 1),
    "reduce_scatter_single": lambda world, out, x, **kw: _nbytes(x) * (world - 1) // world,
}


class ByteCounter:
    """Counts the bytes this rank sends through the torch.distributed calls `calls` (keys of SENT)."""

    def __init__(self, world: int, calls: Sequence[str]):
        self.world, self.calls, self.n, self._saved = world, tuple(calls), 0, {}

    def _wrap(self, name: str) -> None:
        orig = self._saved[name] = getattr(dist, name)
        count = SENT[name]

        def wrapped(*args, **kwargs):
            self.n += count(self.world, *args, **kwargs)
            return orig(*args, **kwargs)

        setattr(dist, name, wrapped)

    def __enter__(self):
        for name in self.calls:
            self._wrap(name)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(dist, name, orig)
