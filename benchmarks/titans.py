"""Titans neural memory module: Loom vs titans-pytorch, forward+backward tokens/s and peak memory.

Compares the memory MODULE alone, batch 1, float32, CPU, at 1K, 4K and 16K tokens:
Loom's `memory` mixer layer (models/mixers/memory.py around loom.kernels.memory)
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

Time: forward+backward passes, `--repeats` per process after one warm-up pass
(which also compiles, for the compiled rows), loss = mean(y^2) of the module's
(B, T, 256) output; tokens/s = T / time, both wall-clock and process CPU time.
The machine is shared, so with one thread the CPU time is the steadier measure
of the work (wall time also counts the moments other jobs held the core). The
table keeps each (module, length)'s best pass over all `--rounds`; the JSON
keeps every pass.
Memory: in a second fresh process per (module, length), with glibc's mmap
threshold fixed at 128 KiB so that freed tensors leave the resident set: the
peak RSS over two passes after the warm-up, minus the RSS after the warm-up
(so weights, libraries, compilation and the warm-up's allocator leftovers are
excluded). The table keeps the highest of the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
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
# name -> (side, options). "loom-chunk*" and "lucidrains" are the equal-settings rows: Loom without the
# things titans-pytorch's module does not have (the short conv) and with its kind of output gate (one per
# head); "loom-chunkstep*" also step momentum and decay once per chunk, as titans-pytorch does.
EQUAL = {"retrieval": "chunk", "conv_size": 0, "output_gate": "headwise"}
CONFIGS = {
    "loom-chunk": ("loom", EQUAL),
    "loom-chunk-compiled": ("loom", {**EQUAL, "impl": "compiled"}),
    # titans-pytorch's update rule as well: momentum and decay step once per chunk
    "loom-chunkstep": ("loom", {**EQUAL, "momentum_step": "chunk"}),
    "loom-chunkstep-compiled": ("loom", {**EQUAL, "momentum_step": "chunk", "impl": "compiled"}),
    "loom-paper": ("loom", {}),
    "lucidrains": ("lucidrains", {"batch_size": CHUNK}),
    "lucidrains-default": ("lucidrains", {"batch_size": None}),
    # opt-in (not in the default sweep: its first pass compiles for minutes)
    "lucidrains-compiled": ("lucidrains", {"batch_size": CHUNK, "compile": True}),
}
DEFAULT_CONFIGS = [n for n in CONFIGS if n != "lucidrains-compiled"]
NOTES = [
    "Both: d_model 256, 4 heads x 64, depth-2 GELU MLP memory 64 -> 256 -> 64 per head (expansion 4), "
    "gradients of each 64-token chunk taken at that chunk's start weights, momentum and weight decay on, "
    "per-token learning rate, learned per-head W0, a sigmoid output gate per head, no convolution.",
    "loom-chunk: `memory` mixer with retrieval='chunk' (token t reads the weights committed before its "
    "chunk), conv_size=0, output_gate='headwise'; memory_norm on (rmsnorm output, no residual), SiLU + l2 "
    "norm on q/k, output RMSNorm and o_proj; eager PyTorch (impl='auto').",
    "loom-chunk-compiled: the same with impl='compiled' (the memory op's gate coefficients and chunk block "
    "through torch.compile; the rest of the layer eager). Compiles for ~10 s per new shape.",
    "loom-chunkstep (-compiled): loom-chunk (-compiled) with momentum_step='chunk': momentum and weight "
    "decay step once per chunk, with the gates of the chunk's first token, as titans-pytorch steps them once "
    "per chunk (with mean-pooled gates); one chunk-end sum per layer instead of two.",
    "loom-paper: the `memory` mixer as the recipes use it (the paper's block): retrieval='token' (each token "
    "reads its own post-update weights), 4-tap causal conv on q/k/v, elementwise output gate; more work "
    "than either equal-settings side.",
    "lucidrains: NeuralMemory(dim=256, heads=4, dim_head=64, chunk_size=64, batch_size=64, "
    "default_model_kwargs={depth: 2, expansion_factor: 4}, momentum=True), all else default: "
    "input RMSNorm, LayerNorm+residual memory wrapper, no qk norm, per-head retrieve gate, combine_heads. "
    "It reads the weights committed after the last complete chunk (one token later than loom-chunk).",
    "lucidrains-default: its default batch_size=None takes every chunk's gradient at the call's initial "
    "weights W0 (no chunk-to-chunk dependence): a different, cheaper algorithm, shown for reference only.",
    "lucidrains-compiled (opt-in, --configs lucidrains-compiled): torch.compile(NeuralMemory); its first "
    "pass compiles for minutes.",
    "Remaining differences: lucidrains steps momentum and decay once per chunk; loom-chunk steps them at "
    "every token (the paper's recurrence), so its chunk end needs two weighted sums over the chunk's "
    "gradients (momentum and weights) where lucidrains needs one: loom-chunkstep removes that difference. "
    "Its inner loss is a mean over K, Loom's a sum; its lr bound is 1, Loom's 1/(2*64).",
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

    from loom.models.config import build
    from loom.models.mixers import MIXERS, MixerDims, SeqContext
    from loom.models.rope import RopeConfig

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
    import torch
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=D_MODEL, heads=HEADS, dim_head=HEAD_DIM, chunk_size=CHUNK,
                       batch_size=opts["batch_size"], momentum=True,
                       default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)))
    fn = torch.compile(mem) if opts.get("compile") else mem
    return mem, lambda x: fn(x)[0]


def measure(name: str, T: int, repeats: int, threads: int) -> dict:
    """One (module, length) in this process: a warm-up pass (which also compiles, for the compiled
    row), then `repeats` timed passes. The peak RSS of the timed passes over the RSS after the
    warm-up comes from /proc (VmHWM reset by clear_refs); it is only meaningful when the allocator
    returns freed tensors to the system, which run_child arranges for the memory process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side, opts = CONFIGS[name]
    module, run = (build_loom if side == "loom" else build_lucidrains)(opts)
    x = torch.randn(1, T, D_MODEL, requires_grad=True)
    times, cpu = [], []
    base = None
    for i in range(repeats + 1):
        if i == 1:
            base = _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        y = run(x)
        y.pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del y
        x.grad = None
        module.zero_grad(set_to_none=True)
    peak = None if base is None else (_status_kib("VmHWM") - base) / 1024
    sec, cpu_sec = min(times[1:]), min(cpu[1:])
    return {"config": name, "T": T, "seconds": sec, "cpu_seconds": cpu_sec, "all_seconds": times,
            "all_cpu_seconds": cpu, "tokens_per_s": T / sec, "cpu_tokens_per_s": T / cpu_sec,
            "peak_mib": peak, "params": sum(p.numel() for p in module.parameters()),
            "torch": torch.__version__, "threads": threads}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); return that RSS in KiB."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


# glibc's default mmap threshold adapts upwards, after which freed tensors stay in the heap and the
# RSS no longer falls: fixing it at 128 KiB makes every tensor of that size or more its own mapping,
# returned on free, so the RSS follows the live tensors. It slows allocation, hence its own process.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MEMORY_REPEATS = 2


def run_child(name: str, T: int, repeats: int, threads: int, venv: str, timeout: float,
              memory: bool = False) -> dict:
    """Measure in a fresh process: timing (default allocator) or, with `memory`, peak memory."""
    python = sys.executable if CONFIGS[name][0] == "loom" else f"{venv}/bin/python"
    cmd = [python, str(HERE), "--child", name, str(T), str(MEMORY_REPEATS if memory else repeats), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(MEMORY_ENV if memory else {})}
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
    pairs = [(loom, "lucidrains") for loom in ("loom-chunk", "loom-chunk-compiled", "loom-chunkstep",
                                               "loom-chunkstep-compiled", "loom-paper")]
    pairs += [(loom, "lucidrains-compiled") for loom in ("loom-chunk-compiled", "loom-chunkstep-compiled")]
    for loom, ref in pairs:
        cells = []
        for T in lengths:
            a, b = best.get((loom, T)), best.get((ref, T))
            cells += ["-", "-"] if not (a and b) else \
                [f"{a['cpu_tokens_per_s'] / b['cpu_tokens_per_s']:.2f}x", f"{a['peak_mib'] / b['peak_mib']:.2f}x"]
        if any(c != "-" for c in cells):
            lines.append(f"| **{loom} / {ref}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> dict:
    """Per (config, T) over all rounds: the best timed pass's wall and CPU time (the passes least
    disturbed by other jobs; warm-ups excluded) and the highest peak memory of the memory processes."""
    best = {}
    for r in rows:
        if r.get("seconds") is None:
            continue
        b = best.setdefault((r["config"], r["T"]), {"wall": [], "cpu": [], "peak": []})
        if r["kind"] == "memory":
            b["peak"].append(r["peak_mib"])
        else:
            b["wall"] += r["all_seconds"][1:]
            b["cpu"] += r["all_cpu_seconds"][1:]
    return {(c, T): {"tokens_per_s": T / min(b["wall"]), "cpu_tokens_per_s": T / min(b["cpu"]),
                     "cpu_seconds": min(b["cpu"]), "seconds": min(b["wall"]),
                     "peak_mib": max(b["peak"]), "peak_mib_range": [min(b["peak"]), max(b["peak"])]}
            for (c, T), b in best.items() if b["cpu"] and b["peak"] and None not in b["peak"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, T, repeats, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(measure(name, T, repeats, threads)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="create the titans-pytorch venv and exit")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="sweep this many times; the table keeps each "
                   "(module, length)'s best pass over all rounds")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=str(RESULTS / "titans.json"))
    p.add_argument("--report", action="store_true", help="re-print the table of --out from its rows")
    args = p.parse_args()
    if args.report:
        data = json.loads(Path(args.out).read_text())
        lengths = sorted({r["T"] for r in data["rows"]})
        data["table"] = table(summarise(data["rows"]), lengths)
        Path(args.out).write_text(json.dumps(data, indent=1))
        print(data["table"])
        return
    if args.setup:
        setup(args.venv)
        return
    if not Path(f"{args.venv}/bin/python").exists():
        sys.exit(f"no {args.venv}: run `{sys.executable} {HERE} --setup` first")
    rows = []
    for rnd in range(args.rounds):
        for T in args.lengths:
            for name in args.configs:
                for kind in ("time", "memory"):
                    r = run_child(name, T, args.repeats, args.threads, args.venv, args.timeout, kind == "memory")
                    r.update(round=rnd, kind=kind)
                    rows.append(r)
                    msg = r.get("note") or (f"peak {r['peak_mib']:,.0f} MiB" if kind == "memory" else
                                            f"{r['seconds']:.3f} s wall {r['cpu_seconds']:.3f} s CPU")
                    print(f"round {rnd} {name:>19} T={T:>6} {kind:>6}: {msg}  load {r.get('load_before')}",
                          flush=True)
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
