"""Quality of the small recipes side by side: same data, same token budget.

Each recipe is trained with identical data (stdlib text + passkey), sequence
length, batch, steps and seed through the real trainer; the table reports the
final validation loss, perplexity and passkey accuracy at the training length.

    python benchmarks/quality.py                                  # default recipe list
    python benchmarks/quality.py --recipes recipes/rat-swa.yaml --steps 300

Writes benchmarks/results/quality.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = ["quickstart", "swa", "rat", "rat-swa", "s2-hybrid", "gated-attn", "moh", "linear-attn",
           "titans-mal", "titans-mag", "titans-mac", "hybrid-all"]


def common_overrides(args) -> list[str]:
    return [
        f"data.seq_len={args.seq_len}",
        f"data.sources=[{{kind: stdlib, weight: 0.5, max_bytes: 3000000}}, {{kind: passkey, weight: 0.5}}]",
        "data.val_sources=null",
        "data.val_windows=32",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        "train.grad_accum=1",
        f"train.eval_every={args.steps}",
        f"train.save_every={args.steps}",
        f"train.log_every={max(1, args.steps // 10)}",
        f"seed={args.seed}",
        "eval.passkey_lengths=[]",
        "eval.passkey_n=16",
        "model.d_model=128",
        "model.n_heads=4",
        "model.n_kv_heads=null",
        "parallel.engine=single",
        "parallel.cp=1",
    ]


def run(recipe: Path, args, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(recipe), f"output_dir={out_dir}", *common_overrides(args)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    row = {"recipe": recipe.stem, "seconds": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return row
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in lines if r.get("split") == "val"][-1]
    row.update({"val_loss": ev["loss"], "ppl": ev["ppl"], "passkey": ev.get(f"passkey@{args.seq_len}"),
                "layers": " ".join(l for l in proc.stdout.split("layers (")[1].split(")")[0].split(", "))})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/loom-quality")
    args = p.parse_args()
    recipes = [Path(r) for r in args.recipes] if args.recipes else \
        [ROOT / "recipes" / f"{n}.yaml" for n in DEFAULT if (ROOT / "recipes" / f"{n}.yaml").exists()]
    rows = []
    for recipe in recipes:
        out = Path(args.work) / recipe.stem
        subprocess.run(["rm", "-rf", str(out)], check=True)
        row = run(recipe, args, out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\n{tokens / 1e6:.2f}M tokens per recipe, seq_len {args.seq_len}, d_model 128\n")
    print("| recipe | layers | val loss | ppl | passkey@%d | train s |" % args.seq_len)
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | - | error: {r['error']} | | | |")
        else:
            pk = "-" if r["passkey"] is None else f"{r['passkey']:.0%}"
            print(f"| {r['recipe']} | {r['layers']} | {r['val_loss']:.3f} | {r['ppl']:.2f} | {pk} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
