"""One training step (forward + backward) at a very long context, in one process or cp.

Builds a HybridLM (default: the titans-mal-style hybrid [[memory, swa], x2] at
d_model 256, or any `--layers`), applies the trainer's own activation
checkpointing, MLP tiling and block tiling (loom.trainer.distributed.parallelize), and runs
forward, the fused chunked cross-entropy and backward on one row of random
tokens as one document. Each length runs in fresh subprocesses so that each
peak resident memory is its own. With `--cp N` the row is sharded over N gloo
ranks on this machine (`--cp-layout`, default zigzag); `--tokens` is then the whole row.

    python benchmarks/long_step.py --layers swa swa swa swa --tile-blocks 16384 --tokens 1048576
    python benchmarks/long_step.py --layers swa swa swa swa --tile-blocks 16384 --tokens 2097152 --cp 2
    python benchmarks/long_step.py --layers swa swa swa swa --tokens 65536 --tile-blocks 0  # untiled

Prints and appends to benchmarks/results/long_step.json: tokens, seconds for
the step, peak RSS (GiB; with cp: of the largest rank and summed over ranks) and
bytes per token (peak RSS above the model's own, per token held by the rank).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(33554432), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def measure(layers: list[str], T: int, checkpointing: str, tile_mlp: int, tile_blocks: int, threads: int,
            mixers: dict, cp_world: int = 1, rank: int = 0, store: str = "", cp_layout: str = "zigzag") -> dict:
    import torch

    from loom.models import HybridLM, ModelConfig
    from loom.trainer.distributed.parallelize import apply_activation_checkpointing
    from loom.trainer.distributed.tiling import apply_tile_blocks, apply_tile_mlp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cp = None
    if cp_world > 1:
        import torch.distributed as dist

        from loom.kernels.context_parallel import CPContext

        dist.init_process_group("gloo", store=dist.FileStore(store, cp_world), rank=rank, world_size=cp_world)
        cp = CPContext.from_group(None, impl="ring", layout=cp_layout)
    model = HybridLM(ModelConfig(vocab_size=256, d_model=256, n_heads=4, layers=layers, mixers=mixers).resolved())
    apply_activation_checkpointing(model, checkpointing)
    apply_tile_mlp(model, tile_mlp)
    apply_tile_blocks(model, tile_blocks)
    ids = torch.randint(0, 256, (1, T + 1))
    inputs, labels, pos = ids[:, :-1], ids[:, 1:], torch.arange(T)[None]
    if cp is not None:
        from loom.kernels.context_parallel import shard_sequence

        inputs, labels, pos = (shard_sequence(t, cp).contiguous() for t in (inputs, labels, pos))
    del ids
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    out = model(inputs, position_ids=pos, seq_ids=None if cp is None else torch.zeros_like(pos), cp=cp)
    t_fwd = time.perf_counter() - t
    loss = model.loss(out.hidden, labels) + out.aux_loss
    del out  # the fused loss keeps the gradient of the hidden states, not the states
    loss.backward()
    if cp is not None:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cp is not None:
        torch.distributed.destroy_process_group()
    return {"layers": layers, "tokens": T, "cp": cp_world, **({"cp_layout": cp_layout} if cp is not None else {}),
            "checkpointing": checkpointing, "tile_mlp": tile_mlp,
            "tile_blocks": tile_blocks, "threads": threads, "seconds": round(seconds, 1),
            "forward_seconds": round(t_fwd, 1), "peak_rss_gib": round(peak / 2**30, 2),
            "bytes_per_token": round((peak - base) / inputs.shape[1]), "loss": round(float(loss), 4)}


def run_step(layers: list[str], T: int, checkpointing: str, tile_mlp: int, tile_blocks: int, threads: int,
             mixers: str, cp: int = 1, cp_layout: str = "zigzag") -> dict:
    """`measure` in `cp` fresh processes (one per rank), so that the peak RSS is this step's own.

    `mixers` is model.mixers as JSON. Returns the record of the rank with the largest peak (with
    cp: the slowest rank's seconds, the ranks' summed peak and losses), or {..., "failed": the
    last line of the failing rank's stderr} (e.g. killed for memory).
    """
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--child", str(r), str(cp), "--store", os.path.join(tmp, "store"),
             "--tokens", str(T), "--layers", *layers, "--checkpointing", checkpointing,
             "--tile-mlp", str(tile_mlp), "--tile-blocks", str(tile_blocks), "--threads", str(threads),
             "--cp-layout", cp_layout, "--mixers", mixers],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **MALLOC})
            for r in range(cp)]
        outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        p, (_, err) = next((p, o) for p, o in zip(procs, outs) if p.returncode)
        return {"layers": layers, "tokens": T, "cp": cp, "checkpointing": checkpointing,
                "tile_mlp": tile_mlp, "tile_blocks": tile_blocks,
                "failed": (err.strip().splitlines() or [f"exit code {p.returncode}"])[-1]}
    ranks = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    rec = max(ranks, key=lambda r: r["peak_rss_gib"])
    rec["seconds"] = max(r["seconds"] for r in ranks)
    if cp > 1:
        rec["peak_rss_gib_all_ranks"] = round(sum(r["peak_rss_gib"] for r in ranks), 2)
        rec["loss"] = [r["loss"] for r in ranks]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["memory", "swa", "memory", "swa"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[131072])
    ap.add_argument("--checkpointing", default="full", choices=["none", "full", "selective"])
    ap.add_argument("--tile-mlp", type=int, default=16384)
    ap.add_argument("--tile-blocks", type=int, default=16384, help="train.tile_blocks (0: off)")
    ap.add_argument("--threads", type=int, default=2, help="per process")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks (gloo, this machine)")
    ap.add_argument("--cp-layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--mixers", default='{"swa": {"window": 512}, "memory": {"chunk_size": 64}}',
                    help="model.mixers as JSON")
    ap.add_argument("--child", nargs=2, type=int, metavar=("RANK", "WORLD"), help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.layers, a.tokens[0], a.checkpointing, a.tile_mlp, a.tile_blocks, a.threads,
                                 json.loads(a.mixers), a.child[1], a.child[0], a.store, a.cp_layout)))
        return
    RESULTS.mkdir(exist_ok=True)
    for T in a.tokens:
        rec = run_step(a.layers, T, a.checkpointing, a.tile_mlp, a.tile_blocks, a.threads, a.mixers, a.cp, a.cp_layout)
        print(json.dumps(rec), flush=True)
        with (RESULTS / "long_step.json").open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
