"""Titans quality: does the neural memory retrieve past the attention window?

Trains a Titans recipe and the same model with its memory removed through the
real trainer (`python -m loom.trainer train RECIPE output_dir=... overrides`), with
the same data, steps and seed, then scores each run's final checkpoint on
held-out passkey and MQAR windows (teacher-forced, exact match over the whole
answer), plus the share of answer tokens right and the mean answer-token loss
(chance for a digit: ln 10 = 2.30 nats), which still separate runs that
retrieve nothing.

Variants (model.layers overrides; any recipe whose memory layers sit in a
4-layer stack):
    mal        the recipe's own layers ([[memory, swa], x2] for the MAL recipes)
    mal_swa4   [swa, x4]   memory layers replaced by swa layers of the same window
    mal_swa2   [swa, x2]   memory layers dropped
    attn4      [attn, x4]  full attention: a reference that sees every token
    mac        [titans_mac, x4] with segment = the swa window (memory as context)

Default: recipes/titans-mal-recall.yaml (seq_len 128, swa window 8, 12000
steps, training data 60% copy / 20% passkey / 20% MQAR; see the recipe). The script prints how
far back each answer's source is (the needle digit, the queried pair's value)
and each variant's attention reach (swa layers x window), so "beyond the
window" is checked, not assumed.

    .venv/bin/python benchmarks/titans_quality.py                  # mal, mal_swa4, mal_swa2, attn4 (~2.5 h)
    .venv/bin/python benchmarks/titans_quality.py --variants mal --seed 1 --work /tmp/tq-s1 --out /tmp/mal_s1.json
    .venv/bin/python benchmarks/titans_quality.py --variants mal mal_swa4 --steps 500 --work /tmp/tq-short
    # MAL with one momentum step per chunk (titans-pytorch's rule):
    .venv/bin/python benchmarks/titans_quality.py --variants mal --set model.mixers.memory.momentum_step=chunk \\
        --work /tmp/tq-chunkstep --out benchmarks/results/titans_quality_recall_chunkstep.json
    # MAC, shortened to 3000 steps on two threads (~1 h):
    .venv/bin/python benchmarks/titans_quality.py --variants mac --steps 3000 --threads 2 \\
        --set model.mixers.titans_mac.momentum_step=chunk --work /tmp/tq-mac \\
        --out benchmarks/results/titans_quality_recall_mac_chunkstep.json
    # length extrapolation of the finished runs (scores only):
    .venv/bin/python benchmarks/titans_quality.py --variants mal attn4 --lengths 256 512 1024 --n 64 \\
        --out benchmarks/results/titans_quality_recall_lengths.json
    # the earlier experiment (titans-mal.yaml, 60% text + 40% passkey, seq 256, window 64):
    .venv/bin/python benchmarks/titans_quality.py --recipe recipes/titans-mal.yaml --steps 600 \\
        --out benchmarks/results/titans_quality.json

Runs are kept under --work; a finished run is reused (the trainer says so and
exits), so re-running only scores. Writes --out (JSON) and prints a markdown table.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = ROOT / "recipes" / "titans-mal-recall.yaml"
VARIANTS = {  # name -> model.layers override (None: the recipe's own)
    "mal": None,
    "mal_swa4": "[swa, x4]",
    "mal_swa2": "[swa, x2]",
    "attn4": "[attn, x4]",  # full attention: a reference that sees every token, not a memory ablation
    "mac": "[titans_mac, x4]",
}
PASSKEY_ONLY = "data.sources=[{kind: passkey, weight: 1.0}]"
DEPTHS = (0.1, 0.5, 0.9)


def recipe_config(args, extra=()):
    from loom.trainer.config import load_config

    return load_config(str(args.recipe), list(extra))


def overrides(name: str, args, out_dir: Path) -> list[str]:
    ov = [f"output_dir={out_dir}", f"seed={args.seed}"]
    if args.steps is not None:
        ov += [f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}",
               f"train.save_every={args.steps}", f"train.log_every={max(1, args.steps // 20)}"]
    if VARIANTS[name] is not None:
        ov.append(f"model.layers={VARIANTS[name]}")
    if name == "mac":
        base = recipe_config(args)
        window = base.model.mixers.get("swa", {}).get("window", 64)
        mem = base.model.mixers.get("memory", {})
        chunk = min(mem.get("chunk_size", 16), window)
        ov.append(f"model.mixers.titans_mac={{segment: {window}, chunk_size: {chunk}, persistent: 4, "
                  f"depth: {mem.get('depth', 2)}, expansion: {mem.get('expansion', 2)}}}")
    if args.passkey_only:
        ov.append(PASSKEY_ONLY)
    return ov + list(args.set)


def train(name: str, args, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "loom.trainer", "train", str(args.recipe), *overrides(name, args, out_dir)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in lines if r.get("split") == "val"]
    train_rows = [r for r in lines if "split" not in r]
    keep = lambda r: {k: v for k, v in r.items() if k == "step" or k == "loss" or "@" in k}  # noqa: E731
    layers = VARIANTS[name] or yaml.safe_dump(recipe_config(args).model.layers, default_flow_style=True).strip()
    return {"variant": name, "layers": layers,
            "wall_s": round(time.time() - t0, 1), "train_s": round(train_rows[-1]["elapsed_s"], 1),
            "tokens": train_rows[-1]["tokens"], "val_loss": ev[-1]["loss"], "trainer_eval": keep(ev[-1]),
            "curve": [keep(r) for r in ev]}


def _scores(model, batches) -> dict:
    from loom.trainer.eval.validation import answer_scores

    s = answer_scores(model, batches)
    return {"exact": s["exact"], "digits": s["tokens"], "answer_loss": s["loss"], "n": s["answers"]}


def gaps(tokenizer, cfg, pairs: int, queries: int, key_digits: int, n: int = 64) -> dict:
    """Smallest and median token distance from an answer token's label position back to
    where its content was shown (passkey: the same digit of the needle; MQAR: the same
    digit of the queried pair), over n evaluation examples."""
    import numpy as np

    from loom.trainer.data.synthetic import MQARTask, PasskeyTask

    out = {}
    T = cfg.data.seq_len
    for depth in DEPTHS:
        task = PasskeyTask(tokenizer, T, (0, 99), depth, key_digits)
        d = []
        for i in range(n):
            ex = task.example(i)
            first_answer = int(np.nonzero(ex["answer"])[0][0])
            first_digit = ex["needle_start"] + len(tokenizer.encode("The pass key is "))
            d.append(first_answer - first_digit)
        out[f"passkey depth {depth:g}"] = {"min": int(min(d)), "median": float(np.median(d))}
    task = MQARTask(tokenizer, T, (0, 99), pairs, queries)
    d = []
    for i in range(n):
        ex = task.example(i)
        text = tokenizer.decode(ex["tokens"].tolist())
        head = text.split(" ")  # byte-level positions; other tokenizers: approximate
        pos = {}
        offset = 0 if tokenizer.bos_id is None else 1
        for word in head[:pairs]:
            k, v = word.split(":")
            pos[k] = offset + len(k) + 1
            offset += len(word) + 1
        starts = np.nonzero(ex["answer"] & ~np.roll(ex["answer"], 1))[0]
        for q, s in zip(ex["queries"], starts):
            d.append(int(s) - pos[q])
    out["mqar"] = {"min": int(min(d)), "median": float(np.median(d))}
    return out


def _task_scores(model, tokenizer, L: int, n: int, seed: int, digits: int, pairs: int, queries: int,
                 batch_size: int) -> dict:
    """Passkey at every depth and MQAR on n held-out windows of L tokens."""
    from loom.trainer.data import mqar_examples, passkey_examples

    out = {f"passkey {d:g}": _scores(model, passkey_examples(tokenizer, L, d, n, seed, key_digits=digits,
                                                               batch_size=batch_size)) for d in DEPTHS}
    out["mqar"] = _scores(model, mqar_examples(tokenizer, L, n, seed, pairs, queries, batch_size=batch_size))
    return out


def reach(cfg) -> str:
    """How far back attention can carry information in this model (swa layers x window)."""
    kinds = cfg.model.resolved().layer_kinds()
    if "attn" in kinds:
        return "all"
    window = cfg.model.mixers.get("swa", {}).get("window", 256)
    if "titans_mac" in kinds:
        seg = cfg.model.mixers.get("titans_mac", {}).get("segment", 256)
        return f"{seg} per segment (+ memory)"
    n_swa = kinds.count("swa")
    extra = " + memory" if "memory" in kinds else ""
    return f"{n_swa} x {window} = {n_swa * window}{extra}"


def score(name: str, args, out_dir: Path) -> dict:
    """Passkey per depth and MQAR on the final checkpoint, on examples the trainer never showed."""
    import torch

    from loom.trainer.checkpoint.manager import CheckpointManager
    from loom.trainer.config import mqar_shape, passkey_key_digits
    from loom.trainer.data import load_tokenizer
    from loom.trainer.train import build_model

    torch.set_num_threads(args.threads)
    cfg = recipe_config(args, overrides(name, args, out_dir))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer)
    mgr = CheckpointManager(cfg.run_dir)
    tensors, _, _ = mgr.load(mgr.latest_valid(log=print))
    model.load_state_dict(tensors)
    model.eval()
    T, digits = cfg.data.seq_len, passkey_key_digits(cfg)
    pairs, queries = mqar_shape(cfg)
    # seed + 7: examples that neither training (seed) nor the trainer's own evaluation (seed + 1) showed
    def tasks(L: int, batch: int) -> dict:
        return _task_scores(model, tokenizer, L, args.n, cfg.seed + 7, digits, pairs, queries, batch)

    out = {"reach": reach(cfg), "params": model.num_params()}
    with torch.no_grad():
        out.update(tasks(T, 32))
        pk = [out[f"passkey {d:g}"] for d in DEPTHS]
        out["passkey"] = {k: sum(p[k] for p in pk) / len(pk) for k in ("exact", "digits", "answer_loss")}
        # length extrapolation: the same checkpoint on windows longer than it was trained on
        for L in args.lengths:
            out[f"length {L}"] = ext = tasks(L, 16)
            print(f"{name} @{L}: " + ", ".join(f"{k} {v['exact']:.0%}" for k, v in ext.items()), flush=True)
    return out


def table(rows: list[dict], n: int) -> str:
    cell = lambda s: f"{s['exact']:.0%} / {s['digits']:.0%} / {s['answer_loss']:.2f}"  # noqa: E731
    head = ("| model | reach (tokens) | params | val loss | passkey (all depths) | "
            + " | ".join(f"passkey {d:g}" for d in DEPTHS) + " | MQAR (per query) | train s |")
    lines = [head, "|" + " --- |" * (7 + len(DEPTHS))]
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['variant']} `{r['layers']}` | {s['reach']} | {s['params'] / 1e6:.2f}M | "
                     f"{r['val_loss']:.3f} | **{cell(s['passkey'])}** | "
                     + " | ".join(cell(s[f"passkey {d:g}"]) for d in DEPTHS)
                     + f" | **{cell(s['mqar'])}** | {r['train_s']:.0f} |")
    lines.append(f"\nCells: exact match / answer tokens right / mean answer-token loss (nats; chance ln 10 = "
                 f"{math.log(10):.2f}); {n} held-out passkey examples per depth, {n} MQAR windows.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--variants", nargs="*", default=["mal", "mal_swa4", "mal_swa2", "attn4"],
                   choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passkey-only", action="store_true", help="train on passkey windows only")
    p.add_argument("--n", type=int, default=128, help="held-out examples per passkey depth and for MQAR")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides for every variant, e.g. model.mixers.memory.momentum_step=chunk")
    p.add_argument("--lengths", type=int, nargs="*", default=[],
                   help="also score the final checkpoints at these (longer) window lengths")
    p.add_argument("--work", default="/tmp/loom-titans-quality", help="run folders; a finished run is reused")
    p.add_argument("--out", default=str(RESULTS / "titans_quality_recall.json"))
    args = p.parse_args()
    args.recipe = args.recipe.resolve()

    from loom.trainer.config import mqar_shape, passkey_key_digits
    from loom.trainer.data import load_tokenizer

    base = recipe_config(args)
    tok = load_tokenizer(base.data.tokenizer)
    distance = gaps(tok, base, *mqar_shape(base), passkey_key_digits(base))
    print("answer -> source distance (tokens):", json.dumps(distance), flush=True)
    rows = []
    for name in args.variants:
        out_dir = Path(args.work) / name
        row = train(name, args, out_dir)
        row["scores"] = score(name, args, out_dir)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    report = table(rows, args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "distance": distance,
        "overrides": {n: overrides(n, args, Path(args.work) / n) for n in args.variants},
        "rows": rows, "table": report}, indent=1))
    print()
    print(report)


if __name__ == "__main__":
    main()
