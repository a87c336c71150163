"""Checkpoint save: the rank-0 full-state path against sharded DCP, at 2 and 4 gloo ranks (FSDP2, CPU).

    python benchmarks/checkpoint.py                  # 2 and 4 ranks, records results/checkpoint.json
    python benchmarks/checkpoint.py --worlds 2 --d-model 256

Each world size is one torchrun launch of this file (`--worker`). Every rank
builds the same HybridLM (attn layers), shards it with Loom's FSDPEngine,
takes one optimiser step (so AdamW holds exp_avg / exp_avg_sq), then saves
`--repeats` times with each path, alternating, through Loom's own code:
  full     engine.checkpoint_state() (full_state_dict + cpu_offload gather to
           rank 0) then CheckpointManager.save on rank 0 (safetensors + torch.save,
           hashed manifest, atomic publish);
  sharded  trainer/checkpoint/dcp.save_sharded (every rank writes its DTensor shards with
           dcp.save; rank 0 commits the manifest).
Per rank and path: wall time of the save (barrier to barrier, the slowest
rank's), and peak RSS above the pre-save baseline (a 2 ms sampler of
/proc/self/statm); per rank, the model + AdamW state it holds (what it writes
under DCP; the full path materialises all of it on rank 0). Both paths run in
the same processes, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.json"


class PeakRSS:
    """Peak resident set size (bytes) seen by a background sampler while the block runs."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def worker(args) -> None:
    import torch

    from loom.models import HybridLM
    from loom.models.model import ModelConfig
    from loom.trainer.checkpoint.manager import CheckpointManager
    from loom.trainer.config import RunConfig
    from loom.trainer.checkpoint.dcp import save_sharded
    from loom.trainer.distributed.mesh import setup_env
    from loom.trainer.distributed.fsdp import FSDPEngine

    torch.set_num_threads(1)
    cfg = RunConfig()
    cfg.parallel.engine = "fsdp"
    env = setup_env(cfg.parallel)
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.d_model // 64,
                       layers=["attn", f"x{args.layers}"])
    model = HybridLM(mcfg)
    n_params = model.num_params()
    engine = FSDPEngine(model, cfg.optim, 10, env, cfg)
    ids = torch.randint(0, args.vocab, (1, 64))
    out = engine.module(ids, position_ids=torch.arange(64)[None], seq_ids=None, cp=None)
    engine.backward(model.loss(out.hidden, ids, chunk=64))
    engine.step()

    from torch.distributed.tensor import DTensor

    from loom.trainer.checkpoint.dcp import app_state

    def tensor_bytes(tree) -> int:
        if isinstance(tree, dict):
            return sum(tensor_bytes(v) for v in tree.values())
        if isinstance(tree, (list, tuple)):
            return sum(tensor_bytes(v) for v in tree)
        if isinstance(tree, torch.Tensor):
            t = tree.to_local() if isinstance(tree, DTensor) else tree
            return t.numel() * t.element_size()
        return 0

    shard_mib = tensor_bytes(app_state(engine)) / 2**20  # what this rank holds and writes under DCP
    root = Path(args.out)
    manager = CheckpointManager(root, keep_last=1) if env.is_main else None
    rows = {"full": [], "sharded": []}
    for i in range(args.repeats):
        for path in ("full", "sharded"):
            env.barrier()
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                if path == "full":
                    tensors, state = engine.checkpoint_state()
                    if env.is_main:
                        manager.save(2 * i + 1, tensors, {"engine": state}, {})
                    del tensors, state
                else:
                    problem = save_sharded(manager, env, engine, 2 * i + 2, {"engine": {}}, {})
                    assert problem is None, problem
                env.barrier()
            rows[path].append({"seconds": time.perf_counter() - t0, "peak_mib": (mem.peak - mem.base) / 2**20})
    result = {"rank": env.rank, "world": env.world, "params": n_params, "shard_mib": shard_mib, **rows}
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(result))
    env.teardown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    summary = {"settings": {k: getattr(args, k) for k in ("d_model", "layers", "vocab", "repeats")}, "runs": []}
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_port", str(_port()), __file__, "--worker", "--out", out,
                   "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
                   "--repeats", str(args.repeats)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        run = {"world": world, "params": ranks[0]["params"],
               "state_mib_per_rank": [round(r["shard_mib"], 1) for r in ranks]}
        for path in ("full", "sharded"):
            # the save's time is the slowest rank's; take the best repeat (the machine is shared)
            run[f"{path}_seconds"] = min(max(r[path][i]["seconds"] for r in ranks) for i in range(args.repeats))
            run[f"{path}_peak_mib_per_rank"] = [round(min(x["peak_mib"] for x in r[path]), 1) for r in ranks]
        summary["runs"].append(run)
        print(f"world {world}: {run['params'] / 1e6:.1f}M params | full (rank 0 gathers): "
              f"{run['full_seconds']:.2f} s, peak MiB per rank {run['full_peak_mib_per_rank']} | "
              f"sharded (DCP): {run['sharded_seconds']:.2f} s, peak MiB per rank {run['sharded_peak_mib_per_rank']}, "
              f"state written per rank MiB {run['state_mib_per_rank']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"recorded {RESULTS}")


if __name__ == "__main__":
    main()
