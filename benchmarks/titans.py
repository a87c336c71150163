"""Titans neural memory module: Loom vs titans-pytorch, forward+backward tokens/s and peak memory.

Compares the memory MODULE alone, batch 1, float32, CPU, at 1K, 4K and 16K tokens:
Loom's `memory` mixer layer (models/mixers/memory.py around kernels.memory)
against lucidrains' `titans_pytorch.NeuralMemory`, configured as closely as the
two allow (SETTINGS below, differences in NOTES). Each (module, length) runs in a
fresh subprocess so that its peak resident memory is its own, and the modules
alternate inside each length so that both see the same machine load.

titans-pytorch is NOT a dependency of Loom. It lives in a separate virtualenv used
only by this benchmark, with the same torch build as Loom's:

    .venv/bin/python benchmarks/titans.py --setup     # once: creates /tmp/titans-bench-venv
    # which runs exactly:
    #   python3 -m venv /tmp/titans-bench-venv
    #   /tmp/titans-bench-venv/bin/pip install torch==<Loom's torch.__version__> titans-pytorch==0.5.5
    .venv/bin/python benchmarks/titans.py             # 1K, 4K, 16K; writes benchmarks/results/titans.json
    .venv/bin/python benchmarks/titans.py --lengths 1024 4096 --repeats 5 --threads 1

Time: forward+backward passes, `--repeats` per process after one warm-up pass,
loss = mean(y^2) of the module's (B, T, 256) output; tokens/s = T / time, both
wall-clock and process CPU time. The machine is shared, so with one thread the
CPU time is the steadier measure of the work (wall time also counts the moments
other jobs held the core). The table keeps each (module, length)'s best pass
over all `--rounds` (wall and CPU time each) and its lowest peak; the JSON keeps
every pass.
Memory: peak RSS during all passes minus the RSS after building the module and
its input (so weights, interpreter and libraries are excluded).
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

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
DEFAULT_VENV = "/tmp/titans-bench-venv"
TITANS_PYTORCH = "titans-pytorch==0.5.5"

D_MODEL, HEADS, HEAD_DIM, DEPTH, EXPANSION, CHUNK = 256, 4, 64, 2, 4, 64
SETTINGS = {
    "d_model": D_MODEL, "heads": HEADS, "head_dim": HEAD_DIM, "memory_depth": DEPTH,
    "memory_expansion": EXPANSION, "update_chunk": CHUNK, "batch": 1, "dtype": "float32",
    "momentum": True, "weight_decay": True, "lr": "per token",
}
# name -> (side, options). "loom-chunk" and "lucidrains" are the equal-settings pair.
CONFIGS = {
    "loom-chunk": ("loom", {"retrieval": "chunk"}),
    "loom-token": ("loom", {"retrieval": "token"}),
    "lucidrains": ("lucidrains", {"batch_size": CHUNK}),
    "lucidrains-default": ("lucidrains", {"batch_size": None}),
}
NOTES = [
    "Both: d_model 256, 4 heads x 64, depth-2 GELU MLP memory 64 -> 256 -> 64 per head (expansion 4), "
    "gradients of each 64-token chunk taken at that chunk's start weights, momentum and weight decay on, "
    "per-token learning rate, learned per-head W0.",
    "loom-chunk: `memory` mixer, retrieval='chunk' (token t reads the weights committed before its chunk), "
    "memory_norm on (rmsnorm output, no residual), conv 4 taps + SiLU + l2 norm on q/k, output RMSNorm, "
    "sigmoid output gate (D -> H*K) and o_proj.",
    "loom-token: the same with Loom's default retrieval='token' (each token reads its own post-update "
    "weights, the paper's read-after-write); more work than either equal-settings side.",
    "lucidrains: NeuralMemory(dim=256, heads=4, dim_head=64, chunk_size=64, batch_size=64, "
    "default_model_kwargs={depth: 2, expansion_factor: 4}, momentum=True), all else default: "
    "input RMSNorm, LayerNorm+residual memory wrapper, no qk norm, per-head retrieve gate, combine_heads. "
    "It reads the weights committed after the last complete chunk (one token later than loom-chunk).",
    "lucidrains-default: its default batch_size=None takes every chunk's gradient at the call's initial "
    "weights W0 (no chunk-to-chunk dependence): a different, cheaper algorithm, shown for reference only.",
    "Remaining differences: lucidrains pools momentum and decay gates per chunk (one value per 64 tokens) "
    "where Loom has them per token; its inner loss is a mean over K, Loom's a sum; its lr bound is 1, "
    "Loom's 1/(2*64). None of these changes the amount of work.",
]


# ---------------------------------------------------------------- setup


def setup(venv: str) -> None:
    """Create the benchmark-only virtualenv with Loom's torch build and titans-pytorch."""
    import torch

    torch_pin = f"torch=={torch.__version__}"
    cmds = [["python3", "-m", "venv", venv],
            [f"{venv}/bin/pip", "install", torch_pin, TITANS_PYTORCH]]
    for cmd in cmds:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    check = subprocess.run([f"{venv}/bin/python", "-c",
                            "import torch, titans_pytorch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True)
    print(f"{venv}: torch {check.stdout.strip()}, {TITANS_PYTORCH}")


# ---------------------------------------------------------------- children


def build_loom(opts: dict):
    import torch

    from models.config import build
    from models.mixers import MIXERS, MixerDims, SeqContext
    from models.rope import RopeConfig

    dims = MixerDims(d_model=D_MODEL, n_heads=HEADS, n_kv_heads=HEADS, head_dim=HEAD_DIM, layer_idx=0,
                     n_layers=1, rope=RopeConfig())
    cfg = build(MIXERS["memory"].Config, {"chunk_size": CHUNK, "depth": DEPTH, "expansion": EXPANSION, **opts},
                "memory")
    mixer = MIXERS["memory"](dims, cfg)
    mixer.reset_parameters()
    ctxs = {}

    def run(x):
        T = x.shape[1]
        if T not in ctxs:
            ctxs[T] = SeqContext(position_ids=torch.arange(T)[None])
        return mixer(x, ctxs[T])[0]

    return mixer, run


def build_lucidrains(opts: dict):
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=D_MODEL, heads=HEADS, dim_head=HEAD_DIM, chunk_size=CHUNK,
                       batch_size=opts["batch_size"], momentum=True,
                       default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)))
    return mem, lambda x: mem(x)[0]


def measure(name: str, T: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side, opts = CONFIGS[name]
    module, run = (build_loom if side == "loom" else build_lucidrains)(opts)
    x = torch.randn(1, T, D_MODEL, requires_grad=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        y = run(x)
        y.pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del y
        x.grad = None
        module.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sec, cpu_sec = min(times[1:]), min(cpu[1:])
    return {"config": name, "T": T, "seconds": sec, "cpu_seconds": cpu_sec, "all_seconds": times,
            "all_cpu_seconds": cpu, "tokens_per_s": T / sec, "cpu_tokens_per_s": T / cpu_sec,
            "peak_mib": (peak - base_rss) / 1024, "params": sum(p.numel() for p in module.parameters()),
            "torch": torch.__version__, "threads": threads}


def run_child(name: str, T: int, repeats: int, threads: int, venv: str, timeout: float) -> dict:
    python = sys.executable if CONFIGS[name][0] == "loom" else f"{venv}/bin/python"
    cmd = [python, str(HERE), "--child", name, str(T), str(repeats), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=HERE.parents[1])
    except subprocess.TimeoutExpired:
        return {"config": name, "T": T, "seconds": None, "note": f"> {timeout:.0f} s"}
    if out.returncode != 0:
        return {"config": name, "T": T, "seconds": None,
                "note": (out.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_before"] = round(load, 2)
    return row


# ---------------------------------------------------------------- report


def table(best: dict, lengths: list[int]) -> str:
    """best[(config, T)] -> summary. CPU-time tokens/s, peak MiB and the Loom / lucidrains ratios.
    (Wall-clock tokens/s are in the JSON: on a shared machine they mostly measure the other jobs.)"""
    names = [n for n in CONFIGS if any(c == n for c, _ in best)]
    name = lambda T: f"{T // 1024}K" if T % 1024 == 0 else str(T)  # noqa: E731
    lines = ["| module | " + " | ".join(f"{name(T)} tok/s | {name(T)} peak MiB" for T in lengths) + " |",
             "|" + " --- |" * (2 * len(lengths) + 1)]
    for n in names:
        cells = []
        for T in lengths:
            r = best.get((n, T))
            cells += ["-", "-"] if r is None else [f"{r['cpu_tokens_per_s']:,.0f}", f"{r['peak_mib']:,.0f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for loom in ("loom-chunk", "loom-token"):
        cells = []
        for T in lengths:
            a, b = best.get((loom, T)), best.get(("lucidrains", T))
            cells += ["-", "-"] if not (a and b) else \
                [f"{a['cpu_tokens_per_s'] / b['cpu_tokens_per_s']:.2f}x", f"{a['peak_mib'] / b['peak_mib']:.2f}x"]
        if any(c != "-" for c in cells):
            lines.append(f"| **{loom} / lucidrains** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> dict:
    """Per (config, T) over all rounds: the best pass's wall and CPU time (the passes least disturbed by
    other jobs; warm-ups excluded) and the lowest peak memory (the allocator's peak varies between runs)."""
    best = {}
    for r in rows:
        if r.get("seconds") is None:
            continue
        b = best.setdefault((r["config"], r["T"]), {"wall": [], "cpu": [], "peak": []})
        b["wall"] += r["all_seconds"][1:]
        b["cpu"] += r["all_cpu_seconds"][1:]
        b["peak"].append(r["peak_mib"])
    return {(c, T): {"tokens_per_s": T / min(b["wall"]), "cpu_tokens_per_s": T / min(b["cpu"]),
                     "cpu_seconds": min(b["cpu"]), "seconds": min(b["wall"]),
                     "peak_mib": min(b["peak"]), "peak_mib_range": [min(b["peak"]), max(b["peak"])]}
            for (c, T), b in best.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, T, repeats, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(measure(name, T, repeats, threads)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="create the titans-pytorch venv and exit")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="sweep this many times; the table keeps each "
                   "(module, length)'s best pass over all rounds")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(RESULTS / "titans.json"))
    args = p.parse_args()
    if args.setup:
        setup(args.venv)
        return
    if not Path(f"{args.venv}/bin/python").exists():
        sys.exit(f"no {args.venv}: run `{sys.executable} {HERE} --setup` first")
    rows = []
    for rnd in range(args.rounds):
        for T in args.lengths:
            for name in args.configs:
                r = run_child(name, T, args.repeats, args.threads, args.venv, args.timeout)
                r["round"] = rnd
                rows.append(r)
                msg = r.get("note") or f"{r['seconds']:.3f} s wall {r['cpu_seconds']:.3f} s CPU " \
                                       f"{r['peak_mib']:>6,.0f} MiB  load {r['load_before']}"
                print(f"round {rnd} {name:>18} T={T:>6}: {msg}", flush=True)
    summary = summarise(rows)
    report = table(summary, args.lengths)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": SETTINGS, "notes": NOTES, "threads": args.threads,
                                          "repeats": args.repeats, "rounds": args.rounds,
                                          "summary": [{"config": c, "T": T, **v} for (c, T), v in summary.items()],
                                          "rows": rows, "table": report}, indent=1))
    print()
    print(report)


if __name__ == "__main__":
    main()
