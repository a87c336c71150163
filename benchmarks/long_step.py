"""One training step (forward + backward) at a very long context, in one process.

Builds a HybridLM (default: the titans-mal-style hybrid [[memory, swa], x2] at
d_model 256, or any `--layers`), applies the trainer's own activation
checkpointing and MLP tiling (loom.trainer.parallelize), and runs forward,
the fused chunked cross-entropy and backward on one row of random tokens as
one packed document. Each length runs in a fresh subprocess so that its peak
resident memory is its own.

    python benchmarks/long_step.py --layers swa swa swa swa --tokens 131072  # 3.3 GiB, see README
    python benchmarks/long_step.py --layers swa swa swa swa --tokens 65536 262144 --checkpointing none

Prints and appends to benchmarks/results/long_step.json: tokens, seconds for
the step, peak RSS (GiB) and bytes per token (peak RSS above the model's own).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def measure(layers: list[str], T: int, checkpointing: str, tile_mlp: int, threads: int, mixers: dict) -> dict:
    import torch

    from loom.models import HybridLM, ModelConfig
    from loom.trainer.parallelize import apply_activation_checkpointing, apply_tile_mlp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=256, d_model=256, n_heads=4, layers=layers, mixers=mixers).resolved())
    apply_activation_checkpointing(model, checkpointing)
    apply_tile_mlp(model, tile_mlp)
    ids = torch.randint(0, 256, (1, T + 1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    out = model(ids[:, :-1])
    t_fwd = time.perf_counter() - t
    loss = model.loss(out.hidden, ids[:, 1:]) + out.aux_loss
    loss.backward()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"layers": layers, "tokens": T, "checkpointing": checkpointing, "tile_mlp": tile_mlp,
            "threads": threads, "seconds": round(seconds, 1), "forward_seconds": round(t_fwd, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "bytes_per_token": round((peak - base) / T),
            "loss": round(float(loss), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["memory", "swa", "memory", "swa"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[131072])
    ap.add_argument("--checkpointing", default="full", choices=["none", "full", "selective"])
    ap.add_argument("--tile-mlp", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixers", default='{"swa": {"window": 512}, "memory": {"chunk_size": 64}}',
                    help="model.mixers as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.layers, a.tokens[0], a.checkpointing, a.tile_mlp, a.threads,
                                 json.loads(a.mixers))))
        return
    RESULTS.mkdir(exist_ok=True)
    for T in a.tokens:
        cmd = [sys.executable, __file__, "--child", "--tokens", str(T), "--layers", *a.layers,
               "--checkpointing", a.checkpointing, "--tile-mlp", str(a.tile_mlp), "--threads", str(a.threads),
               "--mixers", a.mixers]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC})
        if p.returncode != 0:
            rec = {"layers": a.layers, "tokens": T, "checkpointing": a.checkpointing, "tile_mlp": a.tile_mlp,
                   "failed": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
        else:
            rec = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(rec), flush=True)
        with (RESULTS / "long_step.json").open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
