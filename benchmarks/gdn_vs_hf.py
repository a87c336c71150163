"""Loom's gated delta rule against transformers' own CPU fallback, side by side.

The op alone, as transformers' Qwen3-Next / Qwen3.5 layers call it without fla: Loom's
`gated_delta_rule(..., use_qk_l2norm=True)` (chunked WY form, impl="chunked") against
`torch_chunk_gated_delta_rule(..., use_qk_l2norm_in_kernel=True)` from
transformers.models.qwen3_next.modeling_qwen3_next. B = 1, 4 heads of K = V = 64, fp32, CPU,
forward + backward of mean(o^2). Each (impl, length) runs in a fresh subprocess so its peak RSS
is its own: time is the median process-CPU seconds of `--repeats` passes after a warm-up; memory
is the peak RSS above the RSS before the first pass. A third subprocess per length runs both once
on the same inputs and reports the largest difference of o and of every input gradient, relative
to the largest entry of transformers' result.

    python benchmarks/gdn_vs_hf.py                       # 1K..16K, one thread
    python benchmarks/gdn_vs_hf.py --lengths 4096 16384 --threads 2

Writes benchmarks/results/gdn_vs_hf.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import cell, run_child, timed_steps

RESULTS = Path(__file__).resolve().parent / "results"
H, K = 4, 64


def _inputs(T: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, H, K, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, generator=gen))  # log-decay, as the layers' -A softplus
    beta = torch.rand(1, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def _fn(impl: str):
    """The op of `impl` as f(q, k, v, g, beta) -> o (imported here, before the memory baseline)."""
    if impl == "hf":
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

        return lambda *xs: torch_chunk_gated_delta_rule(*xs, use_qk_l2norm_in_kernel=True)[0]
    from loom.kernels.gated_delta_rule import gated_delta_rule

    return lambda *xs: gated_delta_rule(*xs, use_qk_l2norm=True, impl="chunked")


def _step(fn, xs):
    o = fn(*xs)
    o.pow(2).mean().backward()
    return o


def measure(impl: str, T: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    xs, fn = _inputs(T), _fn(impl)

    def reset():
        for x in xs:
            x.grad = None

    seconds, peak_mib = timed_steps(lambda: _step(fn, xs), repeats, reset)
    return {"impl": impl, "T": T, "seconds": seconds, "peak_mib": peak_mib}


def max_diff(T: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    xs = _inputs(T)
    outs = {}
    for impl in ("hf", "loom"):
        o = _step(_fn(impl), xs)
        outs[impl] = [o.detach()] + [x.grad.clone() for x in xs]
        for x in xs:
            x.grad = None
    names = ("o", "dq", "dk", "dv", "dg", "dbeta")
    # relative to the largest entry of transformers' own result: gradients of mean(o^2) are tiny at long T
    rel = lambda a, b: ((a - b).abs().max() / a.abs().max()).item()  # noqa: E731
    return {"T": T, **{n: rel(a, b) for n, a, b in zip(names, outs["hf"], outs["loom"])}}


def table(rows: list[dict], diffs: dict, lengths: list[int]) -> str:
    by = {(r.get("impl"), r.get("T")): r for r in rows}
    lines = ["| T | transformers s / MiB | Loom s / MiB | speed-up | max rel. diff o / grads |",
             "| --- | --- | --- | --- | --- |"]
    for T in lengths:
        hf, lo, d = by.get(("hf", T)), by.get(("loom", T)), diffs.get(T, {})
        timed = hf and lo and hf.get("seconds") and lo.get("seconds")
        speed = f"{hf['seconds'] / lo['seconds']:.1f}x" if timed else "-"
        grads = max((d[n] for n in ("dq", "dk", "dv", "dg", "dbeta") if n in d), default=None)
        diff = "-" if "o" not in d else f"{d['o']:.1e} / {grads:.1e}"
        lines.append(f"| {T // 1024}K | {cell(hf)} | {cell(lo)} | {speed} | {diff} |")
    growth = []
    for T in lengths:
        a, b = by.get(("loom", T)), by.get(("loom", 2 * T))
        if a and b and a.get("seconds") and b.get("seconds"):
            growth.append(f"{b['seconds'] / a['seconds']:.2f}")
    return "\n".join(lines) + f"\n\nLoom growth per doubling: {' / '.join(growth) or '-'}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "diff":
            print(json.dumps(max_diff(int(sys.argv[3]), int(sys.argv[4]))))
        else:
            print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(RESULTS / "gdn_vs_hf.json"))
    args = p.parse_args()
    rows, diffs = [], {}
    for T in args.lengths:
        for impl in ("hf", "loom"):  # alternating, so both see the same machine load
            child = [impl, str(T), str(args.repeats), str(args.threads)]
            r = {"impl": impl, "T": T, **run_child(__file__, child, args.threads, args.timeout)}
            rows.append(r)
            print(f"{impl:>5} T={T:>6}: {r.get('seconds', '-')} s {r.get('peak_mib', '-')} MiB {r.get('note', '')}",
                  flush=True)
        diffs[T] = run_child(__file__, ["diff", str(T), str(args.threads)], args.threads, args.timeout)
        print(f"       diff: {diffs[T]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows, "diffs": diffs}, indent=1))
    print()
    print(table(rows, diffs, args.lengths))


if __name__ == "__main__":
    main()
