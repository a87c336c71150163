"""Data path at scale: preparation throughput, training start-up and memory, loader throughput.

Every corpus is generated offline into --root (default /tmp/loom-bench-data, never
the repo): synthetic English-like text (words drawn from a fixed list with
log-normal document lengths), in jsonl files of ~100 MB. Steps (run one at a time;
each stays within a few minutes on 2 cores) write results/data_<step>.json:

  gen       >= 2 GB of jsonl (--gb), plus a 10 MB file; a BPE tokenizer (vocab 8192)
            trained on a 20 MB sample, saved as tokenizer.json.
  prepare   tokens/s per process of `loom data prepare` (1 and 2 processes), of
            `datasets.map` (batched, the same tokenizers.Tokenizer) and of datatrove's
            JsonlReader -> DocumentTokenizer (1 task, no shuffle), all on the same
            files in the same run; ratios to datasets.map.
  startup   prepared sets of 10M, 100M and 1B tokens (byte tokenizer, 2 processes);
            in a fresh process each: seconds to build the training dataset and read
            the first batch, and resident memory (VmRSS, and RssAnon: memory not backed by
            the data files); the same for the previous in-RAM path (datasets + tokenize
            everything + PackedStream, from git commit 5f7bcf9) at 10M and 100M tokens.
  checksum  what the data checksums cost on the 1B-token set (byte tokenizer): crc32 GB/s
            of this CPU; start-up of `open_prepared` with its default checks (sizes + index
            crc32), sizes only, and every sha256 (`loom data verify`); windows/s of the reader
            at seq_len 4K, 32K and 128K with the per-block crc32 (first touch of each block)
            and with it patched out, in the same run, warm page cache.
  loader    windows/s of the reader (window + packing + collate, one process) at
            seq_len 32K and 128K on the 1B-token set, against the windows/s one GPU
            consumes training rat-swa-350m at that length (FLOPs/token from the model,
            an H100 at 989 bf16 TFLOP/s and 40% MFU: an estimate, no GPU here).

    python benchmarks/data.py gen
    python benchmarks/data.py prepare
    python benchmarks/data.py startup
    python benchmarks/data.py loader
    python benchmarks/data.py checksum
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORDS = ("the of and to in is that for it as with was on be by this are from at or an which not have has but "
         "were can all their more one also its been other into new than these some time such only used may first "
         "two most model data window token layer memory attention context length training loss gradient shard "
         "document corpus sequence batch learning rate schedule stage prepared reader").split()
FILE_MB = 100


def _write_jsonl(path: Path, n_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = " ".join(rng.choice(WORDS, size=4_000_000))                          # ~24 MB of words
    with open(path, "w") as f:
        written = 0
        while written < n_bytes:
            n = int(min(rng.lognormal(7.5, 1.2), 400_000)) + 20                   # characters, median ~1.8K
            lo = int(rng.integers(0, len(base) - n))
            line = json.dumps({"text": base[lo:lo + n]}) + "\n"
            f.write(line)
            written += len(line)


def cmd_gen(args) -> dict:
    root = Path(args.root)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_files = int(np.ceil(args.gb * 1000 / FILE_MB))
    for i in range(n_files):
        p = raw / f"part-{i:03d}.jsonl"
        if not p.exists():
            _write_jsonl(p, FILE_MB * 10**6, seed=i)
    small = root / "small" / "part-small.jsonl"
    small.parent.mkdir(exist_ok=True)
    if not small.exists():
        _write_jsonl(small, 10 * 10**6, seed=1000)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(small) as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    tok.save(str(root / "tokenizer.json"))
    total = sum(p.stat().st_size for p in raw.glob("*.jsonl"))
    return {"files": n_files, "bytes": total, "seconds": time.perf_counter() - t0}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _loom_prepare(files: list[Path], out: Path, tokenizer: str, procs: int) -> tuple[float, int]:
    from loom.trainer.data import SourceConfig, load_tokenizer
    from loom.trainer.data.prepare import prepare_source

    src = SourceConfig(kind="files", paths=[str(p) for p in files])
    t0 = time.perf_counter()
    prep = prepare_source(src, load_tokenizer(tokenizer), str(_fresh(out)), procs=procs, say=lambda m: None)
    return time.perf_counter() - t0, prep.totals("all")[1]


def _datasets_map(files: list[Path], tokenizer: str, cache: Path) -> tuple[float, int]:
    import datasets
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[str(p) for p in files], split="train",
                               cache_dir=str(_fresh(cache)))
    out = ds.map(lambda b: {"ids": [e.ids for e in tok.encode_batch(b["text"], add_special_tokens=False)]},
                 batched=True, batch_size=512, remove_columns=["text"])
    n = sum(len(x) for x in out["ids"]) + len(out)                            # + one eos per document
    return time.perf_counter() - t0, n


def _datatrove(files: list[Path], tokenizer: str, out: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    inputs = _fresh(out) / "in"
    inputs.mkdir(parents=True)
    for p in files:
        (inputs / p.name).symlink_to(p)
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(inputs)),
        DocumentTokenizer(str(out / "tok"), tokenizer_name_or_path=tokenizer, eos_token="<|endoftext|>",
                          shuffle_documents=False, batch_size=512)],
        tasks=1, workers=1, logging_dir=str(out / "logs"), skip_completed=False).run()
    n = sum(p.stat().st_size for p in (out / "tok").rglob("*.ds")) // 2
    return time.perf_counter() - t0, n


def _split(src: Path, dest: Path, n: int, mb: float) -> list[Path]:
    """n files of about mb MB each, whole lines from the start of src (so 2 processes have 2 units)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = [dest / f"part-{i:03d}.jsonl" for i in range(n)]
    with open(src) as f:
        for p in out:
            with open(p, "w") as g:
                size = 0
                while size < mb * 10**6:
                    line = f.readline()
                    g.write(line)
                    size += len(line)
    return out


def cmd_prepare(args) -> dict:
    root = Path(args.root)
    tokenizer = str(root / "tokenizer.json")
    work = root / "work"
    files = _split(sorted((root / "raw").glob("part-*.jsonl"))[0], work / "in", args.files, args.mb)
    os.environ["RAYON_NUM_THREADS"] = "1"            # one core per process for every tool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    res = {"files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files)}
    import resource

    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    for name, fn in [("loom_1proc", lambda: _loom_prepare(files, work / "l1", tokenizer, 1)),
                     ("loom_2proc", lambda: _loom_prepare(files, work / "l2", tokenizer, 2)),
                     ("datasets_map", lambda: _datasets_map(files, tokenizer, work / "hf")),
                     ("datatrove", lambda: _datatrove(files, tokenizer, work / "dt"))]:
        c0 = cpu()
        sec, n = fn()
        cpu_s = cpu() - c0
        res[name] = {"seconds": sec, "cpu_seconds": cpu_s, "tokens": n, "tokens_per_s": n / sec,
                     "tokens_per_cpu_s": n / cpu_s}
        print(f"{name}: {n:,} tokens in {sec:.1f}s wall, {cpu_s:.1f}s CPU = {n / sec / 1e6:.3f} M tokens/s, "
              f"{n / cpu_s / 1e6:.3f} M tokens per CPU-second (per process)", flush=True)
    ref = res["datasets_map"]
    res["ratio_to_datasets_map"] = {k: {"wall": res[k]["tokens_per_s"] / ref["tokens_per_s"],
                                        "per_cpu_s": res[k]["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]}
                                    for k in ("loom_1proc", "loom_2proc", "datatrove")}
    for name in ("l1", "l2", "hf", "dt"):
        shutil.rmtree(work / name, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- start-up and memory

_PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
kind, path, cache = sys.argv[1], sys.argv[2], sys.argv[3]
def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out
import numpy as np, torch
base = mem()
t_import = time.perf_counter()
if kind == "prepared":
    from loom.trainer.data import Batcher, DataConfig, SourceConfig, build_dataset, load_tokenizer
    cfg = DataConfig(seq_len=4096, sources=[SourceConfig(kind="prepared", path=path)])
    ds = build_dataset(cfg, load_tokenizer("byte"), "train", 0)
    batch = Batcher(ds, 8).next()
else:  # the in-RAM path of commit 5f7bcf9: every document and token in Python/numpy
    sys.path.insert(0, cache)
    from old_sources import files_documents
    from old_packing import PackedStream, pack_window, tokenize_documents
    from loom.trainer.data import load_tokenizer
    docs = files_documents([path], cache_dir=os.path.join(cache, "hf"))
    tokens, offsets = tokenize_documents(load_tokenizer("byte"), docs)
    s = PackedStream(tokens, offsets, 4096, (0, 0, 0, 0))
    batch = [pack_window(*s.window(k)) for k in range(8)]
t_ready = time.perf_counter()
m = mem()
print(json.dumps({"startup_s": t_ready - t_import, "import_s": t_import - t0,
                  "rss_mb": m["VmRSS"] - base["VmRSS"], "anon_mb": m["RssAnon"] - base["RssAnon"],
                  "peak_rss_mb": m["VmHWM"] - base["VmRSS"]}))
"""


def _old_code(dest: Path) -> None:
    """The pre-issue-13 in-RAM loaders, from git, as standalone modules (no loom imports)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("sources", "packing"):
        text = subprocess.run(["git", "-C", str(HERE.parent), "show", f"5f7bcf9:trainer/data/{name}.py"],
                              check=True, capture_output=True, text=True).stdout
        (dest / f"old_{name}.py").write_text(text)


def _probe(kind: str, path: str, cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE, kind, path, cache], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepared_sets(root: Path) -> dict[str, Path]:
    """10M, 100M, 1B-token prepared sets (byte tokenizer: one token per byte of text)."""
    from loom.trainer.data import SourceConfig, load_tokenizer
    from loom.trainer.data.prepare import prepare_source

    raw = sorted((root / "raw").glob("part-*.jsonl"))
    plan = {"10M": [root / "small" / "part-small.jsonl"], "100M": raw[:1], "1B": raw[:10]}
    out = {}
    for name, files in plan.items():
        dest = root / "prepared" / name
        t0 = time.perf_counter()
        prep = prepare_source(SourceConfig(kind="files", paths=[str(p) for p in files]), load_tokenizer("byte"),
                              str(dest), procs=2, say=lambda m: None)
        print(f"prepared {name}: {prep.totals('all')[1]:,} tokens ({time.perf_counter() - t0:.1f}s)", flush=True)
        out[name] = dest
    return out


def cmd_startup(args) -> dict:
    root = Path(args.root)
    sets = _prepared_sets(root)
    old = root / "oldcode"
    _old_code(old)
    res: dict = {"prepared": {}, "in_ram_5f7bcf9": {}}
    for name, dest in sets.items():
        from loom.trainer.data.prepared import open_prepared

        t0 = time.perf_counter()
        open_prepared(str(dest))                                                  # first use: sha256 of every shard
        first = time.perf_counter() - t0
        r = _probe("prepared", str(dest), str(old))
        r["first_use_verify_s"] = first
        r["tokens"] = open_prepared(str(dest), verify=False).totals("all")[1]
        res["prepared"][name] = r
        print(f"prepared {name}: {r}", flush=True)
    for name, path in [("10M", root / "small" / "part-small.jsonl"), ("100M", sorted((root / "raw").glob("*"))[0])]:
        r = _probe("old", str(path), str(old))
        res["in_ram_5f7bcf9"][name] = r
        print(f"in-RAM {name}: {r}", flush=True)
    return res


def cmd_loader(args) -> dict:
    import torch

    from loom.trainer.config import load_config
    from loom.trainer.data import Batcher, DataConfig, SourceConfig, build_dataset, load_tokenizer
    from loom.trainer.train import model_config_for
    from loom.models import HybridLM

    torch.set_num_threads(1)
    dest = Path(args.root) / "prepared" / "1B"
    res = {}
    cfg = load_config(HERE.parent / "recipes" / "rat-swa-350m.yaml", ["data.tokenizer=byte"])
    with torch.device("meta"):
        model = HybridLM(model_config_for(cfg, 32000))
    for T in (32768, 131072):
        ds = build_dataset(DataConfig(seq_len=T, sources=[SourceConfig(kind="prepared", path=str(dest))]),
                           load_tokenizer("byte"), "train", 0)
        b = Batcher(ds, 1, start=10_000)
        b.next()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 10:
            b.next()
            n += 1
        wps = n / (time.perf_counter() - t0)
        flops = model.flops_per_token(T)
        gpu_tps = 989e12 * 0.40 / flops
        res[T] = {"loader_windows_per_s": wps, "loader_tokens_per_s": wps * T, "model_flops_per_token": flops,
                  "h100_tokens_per_s_at_40pct_mfu": gpu_tps, "h100_windows_per_s": gpu_tps / T,
                  "headroom": wps / (gpu_tps / T)}
        print(f"seq_len {T}: loader {wps:.1f} windows/s ({wps * T / 1e6:.1f} M tokens/s); one H100 consumes "
              f"{gpu_tps / T:.3f} windows/s -> {res[T]['headroom']:.0f}x headroom", flush=True)
    return res


def _prepared_1b(root: Path) -> Path:
    """The 1B-token prepared set of `startup` (generated and prepared here when missing)."""
    from loom.trainer.data import SourceConfig, load_tokenizer
    from loom.trainer.data.prepare import prepare_source

    dest = root / "prepared" / "1B"
    if (dest / "manifest.json").is_file():
        return dest
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    files = [raw / f"part-{i:03d}.jsonl" for i in range(10)]
    for i, p in enumerate(files):
        if not p.exists():
            _write_jsonl(p, FILE_MB * 10**6, seed=i)
    t0 = time.perf_counter()
    prepare_source(SourceConfig(kind="files", paths=[str(p) for p in files]), load_tokenizer("byte"), str(dest),
                   procs=2, say=lambda m: None)
    print(f"prepared 1B ({time.perf_counter() - t0:.0f}s)", flush=True)
    return dest


def _windows_per_s(dest: Path, T: int, check: bool, seconds: float) -> tuple[float, int]:
    """(windows/s, blocks crc32-checked) of a fresh reader at seq_len T, its check on or patched out."""
    from loom.trainer.data import Batcher, DataConfig, SourceConfig, build_dataset, load_tokenizer
    from loom.trainer.data import reader

    saved, calls = reader.check_block, [0]

    def counted(*a, **k):
        calls[0] += 1
        return saved(*a, **k)

    reader.check_block = counted if check else (lambda *a, **k: None)
    try:
        ds = build_dataset(DataConfig(seq_len=T, sources=[SourceConfig(kind="prepared", path=str(dest))]),
                           load_tokenizer("byte"), "train", 0)
        b = Batcher(ds, 1, start=10_000)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b.next()
            n += 1
        return n / (time.perf_counter() - t0), calls[0]
    finally:
        reader.check_block = saved


def cmd_checksum(args) -> dict:
    import zlib

    import torch

    from loom.trainer.data.prepared import open_prepared, verify_shards

    torch.set_num_threads(1)
    dest = _prepared_1b(Path(args.root))
    prep = open_prepared(str(dest), verify=False)
    files = [f for s in prep.shards for f in (s.tokens, s.index)]
    nbytes = sum(os.path.getsize(f) for f in files)
    for f in files:                                                    # warm page cache for every timing
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    buf = np.memmap(prep.shards[0].tokens, dtype=np.uint8, mode="r")[: 1 << 30]
    t0 = time.perf_counter()
    zlib.crc32(buf)
    crc_gbs = len(buf) / (time.perf_counter() - t0) / 1e9

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    res: dict = {"tokens": prep.totals("all")[1], "bytes": nbytes, "crc32_gb_per_s": crc_gbs,
                 "open_sizes_only_s": timed(lambda: open_prepared(str(dest), verify=False)),
                 "open_default_s": timed(lambda: open_prepared(str(dest))),
                 "verify_all_sha256_s": timed(lambda: verify_shards(prep, full=True)), "reader": {}}
    print(f"1B set: {res['tokens']:,} tokens, {nbytes / 1e9:.2f} GB; crc32 {crc_gbs:.2f} GB/s; open: sizes "
          f"{res['open_sizes_only_s']:.3f}s, default {res['open_default_s']:.3f}s; every sha256 "
          f"{res['verify_all_sha256_s']:.1f}s", flush=True)
    for T in (4096, 32768, 131072):
        on, blocks = _windows_per_s(dest, T, True, args.seconds)
        off, _ = _windows_per_s(dest, T, False, args.seconds)
        on2, _ = _windows_per_s(dest, T, True, args.seconds)              # on / off / on: drift shows
        on = (on + on2) / 2
        res["reader"][T] = {"windows_per_s_checked": on, "windows_per_s_unchecked": off,
                            "ms_per_window_checked": 1e3 / on, "ms_per_window_unchecked": 1e3 / off,
                            "overhead_ms_per_window": 1e3 / on - 1e3 / off, "blocks_checked_first_run": blocks}
        print(f"seq_len {T}: {on:.1f} windows/s checked, {off:.1f} unchecked: "
              f"{1e3 / on - 1e3 / off:+.3f} ms per window ({blocks} blocks checked)", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["gen", "prepare", "startup", "loader", "checksum"])
    p.add_argument("--root", default="/tmp/loom-bench-data")
    p.add_argument("--gb", type=float, default=2.0, help="gen: GB of jsonl")
    p.add_argument("--files", type=int, default=4, help="prepare: files to tokenize")
    p.add_argument("--mb", type=float, default=10.0, help="prepare: MB of jsonl per file")
    p.add_argument("--seconds", type=float, default=10.0, help="checksum: seconds per reader timing")
    args = p.parse_args()
    res = {"gen": cmd_gen, "prepare": cmd_prepare, "startup": cmd_startup, "loader": cmd_loader,
           "checksum": cmd_checksum}[args.step](args)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"data_{args.step}.json", "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), **res}, f, indent=1, default=str)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
