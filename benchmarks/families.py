"""One training step (forward + backward of the next-token loss) of each imported family on CPU:
Loom (the model `loom convert hf` produces) vs transformers' own *ForCausalLM class, same weights.

Each family is a tiny-but-not-trivial model (d_model 256, 4-8 layers, B = 1) built from its
transformers config class with seeded random weights; the Loom side converts that same model
in-process (save_pretrained, then trainer/hf's convert_hf: the families' mapping) and loads it.
Each (family, impl, T) step runs in a fresh child process (benchmarks/harness.py), so its peak RSS
is its own; the repeats interleave Loom and transformers (loom, hf, loom, hf, ...) and the table
reports the median child (each child: one warm-up step, then one timed step, process-CPU seconds).
A last child per family runs both forwards at 1K tokens and reports max |logit diff| (fp32).

Lengths: 4K for every family, 16K as well for the hybrids (Qwen3.5, OLMo-hybrid, Nemotron-H, Bamba).
Targets: speed-up (transformers s / Loom s) >= 1.0 for the attention families; for GDN / Mamba-2
hybrids >= 1.25 at 4K and >= 1.5 at 16K.

    OMP_NUM_THREADS=2 python benchmarks/families.py [--families a,b] [--repeats 3] [--out results/families.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_child, timed_steps  # noqa: E402

HERE = Path(__file__).resolve().parent
V = 4096
FULL, SLIDING, LIN = "full_attention", "sliding_attention", "linear_attention"
COMMON = dict(vocab_size=V, hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32768)
GDN = dict(linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
           linear_conv_kernel_dim=4)
# name -> (config class, model class, config kwargs, kind)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, num_hidden_layers=6, head_dim=64), "attention"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, num_hidden_layers=6, head_dim=64,
                                                            sliding_window=1024), "attention"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        COMMON, num_hidden_layers=6, head_dim=64, sliding_window=1024, query_pre_attn_scalar=64), "attention"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(COMMON, num_hidden_layers=8, sliding_window=1024),
              "attention"),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        COMMON, **GDN, num_hidden_layers=4, head_dim=64, layer_types=[LIN, LIN, LIN, FULL]), "gdn"),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", dict(
        COMMON, **GDN, num_hidden_layers=4, layer_types=[LIN, LIN, LIN, FULL], pad_token_id=0), "gdn"),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        COMMON, head_dim=64, mamba_num_heads=8, mamba_head_dim=64, n_groups=1, ssm_state_size=64, conv_kernel=4,
        chunk_size=128, layers_block_type=[LIN, "mlp", LIN, FULL, "mlp", LIN]), "mamba2"),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        COMMON, num_hidden_layers=4, mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=64,
        mamba_d_conv=4, mamba_chunk_size=128, mamba_expand=2, attn_layer_indices=[3]), "mamba2"),
}
TARGET = {("attention", 4096): 1.0, ("gdn", 4096): 1.25, ("mamba2", 4096): 1.25, ("gdn", 16384): 1.5,
          ("mamba2", 16384): 1.5}


def lengths(family: str) -> list[int]:
    return [4096] if FAMILIES[family][3] == "attention" else [4096, 16384]


def hf_model(family: str):
    import torch
    import transformers

    cfg_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).train()


def loom_model(hf):
    """The same weights through `loom convert hf`'s mapping (in this process)."""
    from loom.models import HybridLM
    from loom.trainer.hf.convert import convert_hf, load_converted

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(Path(d) / "hf")
        convert_hf(Path(d) / "hf", Path(d) / "loom")
        cfg, state = load_converted(Path(d) / "loom")
    model = HybridLM(cfg)
    model.load_state_dict(state)
    return model.train()


def child(family: str, impl: str, T: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    hf = hf_model(family)
    model = loom_model(hf) if impl == "loom" else hf
    if impl == "loom":
        del hf
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)

    def step():
        if impl == "loom":
            out = model(ids)
            loss = model.loss(out.hidden, labels)
        else:
            loss = model(ids, labels=ids).loss  # transformers shifts the labels itself
        loss.backward()

    def reset():
        model.zero_grad(set_to_none=True)

    seconds, peak = timed_steps(step, 1, reset)
    return {"family": family, "impl": impl, "T": T, "seconds": seconds, "peak_mib": peak,
            "tok_s": T / seconds}


def diff_child(family: str, threads: int, T: int = 1024) -> dict:
    import torch

    torch.set_num_threads(threads)
    hf = hf_model(family).eval()
    loom = loom_model(hf).eval()
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = loom.logits(loom(ids).hidden)
    return {"family": family, "T": T, "max_logit_diff": (got - ref).abs().max().item(),
            "max_logit": ref.abs().max().item()}


def profile_child(family: str, impl: str, T: int, threads: int) -> None:
    """Top ops of one step (torch.profiler, self CPU time), printed: for explaining a miss."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    hf = hf_model(family)
    model = loom_model(hf) if impl == "loom" else hf
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    loss = (model.loss(model(ids).hidden, labels) if impl == "loom" else model(ids, labels=ids).loss)
    loss.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = (model.loss(model(ids).hidden, labels) if impl == "loom" else model(ids, labels=ids).loss)
        loss.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def table(rows: list[dict], diffs: dict[str, dict]) -> str:
    lines = ["| family | T | transformers tok/s / MiB | Loom tok/s / MiB | speed-up | target | max logit diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hf, lo = r["hf"], r["loom"]
        cell = lambda x: "-" if not x.get("seconds") else f"{x['tok_s']:.0f} / {x['peak_mib']:.0f}"  # noqa: E731
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        d = diffs.get(r["family"], {}).get("max_logit_diff")
        lines.append(f"| {r['family']} | {r['T'] // 1024}K | {cell(hf)} | {cell(lo)} | {speed} | "
                     f"{r['target']:.2f}x | {'-' if d is None else f'{d:.1e}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs="*")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--max-len", type=int, default=16384)
    p.add_argument("--profile", nargs=3, metavar=("FAMILY", "IMPL", "T"))
    p.add_argument("--out", default=str(HERE / "results" / "families.json"))
    args = p.parse_args()
    if args.child is not None:
        kind = args.child[0]
        if kind == "diff":
            res = diff_child(args.child[1], int(args.child[2]))
        else:
            res = child(args.child[1], args.child[2], int(args.child[3]), int(args.child[4]))
        print(json.dumps(res))
        return
    if args.profile:
        profile_child(args.profile[0], args.profile[1], int(args.profile[2]), args.threads)
        return
    script = os.path.abspath(__file__)
    rows, diffs = [], {}
    for family in args.families.split(","):
        diffs[family] = run_child(script, ["diff", family, str(args.threads)], args.threads, args.timeout)
        for T in [t for t in lengths(family) if t <= args.max_len]:
            runs = {"loom": [], "hf": []}
            for _ in range(args.repeats):  # interleaved: a shared machine's load hits both alike
                for impl in ("loom", "hf"):
                    runs[impl].append(run_child(script, ["step", family, impl, str(T), str(args.threads)],
                                                args.threads, args.timeout))
            med = {}
            for impl, rs in runs.items():
                ok = sorted((r for r in rs if r.get("seconds")), key=lambda r: r["seconds"])
                med[impl] = ok[len(ok) // 2] if ok else (rs[0] if rs else {})
            speed = (med["hf"]["seconds"] / med["loom"]["seconds"]
                     if med["hf"].get("seconds") and med["loom"].get("seconds") else None)
            row = {"family": family, "T": T, "kind": FAMILIES[family][3], "loom": med["loom"], "hf": med["hf"],
                   "loom_seconds_all": [r.get("seconds") for r in runs["loom"]],
                   "hf_seconds_all": [r.get("seconds") for r in runs["hf"]],
                   "speedup": speed, "target": TARGET[(FAMILIES[family][3], T)]}
            rows.append(row)
            print(f"{family:>12} T={T:>6}: loom {med['loom'].get('seconds')} s {med['loom'].get('peak_mib')} MiB | "
                  f"hf {med['hf'].get('seconds')} s {med['hf'].get('peak_mib')} MiB | "
                  f"x{speed if speed is None else round(speed, 2)} | diff {diffs[family].get('max_logit_diff')}",
                  flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats,
                                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  "rows": rows, "logit_diff": diffs}, indent=1))
    print(table(rows, diffs))


if __name__ == "__main__":
    main()
