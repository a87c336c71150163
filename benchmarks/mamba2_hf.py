"""The `mamba2` mixer vs transformers' own Mamba-2 layer (NemotronHMamba2Mixer, its PyTorch
fallback, i.e. torch_forward: what runs without mamba_ssm / causal-conv1d) on CPU.

Both layers are built at the same size (d_model 256, 4 heads of 64, state 128, 1 group,
conv 4, expand 1: the issue's "4 heads of 64"), with transformers' weights copied into
Loom's layer (conv taps flipped), batch 1, fp32. Each (layer, length) runs in a fresh
subprocess so its peak resident memory is its own: median process-CPU seconds of
`--repeats` forward+backward passes after a warm-up, and peak RSS above the pre-forward
baseline. A separate subprocess per length runs both forwards on the same input and
reports the max |difference| of the outputs (and of the input gradients), so the two are
timed at equal results. Chunk lengths: each layer's default (Loom 64, transformers 128).

    python benchmarks/mamba2_hf.py --threads 1                      # 1K..16K
    python benchmarks/mamba2_hf.py --lengths 4096 16384 --repeats 2

Writes benchmarks/results/mamba2_hf.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import cell, run_child, timed_steps

RESULTS = Path(__file__).resolve().parent / "results"
D, H, P, N, G, W = 256, 4, 64, 128, 1, 4


def build():
    """(transformers' layer, Loom's layer with the same weights), both in train mode."""
    import torch
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from loom.models.mixers import MIXERS, MixerDims
    from loom.models.rope import RopeConfig

    cfg = NemotronHConfig(hidden_size=D, mamba_num_heads=H, mamba_head_dim=P, n_groups=G, ssm_state_size=N,
                          conv_kernel=W, layer_types=["mamba"], vocab_size=64)
    torch.manual_seed(0)
    hf = NemotronHMamba2Mixer(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.02)
    opts = MIXERS["mamba2"].Config(d_state=N, d_conv=W, head_dim=P, n_heads=H, n_groups=G)
    loom = MIXERS["mamba2"](MixerDims(D, H, H, P, 0, 1, RopeConfig()), opts)
    sd = hf.state_dict()
    sd["conv1d.weight"] = sd["conv1d.weight"][:, 0].flip(-1)
    loom.load_state_dict(sd, strict=True)
    return hf.train(), loom.train()


def runner(which: str, layer, T: int):
    import torch

    from loom.models.mixers import SeqContext

    if which == "hf":
        return lambda x: layer(x)
    ctx = SeqContext(position_ids=torch.arange(T)[None])
    return lambda x: layer(x, ctx)[0]


def measure(which: str, T: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    hf, loom = build()
    layer = hf if which == "hf" else loom
    del hf, loom
    fn = runner(which, layer, T)
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def reset():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    seconds, peak_mib = timed_steps(lambda: fn(x).float().pow(2).mean().backward(), repeats, reset)
    return {"layer": which, "T": T, "seconds": seconds, "peak_mib": peak_mib}


def compare(T: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    hf, loom = build()
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    out = {}
    for which, layer in (("hf", hf), ("loom", loom)):
        xi = x.clone().requires_grad_()
        y = runner(which, layer, T)(xi)
        y.float().pow(2).mean().backward()
        out[which] = (y.detach(), xi.grad)
    (y_hf, g_hf), (y_loom, g_loom) = out["hf"], out["loom"]
    return {"T": T, "max_abs_y": float(y_hf.abs().max()), "max_diff_y": float((y_hf - y_loom).abs().max()),
            "max_diff_dx": float((g_hf - g_loom).abs().max()), "max_abs_dx": float(g_hf.abs().max())}


def table(rows: list[dict], diffs: dict, lengths: list[int]) -> str:
    by = {(r.get("layer"), r.get("T")): r for r in rows}
    lines = ["| T | transformers s / MiB | Loom s / MiB | speed-up | max diff y (max y) | max diff dx (max dx) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for T in lengths:
        h, m, d = by.get(("hf", T)), by.get(("loom", T)), diffs.get(T, {})
        ok = h and m and h.get("seconds") and m.get("seconds")
        speed = f"{h['seconds'] / m['seconds']:.2f}x" if ok else "-"
        diff_y = f"{d['max_diff_y']:.1e} ({d['max_abs_y']:.2f})" if "max_diff_y" in d else "-"
        diff_dx = f"{d['max_diff_dx']:.1e} ({d['max_abs_dx']:.1e})" if "max_diff_dx" in d else "-"
        lines.append(f"| {T // 1024}K | {cell(h)} | {cell(m)} | {speed} | {diff_y} | {diff_dx} |")
    growth = []
    for which in ("hf", "loom"):
        g = [by[(which, 2 * T)]["seconds"] / by[(which, T)]["seconds"] for T in lengths
             if by.get((which, T), {}).get("seconds") and by.get((which, 2 * T), {}).get("seconds")]
        growth.append(f"{which}: " + " / ".join(f"{v:.2f}" for v in g))
    return "\n".join(lines) + "\n\ngrowth per doubling: " + "; ".join(growth)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "compare":
            print(json.dumps(compare(int(sys.argv[3]), int(sys.argv[4]))))
        else:
            print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(RESULTS / "mamba2_hf.json"))
    args = p.parse_args()
    rows, diffs = [], {}
    for T in args.lengths:
        diffs[T] = run_child(__file__, ["compare", str(T), str(args.threads)], args.threads, args.timeout)
        print(f"T={T:>6} diff: {diffs[T]}", flush=True)
        for which in ("hf", "loom"):
            child = [which, str(T), str(args.repeats), str(args.threads)]
            r = {"layer": which, "T": T, **run_child(__file__, child, args.threads, args.timeout)}
            rows.append(r)
            print(f"T={T:>6} {which:>5}: {r.get('seconds')} s, {r.get('peak_mib')} MiB {r.get('note', '')}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows, "diffs": diffs}, indent=1))
    print()
    print(table(rows, diffs, args.lengths))


if __name__ == "__main__":
    main()
