"""Side-by-side speed of issue 17's paths: packed documents, cross-entropy, whole model.

Everything is timed in ONE process with the candidates interleaved (A, B, A, B,
...; the best of `--repeats` per candidate), so that the ratios stay
meaningful on a shared machine whose absolute speed drifts. fp32, CPU,
`--threads` threads (default 2).

Sections (each prints its rows and is recorded in `--out`, default benchmarks/results/speed.json):
    packed   attention op, forward+backward, d 256 (4 heads x 64), batch 1:
             one document per row (the fused causal SDPA) vs the same row as
             `--docs` packed documents through the tiled path (impl="auto") and
             through the dense masked SDPA of before (impl="sdpa");
    loss     cross-entropy of N=`--loss-tokens` tokens at d 256: full
             F.cross_entropy on all logits vs the fused chunked path vs the
             recomputed chunks (torch.utils.checkpoint per chunk) it replaces;
    model    training step of 4 attention layers at d_model 256 (SwiGLU 683 hidden
             vs HF's 688 = the same parameter count within 1%), Loom HybridLM vs
             transformers' LlamaForCausalLM, vocab 256 and 32K, packed and
             unpacked rows; tok/s and MFU against the best fp32 GEMM measured in the
             run (before the first and after every length);
    profile  torch.profiler of one step of each of those two models at the first of
             `--lengths` and `--vocabs`: self CPU time per aten op (where the time goes);
    recipes  one training step (forward, fused loss, backward; full activation
             checkpointing, the trainer's own) of every small recipe's layer
             pattern at d_model 256, 4 layers, batch 1, `--recipe-lengths`
             tokens, each in a fresh process (benchmarks/long_step.py) for its
             own peak RSS; windows and chunks scaled to long context
             (LONG_MIXERS); a cell whose time, extrapolated from the two
             shorter ones, exceeds `--cap-seconds` is skipped with its estimate;
    longest  the longest trainable context at `--budget-gib`, without and with
             full checkpointing (`--checkpointing`): peak RSS at `--fit-lengths`, a least-squares
             line through it (residual reported), T_max = (budget - a) / b
             rounded down to 2^k or 3 x 2^k x 1024 tokens; `--verify` recipes
             then run one step at T_max, or at the largest step that the
             `--verify-seconds` and `--verify-gib` caps allow, and the slope
             from the longest fitted length to that step gives a second T_max.

    python benchmarks/speed.py                                   # packed, loss, model: minutes
    python benchmarks/speed.py --sections packed --lengths 8192 32768
    python benchmarks/speed.py --sections recipes longest --threads 1 --out results/speed_recipes.json
    python benchmarks/speed.py --sections profile --lengths 2048 --vocabs 256 --threads 1 --out results/profile.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL_RECIPES = ["quickstart", "gated-attn", "moh", "s2-hybrid", "linear-attn", "hybrid-all", "swa", "rat-swa",
                 "titans-mal", "titans-mag", "titans-mac"]
# The small recipes' windows and chunks (32, 16) are sized for 512-token rows; at 4K-1M the
# large recipes' values are used instead (titans-*-760m; s2-gpu-base's block with an swa-sized local
# window; its vert_stride 8 needs 8 heads, so the small recipe's 4 stays).
LONG_MIXERS = {"swa": {"window": 512}, "s2": {"block": 64, "local_blocks": 8},
               "memory": {"chunk_size": 64}, "titans_mag": {"window": 512, "chunk_size": 64},
               "titans_mac": {"segment": 512, "chunk_size": 64}}


def best_times(fns: dict, repeats: int) -> dict:
    """{name: best seconds}, candidates interleaved; one untimed warm-up each."""
    for f in fns.values():
        f()
    times = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k] = min(times[k], time.perf_counter() - t)
    return times


def doc_ids(T: int, docs: int) -> torch.Tensor:
    """(1, T) ids of `docs` documents with random lengths (at least T / (4 docs) each)."""
    g = torch.Generator().manual_seed(T + docs)
    w = torch.rand(docs, generator=g) + 0.25
    lens = (w / w.sum() * T).long()
    lens[-1] = T - lens[:-1].sum()
    return torch.repeat_interleave(torch.arange(docs), lens)[None]


def packed(lengths, docs, repeats):
    from loom.kernels.attention import attention

    rows = []
    for T in lengths:
        q, k, v = (torch.randn(1, T, 4, 64, requires_grad=True) for _ in range(3))
        sid = doc_ids(T, docs)

        def step(**kw):
            return lambda: attention(q, k, v, **kw).sum().backward()

        fns = {"unpacked": step(), "packed tiled": step(seq_ids=sid)}
        if T <= 8192:
            fns["packed dense sdpa"] = step(seq_ids=sid, impl="sdpa")
        t = best_times(fns, repeats)
        rows.append({"T": T, "docs": docs, **{k: round(v, 4) for k, v in t.items()},
                     "tiled / unpacked speed": round(t["unpacked"] / t["packed tiled"], 2),
                     "dense / unpacked speed": round(t["unpacked"] / t["packed dense sdpa"], 2)
                     if "packed dense sdpa" in t else None})
        print(rows[-1], flush=True)
    return rows


def loss(vocabs, N, repeats):
    from loom.kernels.loss import linear_cross_entropy

    def recomputed(h, w, y, chunk=1024):
        total = 0
        for i in range(0, h.shape[0], chunk):
            total = total + checkpoint(lambda a, b, c: F.cross_entropy(F.linear(a, b), c, reduction="sum"),
                                       h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
        return total / h.shape[0]

    rows = []
    for V in vocabs:
        h = torch.randn(N, 256, requires_grad=True)
        w = (torch.randn(V, 256) / 16).requires_grad_(True)
        y = torch.randint(0, V, (N,))
        t = best_times({"full": lambda: linear_cross_entropy(h, w, y, impl="reference").backward(),
                        "fused chunked": lambda: linear_cross_entropy(h, w, y).backward(),
                        "recomputed chunked": lambda: recomputed(h, w, y).backward()}, repeats)
        rows.append({"V": V, "N": N, **{k: round(v, 4) for k, v in t.items()},
                     "fused / full speed": round(t["full"] / t["fused chunked"], 2),
                     "recomputed / full speed": round(t["full"] / t["recomputed chunked"], 2)})
        print(rows[-1], flush=True)
    return rows


def loom_and_hf(V: int, max_len: int):
    """The compared pair: Loom's HybridLM and transformers' LlamaForCausalLM, 4 attention layers
    at d_model 256 (SwiGLU 683 vs 688 hidden: the same parameter count within 1%), tied."""
    import transformers

    from loom.models import HybridLM, ModelConfig

    torch.manual_seed(0)
    loom = HybridLM(ModelConfig(vocab_size=V, d_model=256, n_heads=4, layers=["attn"] * 4).resolved())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688,
        num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=max_len,
        attn_implementation="sdpa"))
    return loom, hf


def profile(T: int, V: int, top: int = 12) -> dict:
    """Where one training step of each model spends its time (torch.profiler, self CPU time
    per aten op, after two warm-up steps): {model: {"total_ms", "ops": [(name, ms, share)]}}."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    loom, hf = loom_and_hf(V, T)
    ids = torch.randint(0, V, (1, T + 1))

    def loom_step():
        out = loom(ids[:, :-1])
        (loom.loss(out.hidden, ids[:, 1:]) + out.aux_loss).backward()

    def hf_step():
        hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()

    res = {}
    for name, step in (("loom", loom_step), ("hf", hf_step)):
        step(), step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        res[name] = {"total_ms": round(total / 1e3, 1),
                     "ops": [(e.key, round(e.self_cpu_time_total / 1e3, 1), round(e.self_cpu_time_total / total, 3))
                             for e in events[:top]]}
        print(name, res[name]["total_ms"], "ms", *(f"\n  {k:50s} {ms:9.1f} ms {sh:6.1%}" for k, ms, sh in
                                                      res[name]["ops"]), flush=True)
    return {"T": T, "V": V, **res}


def model(lengths, vocabs, docs, repeats):
    from loom.trainer.observe.perf import measure_cpu_peak

    peaks = [measure_cpu_peak()]
    rows = []
    for V in vocabs:
        loom, hf = loom_and_hf(V, max(lengths))
        for T in lengths:
            ids = torch.randint(0, V, (1, T + 1))
            sid = doc_ids(T, docs)
            pos = torch.cat([torch.arange(int(n)) for n in torch.bincount(sid[0])])[None]

            def loom_step(packed):
                def run():
                    out = loom(ids[:, :-1], position_ids=pos if packed else None)
                    (loom.loss(out.hidden, ids[:, 1:]) + out.aux_loss).backward()
                return run

            def hf_step():
                hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()

            t = best_times({"hf": hf_step, "loom": loom_step(False), "loom packed": loom_step(True)}, repeats)
            peaks.append(measure_cpu_peak())  # a GEMM after each length: the machine's load drifts
            row = {"V": V, "T": T, "docs (packed)": docs, "flops_per_token": loom.flops_per_token(T)}
            for k, s in t.items():
                row[f"{k} tok/s"] = round(T / s)
            row["loom / hf"] = round(t["hf"] / t["loom"], 2)
            row["packed / unpacked"] = round(t["loom"] / t["loom packed"], 2)
            rows.append(row)
            print(row, flush=True)
    peak = max(peaks)  # the least disturbed GEMM of the run
    for row in rows:
        for k in ("hf", "loom", "loom packed"):
            row[f"{k} mfu"] = round(row[f"{k} tok/s"] * row["flops_per_token"] / peak, 3)
    return {"peak_flops": peak, "peak_flops_measured": [round(p) for p in peaks], "rows": rows}


def recipe_model(name: str, n_layers: int = 4) -> tuple[list[str], dict]:
    """(layers, mixers) of recipes/<name>.yaml: its layer pattern repeated or trimmed to
    `n_layers`, its mixer options for those kinds with LONG_MIXERS on top."""
    from loom.trainer.config import load_config

    m = load_config(RECIPES / f"{name}.yaml").model
    layers = (m.layer_kinds() * n_layers)[:n_layers]
    return layers, {k: {**m.mixers.get(k, {}), **LONG_MIXERS.get(k, {})} for k in dict.fromkeys(layers)}


_STEPS: dict = {}


def train_step(layers: list[str], mixers: dict, T: int, checkpointing: str, threads: int) -> dict:
    """long_step.run_step (one step in a fresh process, no tiling), once per configuration per run."""
    from long_step import run_step  # benchmarks/ is this script's sys.path[0]

    key = (tuple(layers), json.dumps(mixers, sort_keys=True), T, checkpointing, threads)
    if key not in _STEPS:
        _STEPS[key] = run_step(layers, T, checkpointing, 0, 0, threads, json.dumps(mixers))
        print(json.dumps(_STEPS[key]), flush=True)
    return _STEPS[key]


def extrapolate_seconds(points: list[tuple[int, float]], T: int) -> float:
    """Seconds of a step at T from measured (tokens, seconds), at least two: the power law
    through the last two points, its exponent clamped to [1, 2]."""
    (T0, s0), (T1, s1) = points[-2:]
    p = min(2.0, max(1.0, math.log(s1 / s0) / math.log(T1 / T0)))
    return s1 * (T / T1) ** p


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, the largest |y - a - b x|)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in zip(xs, ys))


def round_down_tokens(T: float) -> int:
    """The largest 2^k x 1024 or 3 x 2^k x 1024 tokens at most T (0 below 1024)."""
    best, p = 0, 1024
    while p <= T:
        best = 3 * p // 2 if p > 1024 and 3 * p // 2 <= T else p
        p *= 2
    return best


def long_slope(row: dict, budget_gib: float) -> None:
    """Adds to a `longest` row whose verifying step ran the slope of the peak from the longest
    fitted length to the verified one (KiB per token) and the T_max that this slope gives from
    the verified peak: the short lengths' line over-counts where the peak grows sublinearly."""
    v, last = row.get("verify", {}), row["fit"][-1]
    if "peak_rss_gib" not in v or "peak_rss_gib" not in last:
        return
    b = (v["peak_rss_gib"] - last["peak_rss_gib"]) / (v["T"] - last["tokens"])
    row["b_long_kib_per_token"] = round(b * 2**20, 2)
    row["T_max_long_slope"] = round_down_tokens(v["T"] + (budget_gib - v["peak_rss_gib"]) / b)


def recipes(names, lengths, threads, cap_seconds):
    rows = []
    for name in names:
        layers, mixers = recipe_model(name)
        done = []
        for T in lengths:
            row = {"recipe": name, "layers": layers, "mixers": mixers, "T": T}
            est = extrapolate_seconds(done, T) if len(done) > 1 else 0.0
            if est > cap_seconds:
                row["skipped"] = f"est. {est:.0f} s"
            else:
                rec = train_step(layers, mixers, T, "full", threads)
                if "failed" in rec:
                    row["failed"] = rec["failed"]
                else:
                    done.append((T, rec["seconds"]))
                    row.update({"seconds": rec["seconds"], "tok/s": round(T / rec["seconds"]),
                                "peak_rss_gib": rec["peak_rss_gib"]})
            rows.append(row)
            print(row, flush=True)
    return rows


def longest(names, modes, fit_lengths, budget_gib, threads, verify, verify_seconds, verify_gib):
    rows = []
    for name in names:
        layers, mixers = recipe_model(name)
        for checkpointing in modes:
            recs = [train_step(layers, mixers, T, checkpointing, threads) for T in fit_lengths]
            row = {"recipe": name, "layers": layers, "checkpointing": checkpointing,
                   "fit": [{k: r[k] for k in ("tokens", "seconds", "peak_rss_gib", "failed") if k in r} for r in recs]}
            ok = [r for r in recs if "failed" not in r]
            if len(ok) < 2:
                rows.append(row)
                print(row, flush=True)
                continue
            a, b, resid = linear_fit([r["tokens"] for r in ok], [r["peak_rss_gib"] for r in ok])
            t_max = round_down_tokens((budget_gib - a) / b)
            row.update({"a_gib": round(a, 3), "b_kib_per_token": round(b * 2**20, 2),
                        "fit_residual_gib": round(resid, 3), "T_max_extrapolated": t_max})
            if checkpointing == "full" and name in verify:
                points = [(r["tokens"], r["seconds"]) for r in ok]
                T = t_max
                while T > fit_lengths[-1] and (extrapolate_seconds(points, T) > verify_seconds
                                               or a + b * T > verify_gib):
                    T = round_down_tokens(T - 1)
                if T > fit_lengths[-1]:
                    rec = train_step(layers, mixers, T, checkpointing, threads)
                    row["verify"] = {"T": T, "at_T_max": T == t_max, "predicted_gib": round(a + b * T, 2),
                                     **{k: rec[k] for k in ("seconds", "peak_rss_gib", "failed") if k in rec}}
                    long_slope(row, budget_gib)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["packed", "loss", "model"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument("--vocabs", nargs="+", type=int, default=[256, 32768])
    ap.add_argument("--loss-vocabs", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--loss-tokens", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=SMALL_RECIPES, help="recipes and longest: recipes/<name>.yaml")
    ap.add_argument("--recipe-lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    ap.add_argument("--cap-seconds", type=float, default=300, help="recipes: skip a longer step")
    ap.add_argument("--longest-recipes", nargs="+", default=["quickstart", "swa", "rat-swa", "linear-attn",
                                                             "titans-mal"])
    ap.add_argument("--checkpointing", nargs="+", default=["none", "full"], help="longest: activation checkpointing")
    ap.add_argument("--fit-lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--budget-gib", type=float, default=24)
    ap.add_argument("--verify", nargs="+", default=["swa", "rat-swa", "linear-attn", "titans-mal"],
                    help="longest: recipes whose T_max (with checkpointing) gets one real step")
    ap.add_argument("--verify-seconds", type=float, default=480)
    ap.add_argument("--verify-gib", type=float, default=16, help="the machine's other users need the rest")
    ap.add_argument("--out", default=str(RESULTS / "speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"threads": a.threads, "repeats": a.repeats, "date": time.strftime("%Y-%m-%d %H:%M")}
    if "packed" in a.sections:
        res["packed"] = packed(a.lengths, a.docs, a.repeats)
    if "loss" in a.sections:
        res["loss"] = loss(a.loss_vocabs, a.loss_tokens, a.repeats)
    if "model" in a.sections:
        res["model"] = model(a.lengths, a.vocabs, a.docs, a.repeats)
    out = Path(a.out)
    out.parent.mkdir(exist_ok=True)
    if "profile" in a.sections:
        res["profile"] = profile(a.lengths[0], a.vocabs[0])
    if "recipes" in a.sections:
        res["recipes"] = recipes(a.recipes, a.recipe_lengths, a.threads, a.cap_seconds)
        out.write_text(json.dumps(res, indent=1) + "\n")
    if "longest" in a.sections:
        res["longest"] = longest(a.longest_recipes, a.checkpointing, a.fit_lengths, a.budget_gib, a.threads, a.verify,
                                 a.verify_seconds, a.verify_gib)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
