"""Plumbing shared by the CPU benchmarks that time one step per fresh subprocess (mixers.py,
gdn_vs_hf.py, mamba2_hf.py): each (variant, length) runs in its own child process, so its peak
resident memory is its own, and the parent collects one JSON line per child.

    MALLOC                       glibc settings for the children: large blocks are mapped and returned,
                                 so the peak RSS of one step is not hidden by an earlier one's free list
    timed_steps(step, repeats, reset)
                                 (median process-CPU seconds of `repeats` steps after a warm-up,
                                 peak MiB of RSS above the RSS before the first step)
    run_child(script, args, threads, timeout)
                                 runs `script --child *args` with `threads` OpenMP threads; its last
                                 stdout line as a dict, or {"note": why} on a time-out or failure
    cell(r)                      "seconds / MiB" of a result, "-" when it has none
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def timed_steps(step: Callable[[], object], repeats: int, reset: Callable[[], None]) -> tuple[float, float]:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
        reset()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = sorted(times[1:])
    return times[len(times) // 2], (peak - base) / 1024


def run_child(script: str, args: list[str], threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(script), "--child", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads), **MALLOC})
    except subprocess.TimeoutExpired:
        return {"note": f"> {timeout:.0f} s"}
    if out.returncode != 0:
        return {"note": (out.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(r: dict | None) -> str:
    return "-" if not r or r.get("seconds") is None else f"{r['seconds']:.3f} / {r['peak_mib']:.0f}"
