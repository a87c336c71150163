"""Hugging Face export: parity and greedy decoding speed, Loom vs the exported folder.

    python benchmarks/export_hf.py --run runs/quickstart --untrained recipes/hybrid-all.yaml

For each model: `loom convert to-hf` into a temporary folder (seconds), load
it with transformers (native, or trust_remote_code for hybrids), then on the
same inputs
  - max |logits| difference (fp32) on 2 x seq_len random byte tokens,
  - greedy decoding of --new tokens after a --prompt-token prompt, with
    HybridLM.generate and with transformers' generate: tokens/s of each
    (median of --repeats runs, the two interleaved, one thread) and whether the
    generated tokens are identical.
`--untrained RECIPE` builds that recipe's model with its initial weights (a
run folder fabricated in the temporary folder): speed and parity need no
training. Results go to benchmarks/results/export_hf.json.
Run it from outside the repository root's sys.path trap: the script removes
its own folder's parent from sys.path (transformers >= 5.25 imports HF's
`kernels`, which the checkout's kernels/ folder would shadow).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HERE.parent,)]

import torch  # noqa: E402


def fabricate(recipe: str, folder: Path) -> Path:
    """A run folder holding `recipe`'s model at its initial weights (step 0)."""
    from loom.trainer.checkpoint.manager import CheckpointManager
    from loom.trainer.config import dump, load_config
    from loom.trainer.data import load_tokenizer
    from loom.trainer.train import build_model

    cfg = load_config(recipe, [f"output_dir={folder}"])
    model = build_model(cfg, load_tokenizer(cfg.data.tokenizer))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump(cfg))
    CheckpointManager(folder).save(0, model.state_dict(), {}, {"untrained": True})
    return folder


def measure(run: Path, label: str, work: Path, args) -> dict:
    import transformers

    from loom.trainer.hf.export import export_hf
    from loom.trainer.hf.source import load_source

    t0 = time.perf_counter()
    out, target = export_hf(run, work / f"hf-{label}")
    export_s = time.perf_counter() - t0
    for _ in range(2):  # the second load: the first one also imports transformers' modeling modules
        t0 = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=target == "remote").eval()
        load_s = time.perf_counter() - t0
    src = load_source(run)
    loom = src.build()
    seq_len = src.max_len or 256
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, seq_len), generator=gen)
    with torch.no_grad():
        diff = (hf(ids).logits.float() - loom.logits(loom(ids).hidden)).abs().max().item()
    prompt = ids[:1, :args.prompt_tokens]
    loom_s, hf_s, same = [], [], True
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = loom.generate(prompt, args.new)
        loom_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            b = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        hf_s.append(time.perf_counter() - t0)
        same = same and torch.equal(a, b)
    loom_tps, hf_tps = args.new / statistics.median(loom_s), args.new / statistics.median(hf_s)
    layers = [b.kind for b in loom.blocks]
    return {"model": label, "source": str(run), "target": target, "architecture": type(hf).__name__,
            "layers": layers, "params_M": round(loom.num_params() / 1e6, 3), "export_s": round(export_s, 2),
            "hf_load_s": round(load_s, 2), "max_abs_logit_diff": diff, "seq_len": seq_len,
            "greedy_identical": same, "loom_tokens_per_s": round(loom_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
            "hf_over_loom_speed": round(hf_tps / loom_tps, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="a run or checkpoint folder (repeatable)")
    p.add_argument("--untrained", action="append", default=[], help="a recipe, built with initial weights")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "export_hf.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = [(Path(r), Path(r).name) for r in args.run]
        for recipe in args.untrained:
            name = Path(recipe).stem
            sources.append((fabricate(recipe, work / f"run-{name}"), f"{name} (untrained)"))
        for run, label in sources:
            row = measure(run, label.split()[0], work, args)
            row["model"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | target | logits max diff | greedy identical | Loom tok/s | HF tok/s | HF / Loom |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['architecture']} | {r['max_abs_logit_diff']:.1e} | {r['greedy_identical']} | "
              f"{r['loom_tokens_per_s']} | {r['hf_tokens_per_s']} | {r['hf_over_loom_speed']:.2f}x |")
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new, "repeats": args.repeats, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "cpu_count": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
