"""The GPU benchmark: one command for a CUDA machine.

    python benchmarks/gpu.py                        # everything, on CUDA (minutes to an hour)
    python benchmarks/gpu.py --dry-run              # the plumbing at toy sizes, on any device

Three parts, each written to benchmarks/results/gpu.json and gpu.md (or --out):
1. mixers: one mixer layer (d_model 1024 = 16 heads x 64, batch 1, bf16 autocast), forward and
   backward time at 4K..128K tokens for every kind, as a ratio to full attention (flash-attn
   when installed, else whatever `impl: auto` picks: the table names the backends announced);
2. models: whole-model training tokens/s and MFU for the small (rat-swa-125m) and 350M
   (rat-swa-350m, s2-hybrid-350m) recipes at their context; MFU = flops_per_token x tokens/s /
   the GPU's peak dense bf16 FLOP/s (--peak-tflops, or a table of known GPUs);
3. longest context: the longest power-of-two length (from 4K) whose batch-1 training step
   fits on one GPU, per recipe.
Times are CUDA-event medians of --repeats after a warm-up (which also compiles FlexAttention).
Out-of-memory is recorded as "oom", not an error. On a machine without CUDA the command says
so and runs --dry-run (tests/benchmarks/test_gpu.py runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ["attn", "swa", "s2", "rat", "linear", "gdn", "mamba2", "memory", "titans_mag", "titans_mac"]
SETTINGS = {  # as benchmarks/mixers.py (paper defaults)
    "swa": {"window": 512},
    "rat": {"chunk": 16},
    "s2": {"block": 64, "local_blocks": 8, "vert_stride": 4},
    "mamba2": {"d_state": 128, "head_dim": 64, "n_groups": 1},  # expand 2: 32 heads of 64 at d_model 1024
    "memory": {"chunk_size": 64},
    "titans_mag": {"chunk_size": 64, "window": 512},
    "titans_mac": {"chunk_size": 64, "segment": 512},
}
RECIPES = ["rat-swa-125m", "rat-swa-350m", "s2-hybrid-350m", "gdn-hybrid-350m"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}
FULL = dict(lengths=[4096, 8192, 16384, 32768, 65536, 131072], d_model=1024, n_heads=16,
            context_start=4096, context_max=1 << 21)
DRY = dict(lengths=[64, 128], d_model=128, n_heads=8, context_start=64, context_max=128)


class Timer:
    """Median seconds of fn() over `repeats` after one warm-up; CUDA events on GPU."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def __call__(self, fn) -> float:
        fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bench_mixers(device, timer, sizes, kinds) -> list[dict]:
    from loom.kernels import dispatch
    from loom.models.config import build
    from loom.models.mixers import MIXERS, MixerDims, SeqContext
    from loom.models.rope import RopeConfig

    d, h = sizes["d_model"], sizes["n_heads"]
    rows = []
    for kind in kinds:
        cls = MIXERS[kind]
        opts = {k: v for k, v in SETTINGS.get(kind, {}).items() if k in cls.Config.__dataclass_fields__}
        dims = MixerDims(d_model=d, n_heads=h, n_kv_heads=h, head_dim=d // h, layer_idx=0, n_layers=1,
                         rope=RopeConfig())
        torch.manual_seed(0)
        mixer = cls(dims, build(cls.Config, opts, kind)).to(device)
        mixer.reset_parameters()
        for T in sizes["lengths"]:
            dispatch.reset()
            row = {"kind": kind, "T": T}
            try:
                x = torch.randn(1, T, d, device=device, requires_grad=True)
                ctx = SeqContext(position_ids=torch.arange(T, device=device)[None])

                def step():
                    with _autocast(device):
                        y, _ = mixer(x, ctx)
                    y.float().pow(2).mean().backward()

                row["seconds"] = timer(step)
                row["backends"] = dispatch.chosen()
            except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
                if not _oom(e):
                    raise
                row["seconds"] = "oom"
                torch.cuda.empty_cache()
            rows.append(row)
            shown = row["seconds"] if row["seconds"] == "oom" else f"{row['seconds']:.4f} s"
            print(f"mixer {kind:11s} T={T:7d}: {shown}")
    return rows


def _model(recipe: str, device, sizes, dry: bool):
    from loom.models import HybridLM
    from loom.trainer.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "recipes" / f"{recipe}.yaml")
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 32768)
    if dry:
        mcfg = dataclasses.replace(mcfg, d_model=sizes["d_model"], n_heads=sizes["n_heads"], vocab_size=256,
                                   **({"n_kv_heads": None} if "n_kv_heads" in mcfg.__dataclass_fields__ else {}))
    torch.manual_seed(0)
    return HybridLM(mcfg).to(device), (sizes["lengths"][-1] if dry else cfg.data.seq_len), cfg.train.batch_size


def _train_step(model, B: int, T: int, device):
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), device=device)
    pos = torch.arange(T, device=device).expand(B, T)

    def step():
        with _autocast(device):
            out = model(ids, position_ids=pos)
            loss = model.loss(out.hidden, ids.roll(-1, 1)) + out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def bench_models(device, timer, sizes, recipes, peak_flops, dry) -> list[dict]:
    rows = []
    for recipe in recipes:
        model, T, B = _model(recipe, device, sizes, dry)
        if dry:
            B = 1
        row = {"recipe": recipe, "T": T, "batch": B, "params": model.num_params()}
        try:
            sec = timer(_train_step(model, B, T, device))
            row["tokens_per_s"] = B * T / sec
            row["mfu"] = model.flops_per_token(T) * row["tokens_per_s"] / peak_flops if peak_flops else None
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                raise
            row["tokens_per_s"] = row["mfu"] = "oom"
        rows.append(row)
        print(f"model {recipe}: {row}")
        del model
    return rows


def longest_context(device, timer, sizes, recipes, dry) -> list[dict]:
    rows = []
    for recipe in recipes:
        model, _, _ = _model(recipe, device, sizes, dry)
        best, T = None, sizes["context_start"]
        while T <= sizes["context_max"]:
            try:
                _train_step(model, 1, T, device)()
                best = T
            except Exception as e:  # noqa: BLE001
                if not _oom(e):
                    raise
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            T *= 2
        rows.append({"recipe": recipe, "longest_T": best, "searched_up_to": sizes["context_max"]})
        print(f"longest context {recipe}: {best}")
        del model
    return rows


def peak_tflops(device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def markdown(res: dict) -> str:
    lines = [f"# GPU benchmark ({res['device']}, {res['mode']})", "",
             "## Mixers: forward+backward seconds (x attn)", ""]
    lengths = sorted({r["T"] for r in res["mixers"]})
    lines += ["| kind | " + " | ".join(f"{T // 1024}K" if T >= 1024 else str(T) for T in lengths) + " |",
              "|---" * (len(lengths) + 1) + "|"]
    attn = {r["T"]: r["seconds"] for r in res["mixers"] if r["kind"] == "attn"}
    for kind in dict.fromkeys(r["kind"] for r in res["mixers"]):
        cells = []
        for T in lengths:
            s = next(r["seconds"] for r in res["mixers"] if r["kind"] == kind and r["T"] == T)
            a = attn.get(T)
            ratio = f" ({a / s:.1f}x)" if isinstance(s, float) and isinstance(a, float) else ""
            cells.append(f"{s:.4f}{ratio}" if isinstance(s, float) else s)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "## Models", "", "| recipe | T | batch | params | tokens/s | MFU |", "|---|---|---|---|---|---|"]
    for r in res["models"]:
        tps = f"{r['tokens_per_s']:.0f}" if isinstance(r["tokens_per_s"], float) else r["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if isinstance(r["mfu"], float) else str(r["mfu"])
        lines.append(f"| {r['recipe']} | {r['T']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {tps} | {mfu} |")
    lines += ["", "## Longest context on one GPU (batch 1 training step)", "", "| recipe | longest T |", "|---|---|"]
    lines += [f"| {r['recipe']} | {r['longest_T']} |" for r in res["context"]]
    return "\n".join(lines) + "\n"


def run(dry: bool, out: Path, kinds, recipes, repeats: int, peak: float | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    sizes = DRY if dry else FULL
    timer = Timer(device, repeats)
    peak_flops = (peak_tflops(device, peak) or (1.0 if dry else None))
    peak_flops = peak_flops * 1e12 if peak_flops else None
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "mode": "dry-run" if dry else "full", "torch": torch.__version__, "peak_flops": peak_flops,
           "mixers": bench_mixers(device, timer, sizes, kinds),
           "models": bench_models(device, timer, sizes, recipes, peak_flops, dry),
           "context": longest_context(device, timer, sizes, recipes, dry)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=1))
    (out / "gpu.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on any device: checks the plumbing")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results, "
                   "dry-run: benchmarks/results/dry-run)")
    p.add_argument("--kinds", nargs="+", default=KINDS)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA; no GPU here, so it runs --dry-run (toy sizes, CPU) to check its plumbing")
        dry = True
    out = args.out or (RESULTS / "dry-run" if dry else RESULTS)
    run(dry, out, args.kinds, args.recipes, 1 if dry else args.repeats, args.peak_tflops)


if __name__ == "__main__":
    main()
