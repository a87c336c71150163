"""Which hybrid keeps retrieving beyond its training length, and at what cost in loss.

Trains each small recipe (all inherit recipes/quickstart.yaml: the same data
mix, sequence length, width, optimiser) with the same steps, batch and seed
through the real trainer, then runs `loom eval` on the final checkpoint at 1x,
2x, 4x and 8x the training length (teacher-forced, the suite's own seeds).
Reports the final validation loss, the passkey and NIAH depth x length grids
(mean over depths per length) and the mean of the other suite tasks per length.

    python benchmarks/longctx.py                                   # every recipe, quickstart budget
    python benchmarks/longctx.py --recipes quickstart swa --steps 300 --n 8
    python benchmarks/longctx.py --jobs 2 --threads 1              # two recipes at a time
    python benchmarks/longctx.py --collect --steps 100 ...         # tabulate runs already in --work

Writes benchmarks/results/longctx.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = ["quickstart", "swa", "rat-swa", "s2-hybrid", "gated-attn", "moh", "titans-mal", "linear-attn", "gdn-hybrid", "mamba2-hybrid"]
SUITE = ["passkey", "niah_single", "niah_multikey", "vt", "mqar"]


def train_overrides(args) -> list[str]:
    """What every recipe shares beyond quickstart.yaml (titans-mal halves its batch otherwise)."""
    out = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"seed={args.seed}",
           f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
           f"train.log_every={max(1, args.steps // 10)}", "eval.suite_tasks=[]", "parallel.cp=1"]
    return out + list(args.set)


def run(recipe: str, args) -> dict:
    """Train and evaluate one recipe (or, with --collect, read what an earlier run left in --work)."""
    out = Path(args.work) / recipe
    path = ROOT / "recipes" / f"{recipe}.yaml"
    row: dict = {"recipe": recipe}
    if not args.collect:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        base = [sys.executable, "-m", "loom.trainer"]
        t0 = time.time()
        proc = subprocess.run(base + ["train", str(path), f"output_dir={out}", *train_overrides(args)],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        row["train_s"] = round(time.time() - t0, 1)
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["train failed"])[-1][:200]
            return row
        (out / "train.log").write_text(proc.stdout)
        t0 = time.time()
        proc = subprocess.run(base + ["eval", str(path), f"output_dir={out}", *train_overrides(args),
                                      "--lengths", ",".join(str(m * args.seq_len) for m in args.mult),
                                      "--tasks", ",".join(args.tasks), "--examples", str(args.n), "--no-generate",
                                      "--out", str(out / "suite")], capture_output=True, text=True, cwd=ROOT,
                              env=env)
        row["eval_s"] = round(time.time() - t0, 1)
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["eval failed"])[-1][:200]
            return row
    if not (out / "suite" / "results.json").is_file():
        row["error"] = f"no results in {out}"
        return row
    log = (out / "train.log").read_text() if (out / "train.log").is_file() else ""
    if "layers (" in log:
        row["layers"] = log.split("layers (")[1].split(")")[0]
        row["params_m"] = float(log.split("model: ")[1].split("M")[0])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    row["val_loss"] = [r for r in records if r.get("split") == "val"][-1]["loss"]
    row.setdefault("train_s", round([r for r in records if "split" not in r][-1]["elapsed_s"], 1))
    res = json.loads((out / "suite" / "results.json").read_text())
    row["grids"] = {name: [mean([g["teacher_forced"][d][j] for d in range(len(g["depths"]))])
                           for j in range(len(g["lengths"]))] for name, g in res["grids"].items()}
    others = {}
    for length in res["lengths"]:
        cells = [c["teacher_forced"] for name, by_f in res["tasks"].items() if name not in res["grids"]
                 for c in [by_f["repeat"].get(str(length), {})] if "teacher_forced" in c]
        others[str(length)] = mean(cells)
    row["other_tasks"] = others
    row["loss_at"] = {n: c["mean"] for n, c in res["loss_by_position"].items()}   # real text, by eval length
    row["tasks"] = res["tasks"]
    return row


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def table(rows: list[dict], args) -> str:
    lens = [m * args.seq_len for m in args.mult]
    head = ("| recipe | params | val loss | " + " | ".join(f"text loss@{n}" for n in lens) + " | "
            + " | ".join(f"passkey@{n}" for n in lens) + " | "
            + " | ".join(f"niah@{n}" for n in lens) + " | " + " | ".join(f"other@{n}" for n in lens)
            + " | train s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | error: {r['error']} |")
            continue
        g = r["grids"]
        loss_at = r.get("loss_at", {})
        cells = ["-" if str(n) not in loss_at else f"{loss_at[str(n)]:.3f}" for n in lens]
        cells += [pct(v) for v in g.get("passkey", [None] * len(lens))]
        cells += [pct(v) for v in g.get("niah_single", [None] * len(lens))]
        cells += [pct(r["other_tasks"].get(str(n))) for n in lens]
        params = f"{r['params_m']:.2f}M" if "params_m" in r else "-"
        lines.append(f"| {r['recipe']} | {params} | {r['val_loss']:.3f} | " + " | ".join(cells)
                     + f" | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=DEFAULT)
    p.add_argument("--steps", type=int, default=None, help="default: quickstart's train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="default: quickstart's train.batch_size")
    p.add_argument("--mult", type=int, nargs="*", default=[1, 2, 4, 8], help="multiples of the training length")
    p.add_argument("--tasks", nargs="*", default=SUITE)
    p.add_argument("--n", type=int, default=8, help="examples per grid cell / task cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="recipes trained at the same time")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every recipe")
    p.add_argument("--work", default="/tmp/loom-longctx")
    p.add_argument("--name", default="longctx", help="results file name under benchmarks/results/")
    p.add_argument("--collect", action="store_true", help="only tabulate the runs already in --work")
    args = p.parse_args()
    import yaml

    quick = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    args.seq_len = quick["data"]["seq_len"]
    args.steps = args.steps or quick["train"]["steps"]
    args.batch_size = args.batch_size or quick["train"]["batch_size"]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda r: run(r, args), args.recipes))
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "tasks"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\n{tokens / 1e6:.2f}M training tokens per recipe, seq_len {args.seq_len}, {args.n} examples per "
          f"cell, teacher-forced; text loss: validation text at that length (nats/token); "
          f"passkey/niah: mean over depths; other: mean of "
          f"{', '.join(t for t in args.tasks if t not in ('passkey', 'niah_single'))}\n")
    print(table(rows, args))


if __name__ == "__main__":
    main()
