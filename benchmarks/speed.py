"""Side-by-side speed of issue 17's paths: packed documents, cross-entropy, whole model.

Everything is timed in ONE process with the candidates interleaved (A, B, A, B,
...; the best of `--repeats` per candidate), so that the ratios stay
meaningful on a shared machine whose absolute speed drifts. fp32, CPU,
`--threads` threads (default 2).

Sections (each prints a markdown table and is recorded in benchmarks/results/speed.json):
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
             unpacked rows; tok/s and MFU against a GEMM peak measured in the run.

    python benchmarks/speed.py                                   # all, minutes
    python benchmarks/speed.py --sections packed --lengths 8192 32768
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


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


def model(lengths, vocabs, docs, repeats):
    import transformers

    from loom.models import HybridLM, ModelConfig
    from loom.trainer.perf import measure_cpu_peak

    peak = measure_cpu_peak()
    rows = []
    for V in vocabs:
        torch.manual_seed(0)
        loom = HybridLM(ModelConfig(vocab_size=V, d_model=256, n_heads=4, layers=["attn"] * 4).resolved())
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688,
            num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=max(lengths),
            attn_implementation="sdpa"))
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
            fpt = loom.flops_per_token(T)
            row = {"V": V, "T": T, "docs (packed)": docs}
            for k, s in t.items():
                row[f"{k} tok/s"] = round(T / s)
                row[f"{k} mfu"] = round(T / s * fpt / peak, 3)
            row["loom / hf"] = round(t["hf"] / t["loom"], 2)
            row["packed / unpacked"] = round(t["loom"] / t["loom packed"], 2)
            rows.append(row)
            print(row, flush=True)
    return {"peak_flops": peak, "rows": rows}


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
    Path(a.out).parent.mkdir(exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
