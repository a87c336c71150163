"""Forward+backward time and peak memory of each mixer layer vs sequence length.

One mixer layer (d_model 256 = 4 heads x 64, batch 1, fp32, CPU) per
measurement, each (mixer, length) in a fresh subprocess so that its peak
resident memory is its own. Time: median of `--repeats` forward+backward
passes after one warm-up, in process CPU seconds (with one thread this equals
wall time on an idle machine, and stays meaningful on a shared one). Memory:
peak RSS during the passes minus the RSS before the first forward (so weights
and the interpreter are excluded).

    python benchmarks/mixers.py                          # all kinds, 1K..32K
    python benchmarks/mixers.py --kinds attn rat --lengths 4096 16384

Writes benchmarks/results/mixers.json and prints a markdown table with each
kind's time relative to full attention and its growth per doubling.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import cell, run_child, timed_steps

RESULTS = Path(__file__).resolve().parent / "results"
# glibc otherwise re-maps every tensor over its dynamic mmap threshold on each
# call (q/k/v at 32K tokens), adding ~20% to every mixer's time at 32K.
SETTINGS = {  # options per kind for the benchmark (paper defaults where they exist)
    "attn": {},
    "swa": {"window": 512},
    "rat": {"chunk": 16},
    "s2": {"block": 64, "local_blocks": 8, "vert_stride": 4},
    "linear": {},
    "gdn": {},  # Qwen3.5 layer defaults: conv 4, chunk 64, q/k heads = value heads
    "mamba2": {"n_heads": 4, "head_dim": 64, "d_state": 128, "n_groups": 1},  # 4 heads of 64, Nemotron-H's state
    "memory": {"chunk_size": 64},
    "titans_mag": {"chunk_size": 64, "window": 512},
    "titans_mac": {"chunk_size": 64, "segment": 512},
}


def measure(kind: str, T: int, repeats: int, threads: int) -> dict:
    import torch

    from loom.models.mixers import MIXERS, MixerDims, SeqContext
    from loom.models.config import build
    from loom.models.rope import RopeConfig

    torch.set_num_threads(threads)
    opts = {k: v for k, v in SETTINGS.get(kind, {}).items() if k in MIXERS[kind].Config.__dataclass_fields__}
    dims = MixerDims(d_model=256, n_heads=4, n_kv_heads=4, head_dim=64, layer_idx=0, n_layers=1, rope=RopeConfig())
    torch.manual_seed(0)
    mixer = MIXERS[kind](dims, build(MIXERS[kind].Config, opts, kind))
    mixer.reset_parameters()
    x = torch.randn(1, T, 256, requires_grad=True)
    ctx = SeqContext(position_ids=torch.arange(T)[None])

    def reset():
        x.grad = None
        mixer.zero_grad(set_to_none=True)

    seconds, peak_mib = timed_steps(lambda: mixer(x, ctx)[0].float().pow(2).mean().backward(), repeats, reset)
    return {"kind": kind, "T": T, "seconds": seconds, "peak_mib": peak_mib, "options": opts}


def table(rows: list[dict], lengths: list[int]) -> str:
    by = {(r["kind"], r["T"]): r for r in rows}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    head = "| mixer | " + " | ".join(f"{T // 1024}K s / MiB" for T in lengths) + \
           " | x attn @16K | growth 4K->32K per doubling |"
    lines = [head, "|" + " --- |" * (len(lengths) + 3)]
    for kind in kinds:
        cells = []
        for T in lengths:
            r = by.get((kind, T))
            cells.append(cell(r))
        a, k = by.get(("attn", 16384)), by.get((kind, 16384))
        speed = f"{a['seconds'] / k['seconds']:.1f}x" if a and k and a["seconds"] and k["seconds"] else "-"
        growth = []
        for T in (4096, 8192, 16384):
            r1, r2 = by.get((kind, T)), by.get((kind, 2 * T))
            if r1 and r2 and r1["seconds"] and r2["seconds"]:
                growth.append(f"{r2['seconds'] / r1['seconds']:.2f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {speed} | {' / '.join(growth) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, T, repeats, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(measure(kind, T, repeats, threads)))
        return
    from loom.models.mixers import MIXERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="*", default=None, help="default: every registered kind")
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(RESULTS / "mixers.json"))
    args = p.parse_args()
    kinds = args.kinds or sorted(MIXERS, key=lambda k: (k != "attn", k))
    rows = []
    for kind in kinds:
        for T in args.lengths:
            child = [kind, str(T), str(args.repeats), str(args.threads)]
            r = {"kind": kind, "T": T, "seconds": None, "peak_mib": None,
                 **run_child(__file__, child, args.threads, args.timeout)}
            rows.append(r)
            sec = "-" if r["seconds"] is None else f"{r['seconds']:.3f}s"
            mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            print(f"{kind:>12} T={T:>6}: {sec:>9} {mem:>9} {r.get('note', '')}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    print()
    print(table(rows, args.lengths))


if __name__ == "__main__":
    main()
