"""FlexAttention's compiled forward on CPU against each op's CPU path, side by side (inference).

    python benchmarks/flex_cpu.py [--T 4096] [--repeats 5]

B 1, 8 heads x 64, fp32, 3 packed documents, one thread; median wall seconds of --repeats after
a warm-up (the warm-up compiles). attention: flex vs sdpa with the dense document mask; s2
(block 64, 8 local, stride 4): flex vs blocksparse; rat (L 16): flex vs the chunked form.
The CUDA numbers come from benchmarks/gpu.py; this checks on CPU that the masks prune work.
Writes benchmarks/results/flex_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loom.kernels.attention import attention
from loom.kernels.rat import rat
from loom.kernels.s2 import s2_attention


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    T, H, K = args.T, 8, 64
    q, k, v = (torch.randn(1, T, H, K) for _ in range(3))
    ids = torch.zeros(1, T, dtype=torch.long)
    ids[0, T // 3:] = 1
    ids[0, 2 * T // 3:] = 2
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    idx = torch.arange(T)[None]
    pos = idx - torch.where(starts, idx, 0).cummax(1).values
    f = torch.randn(1, T, H, K)
    s2 = dict(block=64, local_blocks=8, vert_stride=4, seq_ids=ids)
    pairs = {
        "attention": ("sdpa", lambda impl: attention(q, k, v, seq_ids=ids, impl=impl)),
        "s2": ("blocksparse", lambda impl: s2_attention(q, k, v, impl=impl, **s2)),
        "rat": ("chunked", lambda impl: rat(q[:, :, :1], k[:, :, :1], v, f, pos, chunk=16, seq_ids=ids, impl=impl)),
    }
    rows = []
    with torch.no_grad():
        for op, (cpu_impl, fn) in pairs.items():
            err = (fn("flex") - fn(cpu_impl)).abs().max().item()
            t_flex = median_seconds(lambda: fn("flex"), args.repeats)
            t_cpu = median_seconds(lambda: fn(cpu_impl), args.repeats)
            rows.append({"op": op, "T": T, "flex_s": t_flex, "cpu_s": t_cpu, "cpu_impl": cpu_impl,
                         "speedup": t_cpu / t_flex, "max_abs_diff": err})
            print(f"{op:10s} T={T}: flex {t_flex:.4f} s, {cpu_impl} {t_cpu:.4f} s, flex {t_cpu / t_flex:.2f}x, "
                  f"max |diff| {err:.2g}")
    out = Path(__file__).resolve().parent / "results" / "flex_cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
