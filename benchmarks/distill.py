"""Distilling the quickstart's attention model into hybrids, against the same hybrids from scratch.

The teacher is recipes/quickstart.yaml trained for its full train.steps (an attention
model that retrieves the passkey at its training length). Each student replaces half of
the teacher's layers (layer 0 of [attn, attn]) with one mixer kind and is trained for
--student-steps at the teacher's batch and length (default 10% of the teacher's tokens):

  (a) distilled: recipes/distill-hybrid.yaml (align stage, then kl stage) from the teacher;
  (b) from scratch: the same `model.layers`, the same data, steps, optimiser and schedule.

Every run is evaluated with `loom eval` at 1x-4x the training length (passkey and NIAH
grids, teacher-forced, the suite's own seeds; benchmarks/longctx.py's `run` does both and
is reused here). Decoding-state bytes at 32K come from `loom info`.

    python benchmarks/distill.py                       # teacher + 4 kinds x (distilled, scratch)
    python benchmarks/distill.py --kinds swa gdn --student-steps 360
    python benchmarks/distill.py --reuse-teacher       # keep a teacher already in --work
    python benchmarks/distill.py --collect             # re-tabulate the runs already in --work

Writes benchmarks/results/distill.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import longctx  # noqa: E402  (the train + `loom eval` helper and the grid parsing)

ROOT = longctx.ROOT
RESULTS = longctx.RESULTS
KINDS = ["swa", "gdn", "rat", "memory"]


def state_mib(recipe: Path, layers: str, seq_len: int) -> float:
    """Decoding-state MiB per sequence at seq_len (bf16), summed over layers, from `loom info`."""
    out = subprocess.run([sys.executable, "-m", "loom.trainer", "info", str(recipe), f"model.layers={layers}",
                          f"data.seq_len={seq_len}"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return round(sum(float(m) for m in re.findall(r":\s+([0-9.]+) MiB", out)), 3)


def one(name: str, recipe: str, steps: int, overrides: list[str], args, reuse: bool = False) -> dict:
    """Train (unless --collect, or reuse and a final checkpoint is there), `loom eval`, then parse.

    Output: <work>/<name>/<recipe>; training/eval commands and parsing are longctx's own
    (train_overrides, the eval flags, run(..., collect=True))."""
    ns = argparse.Namespace(steps=steps, batch_size=args.batch_size, seed=args.seed, set=overrides,
                            seq_len=args.seq_len, mult=args.mult, n=args.n, tasks=["passkey", "niah_single"],
                            work=str(Path(args.work) / name), collect=True)
    out = Path(ns.work) / recipe
    path = ROOT / "recipes" / f"{recipe}.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base = [sys.executable, "-m", "loom.trainer"]
    times = {}
    if not args.collect:
        done = (out / "checkpoints" / f"step-{steps:08d}").is_dir()
        if not (reuse and done):
            subprocess.run(["rm", "-rf", str(out)], check=True)
            t0 = time.time()
            proc = subprocess.run(base + ["train", str(path), f"output_dir={out}", *longctx.train_overrides(ns)],
                                  capture_output=True, text=True, cwd=ROOT, env=env)
            times["train_s"] = round(time.time() - t0, 1)
            if proc.returncode != 0:
                return {"name": name, "error": (proc.stderr.strip().splitlines() or ["train failed"])[-1][:200]}
            (out / "train.log").write_text(proc.stdout)
        t0 = time.time()
        proc = subprocess.run(base + ["eval", str(path), f"output_dir={out}", *longctx.train_overrides(ns),
                                      "--lengths", ",".join(str(m * args.seq_len) for m in args.mult),
                                      "--tasks", ",".join(ns.tasks), "--examples", str(args.n), "--no-generate",
                                      "--out", str(out / "suite")], capture_output=True, text=True, cwd=ROOT, env=env)
        times["eval_s"] = round(time.time() - t0, 1)
        if proc.returncode != 0:
            return {"name": name, "error": (proc.stderr.strip().splitlines() or ["eval failed"])[-1][:200]}
    row = {**longctx.run(recipe, ns), **times, "name": name}
    if "error" not in row:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train = [r for r in recs if "split" not in r]
        row["tokens"] = train[-1].get("tokens")
        for key in ("kl", "teacher_loss"):
            vals = [r[key] for r in train if key in r]
            row[f"final_{key}"] = vals[-1] if vals else None
        log = (out / "train.log").read_text() if (out / "train.log").is_file() else ""
        row["distill_log"] = [x for x in log.splitlines() if x.startswith("distill:")]
    return row


def pct(x) -> str:
    return longctx.pct(x)


def table(rows: list[dict], mult: list[int], seq_len: int) -> str:
    lens = [m * seq_len for m in mult]
    head = ("| run | layers | tokens | val loss | " + " | ".join(f"passkey@{n}" for n in lens) + " | "
            + " | ".join(f"niah@{n}" for n in lens) + " | state@32K | train s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |")
            continue
        g = r["grids"]
        cells = [pct(v) for v in g.get("passkey", [None] * len(lens))]
        cells += [pct(v) for v in g.get("niah_single", [None] * len(lens))]
        tok = f"{r['tokens'] / 1e6:.2f}M" if r.get("tokens") else "-"
        lines.append(f"| {r['name']} | {r.get('layers', '-')} | {tok} | {r['val_loss']:.3f} | " + " | ".join(cells)
                     + f" | {r['state_mib_32k']:.2f} MiB | {r['train_s']:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """Each distilled student against the targets (teacher val loss + 0.05, 90% of its passkey@1x,
    <= 10% of its tokens, ahead of the from-scratch twin on val loss and passkey@1x)."""
    by = {r["name"]: r for r in rows if "error" not in r}
    t = by.get("teacher")
    out = []
    if t is None:
        return ["no teacher result"]
    for r in rows:
        if not r["name"].startswith("distill-") or "error" in r:
            continue
        kind = r["name"].split("-", 1)[1]
        s = by.get(f"scratch-{kind}")
        pk, tpk = r["grids"]["passkey"][0], t["grids"]["passkey"][0]
        checks = {
            "val loss within 0.05 of teacher": r["val_loss"] <= t["val_loss"] + 0.05,
            "passkey@1x >= 90% of teacher": pk >= 0.9 * tpk,
            "tokens <= 10% of teacher": (r.get("tokens") or 0) <= 0.1 * (t.get("tokens") or 0) + 1,
            "ahead of scratch (val loss and passkey@1x)": s is not None and r["val_loss"] < s["val_loss"]
            and pk >= s["grids"]["passkey"][0],
        }
        miss = [k for k, ok in checks.items() if not ok]
        out.append(f"{kind}: val {r['val_loss']:.3f} (teacher {t['val_loss']:.3f}"
                   + (f", scratch {s['val_loss']:.3f}" if s else "") + f"), passkey@1x {pct(pk)} (teacher {pct(tpk)}"
                   + (f", scratch {pct(s['grids']['passkey'][0])}" if s else "") + "): "
                   + ("all targets met" if not miss else "MISS " + "; ".join(miss)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="*", default=KINDS)
    p.add_argument("--teacher-steps", type=int, default=1800, help="default: quickstart's train.steps")
    p.add_argument("--student-steps", type=int, default=180, help="default: 10%% of the teacher's")
    p.add_argument("--align-steps", type=int, default=None, help="default: a third of --student-steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--mult", type=int, nargs="*", default=[1, 2, 3, 4])
    p.add_argument("--n", type=int, default=16, help="examples per grid cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/loom-distill")
    p.add_argument("--name", default="distill", help="results file name under benchmarks/results/")
    p.add_argument("--reuse-teacher", action="store_true", help="keep a finished teacher run in --work")
    p.add_argument("--collect", action="store_true", help="only tabulate the runs already in --work")
    args = p.parse_args()
    align = args.align_steps or args.student_steps // 3
    teacher_dir = Path(args.work) / "teacher" / "quickstart"
    rows = []

    def go(name, recipe, steps, sets, reuse=False):
        row = one(name, recipe, steps, sets, args, reuse)
        layers = "[" + row.get("layers", "attn, attn") + "]"
        row["state_mib_32k"] = state_mib(ROOT / "recipes" / "quickstart.yaml", layers, 32768)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tasks"}), flush=True)

    go("teacher", "quickstart", args.teacher_steps, [], reuse=args.reuse_teacher)
    sched = ["optim.schedule=cosine", "optim.warmup_steps=10"]   # distill-hybrid.yaml's optimiser, for both twins
    for kind in args.kinds:
        layers = f"model.layers=[{kind},attn]"
        go(f"distill-{kind}", "distill-hybrid", args.student_steps,
           [layers, f"distill.teacher={teacher_dir}",
            f"distill.stages=[{{kind: align, steps: {align}}}, {{kind: kl, steps: {args.student_steps - align}, "
            f"temperature: 2.0, kl_weight: 0.9}}]", *sched])
        go(f"scratch-{kind}", "quickstart", args.student_steps, [layers, *sched])
    settings = dict(vars(args))
    settings["align_steps"] = align
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                           "verdicts": verdicts(rows)}, indent=1) + "\n")
    print(table(rows, args.mult, args.seq_len))
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
