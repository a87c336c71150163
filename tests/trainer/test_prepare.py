"""`loom data prepare` (trainer/data/prepare.py, prepared.py): shards read back equal the
tokenized documents; 1 vs 2 processes and 1 vs 3 workers give the same bytes; a
prepare killed with SIGKILL and re-run ends byte-identical to an uninterrupted one;
bad input (damaged shard, other tokenizer, vocabulary too large for the dtype,
empty source, older format) is one `error:` line before any training step and
leaves the prepared folder untouched; `loom data stats` numbers match the documents.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loom.trainer.cli import main
from loom.trainer.data import SourceConfig, load_tokenizer
from loom.trainer.data.prepare import prepare_source
from loom.trainer.data.prepared import ManifestError, open_prepared
from loom.trainer.data.sources import in_val
from loomtest import TINY

BYTE = load_tokenizer("byte")
REPO = Path(__file__).resolve().parents[2]


def _write_corpus(folder: Path, n_files: int, docs_per_file: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "loom", "window", "shard", "token", "é", "日本"]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for f in range(n_files):
        docs = [" ".join(rng.choice(words, size=rng.integers(3, 60))) + f" {f}-{i}" for i in range(docs_per_file)]
        (folder / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        files.append(docs)
    return files


def _tree_bytes(folder: Path) -> dict[str, str]:
    """sha256 of every data file of a prepared folder (locks and the verification record aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _read_docs(prep, part):
    out = []
    for sh in prep.split_shards(part):
        toks = np.fromfile(sh.tokens, dtype=prep.dtype).astype(np.int64)
        ends = np.fromfile(sh.index, dtype="<u8").astype(np.int64)
        out += [toks[lo:hi] for lo, hi in zip(np.concatenate([[0], ends[:-1]]), ends)]
    return out


def test_shards_hold_the_tokenized_documents_in_order(tmp_path):
    files = _write_corpus(tmp_path / "raw", 3, 50)
    src = SourceConfig(kind="files", path=str(tmp_path / "raw"), val_fraction=0.2)
    prep = prepare_source(src, BYTE, str(tmp_path / "out"))
    docs = [d for f in files for d in f]
    for part in ("train", "val"):
        want = [np.array([256, *d.encode(), 257]) for d in docs if in_val(d, 0.2) == (part == "val")]
        got = _read_docs(prep, part)
        assert len(got) == len(want) > 0 and all(np.array_equal(a, b) for a, b in zip(got, want))
    m = prep.manifest
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == BYTE.fingerprint
    assert m["totals"]["train"]["documents"] + m["totals"]["val"]["documents"] == len(docs)
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert prepare_source(src, BYTE, str(tmp_path / "out")).manifest == m        # done: nothing redone


def test_processes_and_workers_give_the_same_bytes(tmp_path):
    _write_corpus(tmp_path / "raw", 4, 40)
    src = SourceConfig(kind="files", path=str(tmp_path / "raw" / "*.jsonl"))
    prepare_source(src, BYTE, str(tmp_path / "one"))
    prepare_source(src, BYTE, str(tmp_path / "procs"), procs=2)
    for w in range(3):                                    # three "machines" sharing one folder
        prep = prepare_source(src, BYTE, str(tmp_path / "workers"), worker=w, workers=3)
        assert (prep is None) == (w < 2)
    ref = _tree_bytes(tmp_path / "one")
    assert _tree_bytes(tmp_path / "procs") == ref and _tree_bytes(tmp_path / "workers") == ref


def _prepare_cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "loom.trainer", "data", "prepare", "--out", str(out),
            "--source", f"{{kind: files, path: '{raw}'}}"]


def test_interrupted_prepare_state_is_completed_byte_identical(tmp_path):
    """Fast tier: the files a kill leaves behind (a stale temporary, a unit whose marker is
    missing, a truncated shard) are redone; the slow test below really kills a process."""
    _write_corpus(tmp_path / "raw", 4, 100)
    src = SourceConfig(kind="files", path=str(tmp_path / "raw"))
    prepare_source(src, BYTE, str(tmp_path / "ref"))
    out = tmp_path / "out"
    prepare_source(src, BYTE, str(out))
    (out / "manifest.json").unlink()
    (out / "units" / "00001.json").unlink()                                   # killed before its marker
    (out / "train" / "00002-0000.tokens.tmp-99999").write_bytes(b"partial")
    tokens = out / "train" / "00003-0000.tokens"
    tokens.write_bytes(tokens.read_bytes()[:10])                             # a torn file
    assert prepare_source(src, BYTE, str(out)) is not None
    assert not list(out.rglob("*.tmp-*")) and _tree_bytes(out) == _tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_killed_prepare_resumes_byte_identical(tmp_path):
    _write_corpus(tmp_path / "raw", 16, 2000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_prepare_cmd(tmp_path / "raw", ref), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_prepare_cmd(tmp_path / "raw", out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((out / "units").glob("*.json")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)                                       # into the next unit's shards
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "units").glob("*.json")))
    assert 1 <= done < 16 and not (out / "manifest.json").exists()
    with pytest.raises(ManifestError, match="did not finish.*same `loom data prepare`"):
        open_prepared(str(out), BYTE)
    subprocess.run(_prepare_cmd(tmp_path / "raw", out), check=True, env=env, capture_output=True)
    assert not list(out.rglob("*.tmp-*"))
    assert _tree_bytes(out) == _tree_bytes(ref)


def _train_args(tmp_path, prepared: Path, *extra):
    return ["train", str(TINY), f"output_dir={tmp_path / 'run'}",
            f"data.sources=[{{kind: prepared, path: '{prepared}'}}]", *extra]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _wordlevel_tokenizer(path: Path, n: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"</s>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(n - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_bad_prepared_data_is_one_line_and_damages_nothing(tmp_path, capsys):
    _write_corpus(tmp_path / "raw", 2, 200)
    prep_dir = tmp_path / "prep"
    assert main(["data", "prepare", "--out", str(prep_dir), "--source",
                 f"{{kind: files, path: '{tmp_path / 'raw'}'}}"]) == 0
    before = _tree_bytes(prep_dir)
    shard = prep_dir / "train" / "00000-0000.tokens"

    big = _wordlevel_tokenizer(tmp_path / "big", 70_000)                   # other tokenizer, > uint16
    err = _error_line(capsys, _train_args(tmp_path, prep_dir, f"data.tokenizer={big}"))
    assert "manifest.json" in err and "uint16" in err and "prepare again" in err
    small = _wordlevel_tokenizer(tmp_path / "small", 500)
    err = _error_line(capsys, _train_args(tmp_path, prep_dir, f"data.tokenizer={small}"))
    assert "manifest.json" in err and "prepared with tokenizer byte" in err and "data.tokenizer" in err
    assert _tree_bytes(prep_dir) == before and not (tmp_path / "run" / "checkpoints").exists()

    err = _error_line(capsys, ["data", "prepare", "--dtype", "uint16", "--tokenizer", str(big), "--out",
                               str(tmp_path / "p16"), "--source", f"{{kind: files, path: '{tmp_path / 'raw'}'}}"])
    assert "70000 ids does not fit uint16" in err and not (tmp_path / "p16").exists()

    damaged = sorted((prep_dir / "train").glob("*.tokens"))  # every train shard: whichever a window reads first
    for path in damaged:
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF                                      # bit rot: same size, same mtime, one byte changed
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    err = _error_line(capsys, _train_args(tmp_path, prep_dir))
    assert any(str(p) in err for p in damaged) and "crc32" in err and "documents 0-" in err
    assert "loom data prepare" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not [r for r in _metrics(tmp_path / "run") if "loss" in r]       # no step was taken on it
    err = _error_line(capsys, ["data", "verify", str(prep_dir)])
    assert str(shard) in err and "sha256" in err
    manifest = json.loads((prep_dir / "manifest.json").read_text())          # a folder older than block crcs:
    legacy = tmp_path / "legacy"                                             # sha256 whole at every open
    legacy.mkdir()
    for sub in ("train", "val"):
        os.symlink(prep_dir / sub, legacy / sub)
    (legacy / "manifest.json").write_text(json.dumps(
        {**manifest, "shards": [{k: v for k, v in e.items() if k not in ("block_crc32", "index_crc32")}
                                for e in manifest["shards"]]}))
    err = _error_line(capsys, _train_args(tmp_path, legacy))
    assert str(legacy / "train" / shard.name) in err and "sha256" in err
    index = shard.with_suffix(".index")
    good_index = index.read_bytes()
    index.write_bytes(good_index[:-1] + bytes([good_index[-1] ^ 1]))         # a damaged index: caught at open
    err = _error_line(capsys, _train_args(tmp_path, prep_dir))
    assert str(index) in err and "crc32" in err
    index.write_bytes(good_index)
    for path in damaged[1:]:
        path.unlink()
    shard.unlink()                                                            # what the message says to do
    assert main(["data", "prepare", "--out", str(prep_dir), "--source",
                 f"{{kind: files, path: '{tmp_path / 'raw'}'}}"]) == 0
    assert _tree_bytes(prep_dir) == before

    manifest = json.loads((prep_dir / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    err = _error_line(capsys, _train_args(tmp_path, old))
    assert str(old / "manifest.json") in err and "format version 0" in err and "prepare the corpus again" in err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    err = _error_line(capsys, ["data", "prepare", "--out", str(tmp_path / "pe"), "--source",
                               f"{{kind: files, path: '{tmp_path / 'empty'}'}}"])
    assert "has no documents" in err and not (tmp_path / "pe" / "manifest.json").exists()
    err = _error_line(capsys, _train_args(tmp_path, tmp_path / "nowhere"))
    assert "not found" in err and "loom data prepare" in err


def test_recipe_prepare_then_train_reads_the_cache(tmp_path, capsys):
    _write_corpus(tmp_path / "raw", 2, 300)
    cache = tmp_path / "cache"
    over = [f"data.cache_dir={cache}", f"data.sources=[{{kind: files, path: '{tmp_path / 'raw'}'}}]"]
    assert main(["data", "prepare", str(TINY), *over]) == 0
    out = capsys.readouterr().out
    assert "ready:" in out and len(list((cache / "prepared").glob("files-*/manifest.json"))) == 1
    before = _tree_bytes(cache)
    assert main(["train", str(TINY), f"output_dir={tmp_path / 'run'}", "train.steps=2",
                 *over]) == 0
    assert "preparing" not in capsys.readouterr().out and _tree_bytes(cache) == before


def test_stats_match_the_documents(tmp_path, capsys):
    files = _write_corpus(tmp_path / "raw", 1, 300)
    prep = prepare_source(SourceConfig(kind="files", path=str(tmp_path / "raw")), BYTE, str(tmp_path / "p"))
    assert main(["data", "stats", prep.path, "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    lengths = np.array([len(d.encode()) + 2 for d in files[0]])
    assert f"{len(lengths):,} documents, {lengths.sum():,} tokens" in out
    assert f"p50 {np.percentile(lengths, 50):,.0f}" in out and "longer than 4K: 0.00%" in out
    assert (tmp_path / "h.png").stat().st_size > 1000


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_with_the_same_losses(tmp_path):
    from loom.trainer.observe.metrics import train_losses

    _write_corpus(tmp_path / "raw", 2, 300)
    prep = prepare_source(SourceConfig(kind="files", path=str(tmp_path / "raw")), BYTE, str(tmp_path / "p"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, "-m", "loom.trainer", "train", str(TINY), f"output_dir={out}",
                f"data.sources=[{{kind: prepared, path: '{prep.path}'}}]", "train.steps=12", "train.save_every=3"]

    subprocess.run(cmd(tmp_path / "a"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoints" / "step-00000006").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= max(train_losses(tmp_path / "b")) < 12
    subprocess.run(cmd(tmp_path / "b"), check=True, env=env, capture_output=True)
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert all(abs(la[s] - lb[s]) <= 1e-6 for s in la), (la, lb)


def test_hub_source_is_streamed_by_shard(tmp_path, monkeypatch):
    """A hub dataset is read with streaming=True, one unit per stream shard (here: a local
    json dataset stands in for the hub, whose shards are its files)."""
    import datasets

    files = _write_corpus(tmp_path / "raw", 3, 40)
    real = datasets.load_dataset
    calls = []

    def fake_hub(name, subset=None, split="train", streaming=False, **kw):
        calls.append((name, subset, split, streaming))
        return real("json", data_files=sorted(str(p) for p in (tmp_path / "raw").glob("*.jsonl")), split=split,
                    streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    src = SourceConfig(kind="hub", name="org/corpus", subset="sample")
    prep = prepare_source(src, BYTE, str(tmp_path / "p"))
    assert calls and all(c == ("org/corpus", "sample", "train", True) for c in calls)
    assert prep.manifest["units"] == 3
    got = sorted(bytes(d[1:-1].astype(np.uint8)).decode() for d in _read_docs(prep, "all"))
    assert got == sorted(d for f in files for d in f)


def test_datatrove_output_is_prepared_like_our_own(tmp_path):
    """datatrove's DocumentTokenizer (the field's pipeline) tokenizes; `kind: datatrove`
    carves, hashes and writes the manifest. Same tokenizer, same documents as Loom's own path."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = _write_corpus(tmp_path / "raw", 2, 60)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([d for f in files for d in f], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(tmp_path / "raw")),
        DocumentTokenizer(str(tmp_path / "dt"), tokenizer_name_or_path=str(tmp_path / "tokenizer.json"),
                          eos_token="<|endoftext|>", shuffle_documents=False)],
        tasks=1, workers=1, logging_dir=str(tmp_path / "logs")).run()
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ours = prepare_source(SourceConfig(kind="files", path=str(tmp_path / "raw")), hf, str(tmp_path / "ours"))
    theirs = prepare_source(SourceConfig(kind="datatrove", path=str(tmp_path / "dt")), hf, str(tmp_path / "theirs"))
    as_set = lambda prep: sorted(tuple(d) for d in _read_docs(prep, "all"))            # noqa: E731
    assert len(_read_docs(theirs, "all")) == 120 and as_set(theirs) == as_set(ours)
    assert theirs.manifest["tokenizer"]["fingerprint"] == hf.fingerprint and theirs.totals("val")[0] > 0
    with pytest.raises(ValueError, match="outside the vocabulary"):                     # wrong tokenizer
        prepare_source(SourceConfig(kind="datatrove", path=str(tmp_path / "dt")), _small_tokenizer(tmp_path),
                       str(tmp_path / "bad"))


def _small_tokenizer(tmp_path):
    return load_tokenizer(str(_wordlevel_tokenizer(tmp_path / "tiny-vocab", 50)))


def _compressed_cases(folder: Path) -> dict[str, Path]:
    """A jsonl corpus compressed each way, truncated or with bytes flipped mid-stream; a parquet cut short."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode()
    cases = {}
    for ext, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress),
                          ("zst", zstandard.ZstdCompressor(write_checksum=True).compress)):  # as the zstd CLI writes
        data = compress(rows)
        bad = bytearray(data)
        for i in range(len(bad) // 2, len(bad) // 2 + 40):
            bad[i] ^= 0x5A
        for kind, payload in (("truncated", data[:len(data) // 2]), ("corrupt", bytes(bad))):
            (folder / f"{kind}-{ext}").mkdir(parents=True)
            cases[f"{kind}-{ext}"] = folder / f"{kind}-{ext}" / f"a.jsonl.{ext}"
            cases[f"{kind}-{ext}"].write_bytes(payload)
    pq.write_table(pa.table({"text": [f"doc {i} " * 30 for i in range(3000)]}), folder / "full.parquet")
    (folder / "truncated-parquet").mkdir()
    cases["truncated-parquet"] = folder / "truncated-parquet" / "a.parquet"
    whole = (folder / "full.parquet").read_bytes()
    cases["truncated-parquet"].write_bytes(whole[:len(whole) * 2 // 3])
    return cases


def test_damaged_compressed_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    cases = _compressed_cases(tmp_path / "raw")
    for name, path in cases.items():
        out = tmp_path / f"out-{name}"
        err = _error_line(capsys, ["data", "prepare", "--out", str(out), "--source",
                                   f"{{kind: files, path: '{path.parent}'}}"])
        assert str(path) in err, (name, err)
        assert not (out / "manifest.json").exists()


def test_zst_frames_read_whole(tmp_path):
    import zstandard

    from loom.trainer.data.sources import file_documents

    docs = [f"row {i} " * 9 for i in range(500)]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    z = zstandard.ZstdCompressor()
    half = lines.index(b"\n", len(lines) // 2) + 1           # two frames, one after the other
    (tmp_path / "two.jsonl.zst").write_bytes(z.compress(lines[:half]) + z.compress(lines[half:]))
    assert list(file_documents(str(tmp_path / "two.jsonl.zst"))) == docs
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    assert list(file_documents(str(tmp_path / "empty.jsonl.zst"))) == []


_MANIFEST_EDITS = {
    "missing shard field": lambda m: m["shards"][0].pop("documents"),
    "unknown dtype": lambda m: m.update(dtype="float99"),
    "no tokenizer": lambda m: m.pop("tokenizer"),
    "count as text": lambda m: m["shards"][0].update(tokens="many"),
    "shards not a list": lambda m: m.update(shards="x"),
    "no shards": lambda m: m.pop("shards"),
    "wrong split": lambda m: m["shards"][0].update(split="test"),
    "short crc list": lambda m: m["shards"][0].update(block_crc32=[]),
}


@pytest.mark.parametrize("edit", sorted(_MANIFEST_EDITS))
def test_hand_edited_manifest_is_one_line_in_every_command(edit, tmp_path, capsys):
    _write_corpus(tmp_path / "raw", 2, 50)
    prep = tmp_path / "prep"
    assert main(["data", "prepare", "--out", str(prep), "--source",
                 f"{{kind: files, path: '{tmp_path / 'raw'}'}}"]) == 0
    manifest = json.loads((prep / "manifest.json").read_text())
    _MANIFEST_EDITS[edit](manifest)
    (prep / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["data", "stats", str(prep)], ["data", "verify", str(prep)], _train_args(tmp_path, prep)):
        err = _error_line(capsys, argv)
        assert str(prep / "manifest.json") in err and "loom data prepare" in err, (argv[:2], err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_index_is_named_by_stats(tmp_path, capsys):
    _write_corpus(tmp_path / "raw", 1, 50)
    prep = tmp_path / "prep"
    assert main(["data", "prepare", "--out", str(prep), "--source",
                 f"{{kind: files, path: '{tmp_path / 'raw'}'}}"]) == 0
    index = next((prep / "train").glob("*.index"))
    index.write_bytes(index.read_bytes()[:-5])
    assert str(index) in _error_line(capsys, ["data", "stats", str(prep)])


@pytest.mark.parametrize("content", ["{not json", "junk", ""])
def test_junk_tokenizer_file_is_one_line(content, tmp_path, capsys):
    _write_corpus(tmp_path / "raw", 1, 10)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(content)
    err = _error_line(capsys, ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "p"),
                               "--source", f"{{kind: files, path: '{tmp_path / 'raw'}'}}"])
    assert "tokenizer.json" in err and not (tmp_path / "p").exists()
