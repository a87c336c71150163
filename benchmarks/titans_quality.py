"""Titans quality: does the neural memory carry a passkey past the attention window?

Trains recipes/titans-mal.yaml (seq_len 256: [memory, swa] x 2, swa window 64)
and the same model with the memory removed, through the real trainer with the
same data, steps and seed, then scores each run's final checkpoint on passkey
windows of seq_len tokens with the needle at depths 0.1 / 0.5 / 0.9:

    mal        [memory, swa] x 2    the recipe
    mal_swa4   [swa] x 4            memory layers replaced by swa layers of the same window
    mal_swa2   [swa] x 2            memory layers dropped (receptive field 2 x 64 tokens)
    attn4      [attn] x 4           full attention, a reference that sees every token

The passkey question ends the window, so the key's digits sit about 220 / 148 / 76
tokens before the answer at depths 0.1 / 0.5 / 0.9 (byte tokenizer): past one
64-token window at every depth, and past two windows (the reach of the
two-swa models) at 0.1 and 0.5. Four stacked windows reach 256 tokens, so
mal_swa4 can relay the key in principle.

Reported per run: the trainer's final val loss and passkey@256 (all five
digits right, teacher-forced, 16 examples per depth), and, from the final
checkpoint on `--n` fresh examples per depth, the same exact-match accuracy,
the share of answer digits right and the mean answer-token loss (chance:
ln 10 = 2.30 nats per digit), which still separate runs when neither
retrieves whole keys.

    .venv/bin/python benchmarks/titans_quality.py                      # ~10-25 min per run on 2 busy cores
    .venv/bin/python benchmarks/titans_quality.py --variants mal mal_swa4 --steps 600
    .venv/bin/python benchmarks/titans_quality.py --passkey-only --work /tmp/loom-titans-quality-pk \
        --out benchmarks/results/titans_quality_passkey_only.json

Writes benchmarks/results/titans_quality.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = ROOT / "recipes" / "titans-mal.yaml"
VARIANTS = {  # name -> model.layers override (None: the recipe's own)
    "mal": None,
    "mal_swa4": "[swa, x4]",
    "mal_swa2": "[swa, x2]",
    "attn4": "[attn, x4]",  # full attention: a reference that sees every token, not a memory ablation
}
PASSKEY_ONLY = "data.sources=[{kind: passkey, weight: 1.0}]"
DEPTHS = (0.1, 0.5, 0.9)


def overrides(name: str, args, out_dir: Path) -> list[str]:
    ov = [f"output_dir={out_dir}", f"train.steps={args.steps}", f"seed={args.seed}",
          f"train.eval_every={args.steps // 3}", f"train.save_every={args.steps}",
          f"train.log_every={max(1, args.steps // 12)}"]
    if VARIANTS[name] is not None:
        ov.append(f"model.layers={VARIANTS[name]}")
    if args.passkey_only:
        ov.append(PASSKEY_ONLY)
    return ov


def train(name: str, args, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "trainer", "train", str(RECIPE), *overrides(name, args, out_dir)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in lines if r.get("split") == "val"]
    train_rows = [r for r in lines if "split" not in r]
    return {"variant": name, "layers": VARIANTS[name] or "[[memory, swa], x2]",
            "wall_s": round(time.time() - t0, 1), "train_s": round(train_rows[-1]["elapsed_s"], 1),
            "val_loss": ev[-1]["loss"], "passkey_trainer": ev[-1].get("passkey@256"),
            "passkey_trainer_by_depth": {d: ev[-1].get(f"passkey@256/depth{d:g}") for d in DEPTHS},
            "curve": [{"step": r["step"], "val_loss": r["loss"], "passkey": r.get("passkey@256")} for r in ev]}


def score(name: str, args, out_dir: Path) -> dict:
    """Exact-match, digit accuracy and answer loss per depth on the final checkpoint."""
    import torch

    from trainer.checkpoint import CheckpointManager
    from trainer.config import load_config
    from trainer.data import load_tokenizer, passkey_examples
    from trainer.evaluate import forward_hidden, token_losses
    from trainer.train import build_model

    torch.set_num_threads(args.threads)
    cfg = load_config(str(RECIPE), overrides(name, args, out_dir))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer)
    mgr = CheckpointManager(cfg.run_dir)
    tensors, _, _ = mgr.load(mgr.latest_valid(log=print))
    model.load_state_dict(tensors)
    model.eval()
    out = {}
    with torch.no_grad():
        for depth in DEPTHS:
            # seed + 7: examples the trainer's own passkey eval (seed + 1) never showed
            batches = passkey_examples(tokenizer, cfg.data.seq_len, depth, args.n, cfg.seed + 7, batch_size=16)
            exact = digits = n_digits = n_ex = 0
            loss = 0.0
            for batch in batches:
                losses, correct = token_losses(model, forward_hidden(model, batch), batch["labels"])
                mask = batch["answer_mask"]
                exact += int(((correct | ~mask).all(dim=1) & mask.any(dim=1)).sum())
                n_ex += int(mask.any(dim=1).sum())
                digits += int((correct & mask).sum())
                n_digits += int(mask.sum())
                loss += float(losses[mask].sum())
            out[f"{depth:g}"] = {"exact": exact / n_ex, "digit_acc": digits / n_digits,
                                 "answer_loss": loss / n_digits}
    return out


def table(rows: list[dict], n: int) -> str:
    head = ("| model | layers | val loss | passkey@256 (trainer, 48 ex.) | "
            + " | ".join(f"depth {d:g}: exact / digits / ans. loss" for d in DEPTHS) + " | train s |")
    lines = [head, "|" + " --- |" * (5 + len(DEPTHS))]
    for r in rows:
        cells = [f"{r['scores'][f'{d:g}']['exact']:.0%} / {r['scores'][f'{d:g}']['digit_acc']:.0%} / "
                 f"{r['scores'][f'{d:g}']['answer_loss']:.2f}" for d in DEPTHS]
        lines.append(f"| {r['variant']} | `{r['layers']}` | {r['val_loss']:.3f} | {r['passkey_trainer']:.0%} | "
                     + " | ".join(cells) + f" | {r['train_s']:.0f} |")
    lines.append(f"\n(per-depth columns: {n} fresh examples each; chance answer loss ln 10 = {math.log(10):.2f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=["mal", "mal_swa4", "mal_swa2"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passkey-only", action="store_true",
                   help="train on passkey windows only (the recipe mixes 60%% stdlib text, 40%% passkey)")
    p.add_argument("--n", type=int, default=64, help="passkey examples per depth for the checkpoint scores")
    p.add_argument("--work", default="/tmp/loom-titans-quality", help="run folders; a finished run is reused")
    p.add_argument("--out", default=str(RESULTS / "titans_quality.json"))
    args = p.parse_args()
    rows = []
    for name in args.variants:
        out_dir = Path(args.work) / name
        row = train(name, args, out_dir)
        row["scores"] = score(name, args, out_dir)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    report = table(rows, args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)), "settings": vars(args),
                                          "overrides": {n: overrides(n, args, Path(args.work) / n) for n in args.variants},
                                          "rows": rows, "table": report}, indent=1))
    print()
    print(report)


if __name__ == "__main__":
    main()
