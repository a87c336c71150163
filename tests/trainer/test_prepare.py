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
    return ["train", str(REPO / "tests" / "tiny.yaml"), f"output_dir={tmp_path / 'run'}",
            f"data.sources=[{{kind: prepared, path: '{prepared}'}}]", *extra]


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

    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF                                                          # same size, one byte changed
    shard.write_bytes(bytes(data))
    err = _error_line(capsys, _train_args(tmp_path, prep_dir))
    assert str(shard) in err and "sha256" in err and "loom data prepare" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
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
    assert main(["data", "prepare", str(REPO / "tests" / "tiny.yaml"), *over]) == 0
    out = capsys.readouterr().out
    assert "ready:" in out and len(list((cache / "prepared").glob("files-*/manifest.json"))) == 1
    before = _tree_bytes(cache)
    assert main(["train", str(REPO / "tests" / "tiny.yaml"), f"output_dir={tmp_path / 'run'}", "train.steps=2",
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
        return [sys.executable, "-m", "loom.trainer", "train", str(REPO / "tests" / "tiny.yaml"), f"output_dir={out}",
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
