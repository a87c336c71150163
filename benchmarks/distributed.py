"""Context parallelism on CPU: peak memory per rank, tokens/s, bytes moved per mixer.

For cp = 1, 2, 4 and each sequence length, a fresh `torchrun` (gloo) group of cp
ranks trains a small attention model (HybridLM, d_model 256, 4 heads x 64,
4 attn layers, byte vocabulary 256, fp32, batch 1) on ONE sequence of T tokens
sharded over the cp ranks. Each rank runs the trainer's own code path:
`loom.trainer.distributed.mesh.init_process_groups` builds the dp x cp mesh and the
CPContext (zigzag, `--impl` ring|ulysses), `Env.shard_batch` shards every (B, T)
field with `loom.kernels.context_parallel.shard_sequence`, the model runs with
`cp=env.cp`, `Env.reduce_loss` gives the loss, gradients are all-reduced (averaged)
over the ranks as the ddp engine does, and AdamW steps. The batch is the trainer's
format (input_ids, labels, position_ids, seq_ids; one document per window).

Memory (per rank): ru_maxrss after the model and optimiser are built (`base`:
interpreter, torch, weights) and after `--steps` training steps (`peak`);
activation memory = peak - base. Time: the last step's wall time; tokens/s =
T / step time (the tokens of the sequence the cp group processes per step).

Longest sequence in a memory budget: one model for every run,
    act(T, cp) = d + a T/cp + c (T/2cp)^2   (the last term only for cp > 1),
fitted by least squares on all runs with T <= --fit-max: `a` is what the model
keeps per token held; `c` any remaining (T/2cp)^2 cost of ring attention (it
was the whole chunk-pair blocks before ring.py tiled query rows; since then
it fits as noise, so the README reports the estimate with and without it);
cp = 1 uses torch SDPA (flash kernel) and has no T x T term. Then
base + act(T, cp) = budget is solved for T. Runs longer than --fit-max are
held out and compared with the prediction.

Communication: analytic bytes one rank sends per layer from the formulas in
kernels/context_parallel (comm.py `comm_bytes`, rat.py `rat_comm_bytes`; the
linear state scan and the Titans memory carry from the formulas stated in the
docstrings of state_scan.py and memory.py).

    python benchmarks/distributed.py --lengths 4096 8192 16384           # cp 1 2 4
    python benchmarks/distributed.py --append --cps 2 --lengths 24576 --steps 1   # a held-out point
    python benchmarks/distributed.py --report             # re-analyse the saved runs
    python benchmarks/distributed.py --cps 1 2 --lengths 16384 32768 --steps 3
    python benchmarks/distributed.py --comm-only          # only the bytes table

Writes benchmarks/results/distributed.json and prints markdown tables.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
MODEL = {"vocab_size": 256, "d_model": 256, "n_heads": 4, "layers": ["attn", "x4"]}
GIB = 2**30


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------- worker (one rank)
def worker(T: int, steps: int, impl: str, out_dir: str) -> None:
    import torch
    import torch.distributed as tdist

    from loom.models.model import HybridLM, ModelConfig
    from loom.trainer.config import ParallelConfig
    from loom.trainer.distributed.dist import Env
    from loom.trainer.distributed.mesh import init_process_groups, launched_world_size

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world = launched_world_size()
    env = init_process_groups(ParallelConfig(engine="ddp", cp=world, cp_impl=impl)) if world > 1 else Env()
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**MODEL))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (1, T + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(),
             "position_ids": torch.arange(T)[None], "seq_ids": torch.zeros(1, T, dtype=torch.long)}
    if world > 1:
        tdist.barrier()
    base = rss_mib()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = env.shard_batch(batch)
        out = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"], cp=env.cp)
        loss = env.reduce_loss(model, out.hidden, b["labels"], 1024)
        (loss + out.aux_loss).backward()
        if world > 1:  # what every engine does: average the gradients over all ranks
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            tdist.all_reduce(flat)
            flat /= world
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
            del flat
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(env.mean(loss.detach()))
        if world > 1:
            tdist.barrier()
        times.append(time.perf_counter() - t0)
        del out, loss, b
    peak = rss_mib()
    rec = {"rank": env.rank, "world": world, "T": T, "L": T // world, "base_mib": base, "peak_mib": peak,
           "act_mib": peak - base, "step_s": times, "loss": losses}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(rec))
    if world > 1:
        tdist.barrier()
        tdist.destroy_process_group()


def run_group(cp: int, T: int, steps: int, impl: str, threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}",
               __file__, "--worker", str(T), str(steps), impl, tmp]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **MALLOC}
        t0 = time.time()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"cp": cp, "T": T, "impl": impl, "error": f"timeout > {timeout:.0f} s"}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        if out.returncode != 0 or len(ranks) != cp:
            return {"cp": cp, "T": T, "impl": impl, "error": (out.stderr or out.stdout)[-1500:]}
    step = max(r["step_s"][-1] for r in ranks)
    return {"cp": cp, "T": T, "impl": impl, "steps": steps, "threads_per_rank": threads,
            "base_mib": max(r["base_mib"] for r in ranks), "peak_mib": max(r["peak_mib"] for r in ranks),
            "act_mib": max(r["act_mib"] for r in ranks), "act_mib_per_rank": [r["act_mib"] for r in ranks],
            "step_s": step, "tokens_per_s": T / step, "loss": ranks[0]["loss"], "wall_s": time.time() - t0}


# ----------------------------------------------------------------- analytic communication
def comm_table(T: int, cps: list[int], elem_bytes: int = 4) -> list[dict]:
    """Bytes one rank sends per layer and step (forward, backward) at the benchmark shape."""
    from loom.kernels.context_parallel import CPContext, comm_bytes, rat_comm_bytes
    from loom.kernels.context_parallel.memory import state_hops

    B, H, G, K = 1, MODEL["n_heads"], MODEL["n_heads"], MODEL["d_model"] // MODEL["n_heads"]
    a = max(elem_bytes, 4)
    n_weights = _memory_weights()
    rows = []
    for cp in cps:
        if cp == 1:
            continue
        n_local = 2  # zigzag
        lin = (cp - 1) * n_local * B * (H * K * K + H) * a  # state_scan.py docstring (V = K)
        # memory.py docstring: one message of B*N*e (+ 8 B offset forward) per hop to ANOTHER rank;
        # N = 3 x the memory weights (W, S, chunk-start weights). Busiest rank's count of hops:
        sends = max(sum((nxt is not None and nxt != r) for _, _, nxt in
                        state_hops(T, CPContext(None, r, cp, "ring", "zigzag"))) for r in range(cp))
        back = max(sum((prv is not None and prv != r) for _, prv, _ in
                       state_hops(T, CPContext(None, r, cp, "ring", "zigzag"))) for r in range(cp))
        mem_msg = B * 3 * n_weights * elem_bytes
        kw = dict(batch=B, seq_len=T, n_heads=H, n_kv_heads=G, head_dim=K, cp=cp, elem_bytes=elem_bytes)
        entries = [
            ("attn", "ring", "comm.py comm_bytes('ring')", comm_bytes("ring", **kw)),
            ("attn", "ulysses", "comm.py comm_bytes('ulysses')", comm_bytes("ulysses", **kw)),
            ("swa (W=512)", "halo", "comm.py comm_bytes('halo')", comm_bytes("halo", window=512, **kw)),
            ("rat (L=16)", "chunk-state all-gather", "rat.py rat_comm_bytes",
             rat_comm_bytes(batch=B, seq_len=T, n_heads=H, head_dim=K, chunk=16, cp=cp, state_bytes=a)),
            ("linear", "state prefix scan", "state_scan.py docstring", (lin, lin)),
            ("memory (Titans)", "state carry", "memory.py docstring",
             (sends * (mem_msg + 8 * B), back * mem_msg)),
        ]
        for kind, path, src, (fw, bw) in entries:
            rows.append({"cp": cp, "T": T, "kind": kind, "path": path, "source": src,
                         "forward": int(fw), "backward": int(bw), "step": int(fw + bw)})
    return rows


def _memory_weights() -> int:
    """Numbers in one row's memory weights (all heads) of a d_model 256 Titans memory layer."""
    import torch  # noqa: F401

    from loom.models.config import build
    from loom.models.mixers import MIXERS, MixerDims
    from loom.models.rope import RopeConfig

    dims = MixerDims(d_model=MODEL["d_model"], n_heads=MODEL["n_heads"], n_kv_heads=MODEL["n_heads"],
                     head_dim=MODEL["d_model"] // MODEL["n_heads"], layer_idx=0, n_layers=1, rope=RopeConfig())
    m = MIXERS["memory"](dims, build(MIXERS["memory"].Config, {}, "memory"))
    mem = m if hasattr(m, "w0") else m.memory
    return sum(w.numel() for w in mem.w0)


# ----------------------------------------------------------------- analysis + report
def _fit(runs: list[dict]) -> tuple[float, float, float]:
    """(d, a, c) of the per-rank activation model, least squares over ALL runs (every cp, every T):

        act(T, cp) = d + a * T / cp + c * (T / (2 cp))^2 [cp > 1]

    a: bytes kept per token held (the same model code runs on every token);
    c: bytes per element of one (T / 2cp) x (T / 2cp) chunk pair that ring attention
       materialises at once (kernels/context_parallel/ring.py `_block_forward` /
       `_block_backward`: scores, probabilities, dP, dS in fp32 for the H heads);
       cp = 1 runs torch SDPA (flash kernel, no T x T tensor), so no such term;
    d: a constant (gradients, optimiser state, buffers)."""
    import numpy as np

    A = np.array([[1.0, r["T"] / r["cp"], (r["T"] / (2 * r["cp"])) ** 2 if r["cp"] > 1 else 0.0] for r in runs])
    m = np.array([r["act_mib"] for r in runs])
    d, a, c = np.linalg.lstsq(A, m, rcond=None)[0]
    return float(d), float(a), max(float(c), 0.0)


def _predict(d: float, a: float, c: float, T: float, cp: int) -> float:
    return d + a * T / cp + (c * (T / (2 * cp)) ** 2 if cp > 1 else 0.0)


def _solve(d: float, a: float, c: float, room: float, cp: int) -> float:
    """Largest T with act(T, cp) <= room (MiB)."""
    if cp == 1 or c == 0:
        return (room - d) / a * cp
    # u = T / (2 cp):  c u^2 + 2 a u + d - room = 0
    u = (-2 * a + (4 * a * a + 4 * c * (room - d)) ** 0.5) / (2 * c)
    return 2 * cp * u


def fit_budget(runs: list[dict], budget_gib: float, fit_max: int) -> dict:
    """Longest T per cp with base + act(T, cp) <= budget, the model fitted on the runs with T <= fit_max."""
    fit_runs = [r for r in runs if r["T"] <= fit_max]
    if len(fit_runs) < 3:
        return {}
    d, a, c = _fit(fit_runs)
    out = {}
    for cp in sorted({r["cp"] for r in runs}):
        base = max(r["base_mib"] for r in runs if r["cp"] == cp)
        room = budget_gib * 1024 - base
        out[cp] = {"d_mib": d, "a_kib_per_token": a * 1024, "c_bytes_per_block_elem": c * 2**20, "base_mib": base,
                   "fit_lengths": sorted({r["T"] for r in fit_runs}), "longest_T": _solve(d, a, c, room, cp),
                   "longest_T_without_block_term": _solve(d, a, 0.0, room, cp)}
    return out


def fit_check(runs: list[dict], fit_max: int) -> list[dict]:
    """Validate the extrapolation: predict every measured run with T > fit_max from the fit on the others;
    plus the residual of every fitted run."""
    fit_runs = [r for r in runs if r["T"] <= fit_max]
    if len(fit_runs) < 3:
        return []
    d, a, c = _fit(fit_runs)
    return [{"cp": r["cp"], "T": r["T"], "held_out": r["T"] > fit_max,
             "predicted_mib": _predict(d, a, c, r["T"], r["cp"]), "measured_mib": r["act_mib"]} for r in runs]


def markdown(runs, ratios, budget, comm, budget_gib, checks=(), impl="ring") -> str:
    lines = ["| cp impl | cp | T (global) | tokens/rank | base RSS MiB | peak RSS MiB | activation MiB/rank | "
             "step s | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['cp']} | {r['T']} | {r['T'] // r['cp']} | - | - | "
                         f"failed: {r['error'][-80:]!r} | - | - |")
            continue
        lines.append(f"| {r['impl'] if r['cp'] > 1 else '-'} | {r['cp']} | {r['T']} | {r['T'] // r['cp']} | "
                     f"{r['base_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['act_mib']:.0f} | {r['step_s']:.1f} | {r['tokens_per_s']:.0f} |")
    lines += ["", f"Activation memory per rank, ratio ({impl}; measured, and the fitted model without the "
              "ring-block term as a projection):", "",
              "| T | cp=1 -> cp=2 measured | cp=2 -> cp=4 measured | cp=1 -> cp=2 projected | "
              "cp=2 -> cp=4 projected |", "|---:|---:|---:|---:|---:|"]
    for T, rr in sorted(ratios.items()):
        f = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        lines.append(f"| {T} | {f(rr.get('1->2'))} | {f(rr.get('2->4'))} | "
                     f"{f(rr.get('1->2 projected, no block term'))} | {f(rr.get('2->4 projected, no block term'))} |")
    if budget:
        b0 = next(iter(budget.values()))
        lines += ["", f"Fit on T in {b0['fit_lengths']} (all cp): act = {b0['d_mib']:.0f} MiB + "
                  f"{b0['a_kib_per_token']:.1f} KiB x T/cp + {b0['c_bytes_per_block_elem']:.1f} B x (T/2cp)^2 [cp>1]",
                  "", f"| cp | base MiB | longest T in {budget_gib:g} GiB/rank (fit) | same without the ring-block term "
                  "(projection) |", "|---:|---:|---:|---:|"]
        for cp, b in sorted(budget.items()):
            lines.append(f"| {cp} | {b['base_mib']:.0f} | {b['longest_T'] / 1024:.0f}K | "
                         f"{b['longest_T_without_block_term'] / 1024:.0f}K |")
    if checks:
        lines += ["", "Model vs measurement (held out: not used by the fit):", "",
                  "| cp | T | held out | predicted MiB | measured MiB |", "|---:|---:|---|---:|---:|"]
        for c in checks:
            lines.append(f"| {c['cp']} | {c['T']} | {'yes' if c['held_out'] else ''} | {c['predicted_mib']:.0f} | "
                         f"{c['measured_mib']:.0f} |")
    if comm:
        T = comm[0]["T"]
        lines += ["", f"Bytes one rank sends per layer and training step (B=1, T={T}, H=G=4, K=64, fp32 "
                  "activations, zigzag, document ids passed), forward / backward; x4 for the 4-layer model:", "",
                  "| mixer | cp path | formula | " + " | ".join(f"cp={c} fwd / bwd" for c in
                                                          sorted({r['cp'] for r in comm})) + " |",
                  "|---|---|---|" + "---:|" * len({r['cp'] for r in comm})]
        for kind, path, src in dict.fromkeys((r["kind"], r["path"], r["source"]) for r in comm):
            cells = [f"{_mb(r['forward'])} / {_mb(r['backward'])}" for r in comm
                     if (r["kind"], r["path"]) == (kind, path)]
            lines.append(f"| {kind} | {path} | {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--steps", type=int, default=2, help="training steps per run (the last one is timed)")
    ap.add_argument("--impl", default="ring", choices=["ring", "ulysses"])
    ap.add_argument("--threads", type=int, default=0, help="threads per rank (0: max(1, cores // cp))")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--comm-only", action="store_true")
    ap.add_argument("--append", action="store_true", help="merge into the existing --out JSON")
    ap.add_argument("--report", action="store_true", help="no runs: re-analyse the runs in --out")
    ap.add_argument("--comm-len", type=int, default=16384, help="sequence length of the bytes table")
    ap.add_argument("--fit-max", type=int, default=16384, help="longest length used by the memory fit")
    ap.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = ap.parse_args()

    runs = []
    out = Path(args.out)
    if args.report:
        runs = json.loads(out.read_text())["runs"]
    elif args.append and out.exists():  # keep earlier runs of other (cp, T, impl)
        new = {(c, T, args.impl) for c in args.cps for T in args.lengths}
        runs = [r for r in json.loads(out.read_text())["runs"] if (r["cp"], r["T"], r["impl"]) not in new]
    if not (args.comm_only or args.report):
        for T in args.lengths:
            for cp in args.cps:
                threads = args.threads or max(1, (os.cpu_count() or 1) // cp)
                r = run_group(cp, T, args.steps, args.impl, threads, args.timeout)
                print(json.dumps({k: v for k, v in r.items() if k != "loss"}), flush=True)
                runs.append(r)
    runs.sort(key=lambda r: (r["impl"] != "ring", r["impl"], r["T"], r["cp"]))
    ok = {(r["cp"], r["T"]): r for r in runs if "act_mib" in r and r["impl"] == args.impl}
    ratios = {}
    for T in sorted({T for _, T in ok}):
        a1, a2, a4 = (ok.get((c, T), {}).get("act_mib") for c in (1, 2, 4))
        if (a1 and a2) or (a2 and a4):
            ratios[T] = {"1->2": a1 / a2 if a1 and a2 else None, "2->4": a2 / a4 if a2 and a4 else None}
    budget = fit_budget(list(ok.values()), args.budget_gib, args.fit_max)
    fit_runs = [r for r in ok.values() if r["T"] <= args.fit_max]
    if len(fit_runs) >= 3:  # what the ratios would be without ring.py's whole-block transients (projection)
        d, a, _ = _fit(fit_runs)
        for T, rr in ratios.items():
            p1, p2, p4 = (_predict(d, a, 0.0, T, c) for c in (1, 2, 4))
            rr["1->2 projected, no block term"], rr["2->4 projected, no block term"] = p1 / p2, p2 / p4
    checks = fit_check(list(ok.values()), args.fit_max)
    comm = comm_table(args.comm_len, sorted(set(args.cps) | {2, 4}))
    print(markdown(runs, ratios, budget, comm, args.budget_gib, checks, args.impl))
    if not args.comm_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": MODEL, "dtype": "fp32", "batch": 1, "impl": args.impl,
                                   "steps": args.steps, "runs": runs, "activation_ratios": ratios,
                                   "budget_gib": args.budget_gib, "longest_seq": budget,
                                   "fit_check": checks, "comm_bytes": comm},
                                  indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
