"""Data path (trainer/data): tokenizers, sources, the memory-mapped window stream, mixture,
batching, synthetic tasks.

Fast CPU tier (a few seconds in all). No network: HF tokenizers are trained in
tmp_path, data files are written there, and the hub source is only checked for
its error message with `datasets.load_dataset` patched to fail. The window
stream is checked against the documents it was prepared from (every epoch is
a permutation of them). Preparation itself is tested in test_prepare.py.
"""
import json

import numpy as np
import pytest
import torch

from loom.trainer.data import (Batcher, DataConfig, SourceConfig, answer_span_correct, build_dataset,
                          cu_seqlens_from_position_ids, eval_windows, load_tokenizer, passkey_examples,
                          seq_ids_from_position_ids)
from loom.trainer.data.dataset import MIX_BLOCK
from loom.trainer.data import reader
from loom.trainer.data.packing import IGNORE_INDEX, pack_window
from loom.trainer.data.prepare import encode_batch, prepare_source
from loom.trainer.data.prepared import open_prepared
from loom.trainer.data.reader import PreparedStream
from loom.trainer.data.sources import SourceError, files_documents, hub_documents, in_val, stdlib_files
from loom.trainer.data.synthetic import MQARTask, PasskeyTask

BYTE = load_tokenizer("byte")
DOCS = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(40)]


def _stdlib_cfg(seq_len=64, **kw):
    return DataConfig(seq_len=seq_len, sources=[SourceConfig(kind="stdlib", max_bytes=300_000)], **kw)


def _equal_batches(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    text = "héllo wörld — 日本語 🙂\n\tend"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
    assert BYTE.decode(torch.tensor(ids)) == text
    assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (259, 256, 257, 258)


def _train_bpe(folder, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 5, trainer)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_hf_tokenizer_from_local_file(tmp_path):
    folder = _train_bpe(tmp_path / "bpe", ["<s>", "</s>", "<pad>"])
    tok = load_tokenizer(str(folder))                                   # a folder holding tokenizer.json
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "document 3: word word unseen ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert len(ids) < len(text.encode())                                # merges happened
    assert load_tokenizer(str(folder / "tokenizer.json")).encode(text) == ids


def test_hf_tokenizer_without_eos_gets_one(tmp_path):
    folder = _train_bpe(tmp_path / "bpe", [])
    tok = load_tokenizer(str(folder / "tokenizer.json"))
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == tok.vocab_size - 1
    tokens, lengths = encode_batch(tok, ["ab", "cd"])
    assert tokens[lengths[0] - 1] == tok.eos_id and tokens[-1] == tok.eos_id


def test_missing_tokenizer_path_is_one_line(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(missing)
    assert missing in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sources

def test_files_source_all_formats(tmp_path):
    import gzip

    rows = [{"text": d, "other": i} for i, d in enumerate(DOCS[:5])]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\nthird\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    with gzip.open(sub / "f.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[:2]))

    assert files_documents([str(tmp_path / "a.jsonl")]) == DOCS[:5]
    assert files_documents([str(tmp_path / "b.json")]) == DOCS[:5]
    assert files_documents([str(tmp_path / "c.parquet")], text_field="body") == DOCS[:5]
    assert files_documents([str(tmp_path / "d.txt")]) == ["first line", "second line", "third"]
    assert files_documents([str(tmp_path / "d.txt")], sample_by="paragraph") == ["first line",
                                                                                 "second line\nthird"]
    whole = files_documents([str(tmp_path / "d.txt")], sample_by="document")
    assert len(whole) == 1 and "second line" in whole[0]
    assert files_documents([str(sub)]) == DOCS[:2]                                  # a directory, gzip
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "extra"}) + "\n")
    assert files_documents([str(tmp_path / "*.jsonl")]) == DOCS[:5] + ["extra"]
    with pytest.raises(ValueError, match="no field 'text'.*body"):
        files_documents([str(tmp_path / "c.parquet")])


def test_missing_data_file_is_one_line(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    for paths in ([missing], [str(tmp_path / "*.parquet")]):
        with pytest.raises(FileNotFoundError) as e:
            files_documents(paths)
        assert paths[0] in str(e.value) and "\n" not in str(e.value)
    cfg = DataConfig(seq_len=16, sources=[SourceConfig(kind="files", path=missing)])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_dataset(cfg, BYTE, "train", seed=0)


def test_hub_source_fails_clearly_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some/dataset' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError) as e:
        list(hub_documents("some/dataset"))
    assert "some/dataset" in str(e.value) and "\n" not in str(e.value)


def test_stdlib_files_cap_and_order():
    files = stdlib_files(max_bytes=300_000)
    assert files == stdlib_files(max_bytes=300_000) and len(set(files)) == len(files)
    assert not any(part in ("test", "tests") for f in files for part in f.split("/")[:-1])
    assert len(stdlib_files(max_bytes=600_000)) > len(files) and stdlib_files(max_bytes=600_000)[:len(files)] == files


def test_val_carve_is_a_stable_fraction_by_text():
    docs = [f"doc {i}" for i in range(2000)]
    val = [d for d in docs if in_val(d, 0.1)]
    assert 140 < len(val) < 260 and val == [d for d in docs if in_val(d, 0.1)]
    assert all(in_val(d, 0.2) for d in val)                                  # nested in the fraction


# ----------------------------------------------------------------------------- packing

def _prepared_docs(tmp_path, docs=DOCS):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = SourceConfig(kind="files", path=str(tmp_path / "docs.jsonl"))
    return open_prepared(str(prepare_source(src, BYTE, str(tmp_path / "prep")).path), BYTE)


def _docs_of(prep):
    """Every document of a prepared folder as a tuple of ids ([bos] + bytes + [eos])."""
    out = []
    for sh in prep.split_shards("all"):
        toks = np.fromfile(sh.tokens, dtype=prep.dtype).astype(np.int64)
        ends = np.fromfile(sh.index, dtype="<u8").astype(np.int64)
        out += [tuple(toks[lo:hi]) for lo, hi in zip(np.concatenate([[0], ends[:-1]]), ends)]
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(reader, "BLOCK_DOCS", 8)                             # several blocks per shard


def _epoch_stream(s, n_windows, T):
    items = [pack_window(*s.window(k)) for k in range(n_windows)]
    return items, torch.cat([it["input_ids"] for it in items]).numpy()


def test_windows_concatenate_to_a_permutation_of_the_documents(tmp_path, small_blocks):
    T = 10
    prep = _prepared_docs(tmp_path)
    docs = _docs_of(prep)
    assert sorted(docs) == sorted(tuple([256, *d.encode(), 257]) for d in DOCS)
    s = PreparedStream(prep.split_shards("all"), prep.dtype, T, (0, 0, 0, 0))
    assert s.epoch_tokens == sum(map(len, docs))
    assert len(s.block_tokens) == sum(-(-sh.documents // 8) for sh in prep.split_shards("all"))
    n = 2 * s.epoch_tokens // T
    items, stream = _epoch_stream(s, n, T)
    flat_pos = torch.cat([it["position_ids"] for it in items]).numpy()
    flat_lab = torch.cat([it["labels"] for it in items]).numpy()
    is_start = np.zeros(n * T + 1, dtype=bool)
    is_start[:n * T][stream == BYTE.bos_id] = True                                 # bos opens every document
    is_start[n * T] = s.window(n)[1][0]
    epoch0 = stream[:s.epoch_tokens]                                         # every document once
    cuts = list(np.nonzero(epoch0 == BYTE.bos_id)[0]) + [s.epoch_tokens]
    assert sorted(tuple(epoch0[a:b]) for a, b in zip(cuts[:-1], cuts[1:])) == sorted(docs)
    assert not np.array_equal(epoch0[:100], stream[s.epoch_tokens:s.epoch_tokens + 100])   # a new order
    t = np.arange(n * T)
    assert np.all((flat_pos == 0) == (is_start[t] | (t % T == 0)))          # resets at docs and windows
    assert np.all((flat_lab == IGNORE_INDEX) == is_start[t + 1])             # -100 only across boundaries
    nxt = np.append(stream[1:], s.window(n)[0][0])                           # the target of every input
    keep = flat_lab != IGNORE_INDEX
    assert np.array_equal(flat_lab[keep], nxt[keep])


def test_windows_are_pure_in_the_index(tmp_path, small_blocks):
    prep = _prepared_docs(tmp_path)
    a = PreparedStream(prep.split_shards("all"), prep.dtype, 16, (3, 0, 0, 0))
    seq = [a.window(k) for k in range(60)]
    b = PreparedStream(prep.split_shards("all"), prep.dtype, 16, (3, 0, 0, 0))
    for k in (59, 7, 33, 0):                                                  # any access order
        assert all(np.array_equal(x, y) for x, y in zip(b.window(k), seq[k]))
    c = PreparedStream(prep.split_shards("all"), prep.dtype, 16, (4, 0, 0, 0))
    assert not all(np.array_equal(c.window(k)[0], seq[k][0]) for k in range(10))


def test_length_filters_and_upsampling(tmp_path, small_blocks):
    docs = [("x" * (20 if i % 4 else 300)) + str(i) for i in range(64)]
    prep = _prepared_docs(tmp_path, docs)
    lengths = np.array([len(d) for d in _docs_of(prep)])
    shards, dt = prep.split_shards("all"), prep.dtype
    long_only = PreparedStream(shards, dt, 32, (0,), min_tokens=100)
    assert long_only.epoch_tokens == lengths[lengths >= 100].sum()
    short_only = PreparedStream(shards, dt, 32, (0,), max_tokens=100)
    assert short_only.epoch_tokens == lengths[lengths <= 100].sum()
    up = PreparedStream(shards, dt, 32, (0,), length_upsample=[[100, 3.0]])
    assert up.epoch_tokens == lengths[lengths < 100].sum() + 3 * lengths[lengths >= 100].sum()
    frac = PreparedStream(shards, dt, 32, (0,), length_upsample=[[100, 2.5]])
    n_long = (lengths >= 100).sum()
    copies = (frac.epoch_tokens - lengths[lengths < 100].sum()) / lengths[lengths >= 100].mean()
    assert 2 * n_long <= copies <= 3 * n_long and copies not in (2 * n_long, 3 * n_long)
    _, stream = _epoch_stream(up, up.epoch_tokens // 32, 32)
    assert (stream == BYTE.bos_id).sum() >= (lengths < 100).sum() + 3 * n_long - 2
    with pytest.raises(ValueError, match="no documents within min_tokens=1000"):
        PreparedStream(shards, dt, 32, (0,), min_tokens=1000)


def test_seq_ids_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 3]])
    assert seq_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0] * 6, [-1, -1, 0, 0, 0, 0]]
    cu = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12, 14, 18]
    item = pack_window(np.arange(7), np.array([1, 0, 0, 1, 0, 1, 0], dtype=bool))
    assert item["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    assert item["labels"].tolist() == [1, 2, -100, 4, -100, 6]


# ----------------------------------------------------------------------------- dataset and batching

def test_dataset_is_deterministic_in_seed():
    cfg = _stdlib_cfg()
    a, b, c = (build_dataset(cfg, BYTE, "train", seed) for seed in (0, 0, 1))
    idx = [0, 1, 57, 10_000]
    assert all(_equal_batches(a[i], b[i]) for i in idx)
    assert not all(torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in idx)
    assert _equal_batches(a[57], build_dataset(cfg, BYTE, "train", 0)[57])      # independent of access order
    v = build_dataset(cfg, BYTE, "val", 0)
    assert not torch.equal(a[0]["input_ids"], v[0]["input_ids"])


def test_batcher_resume_is_exact():
    ds = build_dataset(_stdlib_cfg(), BYTE, "train", seed=3)
    run = Batcher(ds, batch_size=3)
    for _ in range(4):
        run.next()
    state = run.state_dict()
    assert state == {"position": 12}
    expected = [run.next() for _ in range(3)]
    resumed = Batcher(build_dataset(_stdlib_cfg(), BYTE, "train", seed=3), batch_size=3)
    resumed.load_state_dict(state)
    assert all(_equal_batches(e, r) for e, r in zip(expected, [resumed.next() for _ in range(3)]))
    assert _equal_batches(expected[0], Batcher(ds, 3, start=12).next())


def test_dp_ranks_read_disjoint_windows():
    ds = build_dataset(_stdlib_cfg(), BYTE, "train", seed=0)
    ranks = [Batcher(ds, batch_size=2, dp_rank=r, dp_size=3) for r in range(3)]
    seen = []
    for _ in range(4):
        seen += [i for b in ranks for i in b.window_indices()]
        batches = [b.next() for b in ranks]
    assert sorted(seen) == list(range(24))
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    single = Batcher(ds, batch_size=6)
    single.load_state_dict({"position": 18})
    merged = single.next()["input_ids"]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), merged)


def test_batch_fields():
    batch = Batcher(build_dataset(_stdlib_cfg(seq_len=32), BYTE, "train", 0), batch_size=4).next()
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (4, 32), "labels": (4, 32), "position_ids": (4, 32), "seq_ids": (4, 32),
        "answer_mask": (4, 32), "source": (4,)}
    assert batch["answer_mask"].dtype == torch.bool and not batch["answer_mask"].any()
    assert torch.equal(batch["seq_ids"], seq_ids_from_position_ids(batch["position_ids"]))


def test_mixture_follows_weights_and_sources_are_separate(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(seq_len=96, cache_dir=str(tmp_path / "cache"), sources=[
        SourceConfig(kind="files", path=str(tmp_path / "a.jsonl"), weight=3.0),
        SourceConfig(kind="passkey", weight=1.0),
        SourceConfig(kind="mqar", weight=1.0, n_pairs=4, n_queries=2)])
    ds = build_dataset(cfg, BYTE, "train", seed=0)
    sched = ds.schedule
    assert sched.quota.tolist() == [614, 205, 205] and sched.quota.sum() == MIX_BLOCK
    located = [sched.locate(i) for i in range(2 * MIX_BLOCK)]
    for s in range(3):
        assert sorted(k for src, k in located if src == s) == list(range(2 * sched.quota[s]))
    items = [ds[i] for i in range(40)]
    for it in items:
        assert it["answer_mask"].any() == (it["source"].item() != 0)
    assert list((tmp_path / "cache" / "prepared").glob("files-*/manifest.json"))
    again = build_dataset(cfg, BYTE, "train", seed=0)                         # from the prepared cache
    assert all(_equal_batches(a, again[i]) for i, a in enumerate(items))
    val = eval_windows(cfg, BYTE, seed=0, n=5, batch_size=2)
    assert [b["input_ids"].shape[0] for b in val] == [2, 2, 1]


def test_config_errors_name_the_key():
    from loom.models.config import ConfigError, build

    cfg = build(DataConfig, {"seq_len": 128, "sources": [{"kind": "passkey", "depth": 0.5},
                                                         {"kind": "files", "paths": ["a.jsonl"]}]}, "data")
    assert cfg.sources[1].paths == ["a.jsonl"] and cfg.val_sources is None
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.kind"):
        build(DataConfig, {"sources": [{"kind": "wiki"}]}, "data")
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.path"):
        build_dataset(DataConfig(sources=[SourceConfig(), SourceConfig(kind="files")]), BYTE, "train", 0)
    with pytest.raises(ValueError, match=r"data\.val_sources\[0\]\.depth"):
        build_dataset(DataConfig(val_sources=[SourceConfig(kind="passkey", depth=1.5)]), BYTE, "val", 0)


# ----------------------------------------------------------------------------- synthetic tasks

@pytest.mark.parametrize("seq_len", [100, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_answer_and_depth(seq_len, depth):
    task = PasskeyTask(BYTE, seq_len, (0, 2, 2, 0), depth=depth, key_digits=5)
    ex = task.example(7)
    assert len(ex["tokens"]) == seq_len + 1
    text = BYTE.decode(ex["tokens"])
    needle = f"The pass key is {ex['key']}. Remember it. "
    assert text.count(needle) == 1 and text.endswith(f"The pass key is {ex['key']}")
    n_fill = seq_len + 1 - 2 - len(needle) - len("What is the pass key? The pass key is ") - 5
    start = ex["needle_start"] - 1
    assert abs(start - depth * n_fill) <= 22                                 # nearest sentence boundary
    assert BYTE.decode(ex["tokens"][ex["needle_start"]:ex["needle_start"] + len(needle)]) == needle
    batch = passkey_examples(BYTE, seq_len, depth, n=3, seed=0)[0]
    labels, mask = batch["labels"], batch["answer_mask"]
    assert mask.sum(1).tolist() == [5, 5, 5]
    for row in range(3):
        key = BYTE.decode(labels[row][mask[row]])
        assert key.isdigit() and f"The pass key is {key}. Remember it." in BYTE.decode(batch["input_ids"][row])


def test_passkey_examples_are_pure_and_seeded():
    a = PasskeyTask(BYTE, 200, (0, 2, 2, 0)).example(5)
    b = PasskeyTask(BYTE, 200, (0, 2, 2, 0)).example(5)
    c = PasskeyTask(BYTE, 200, (1, 2, 2, 0)).example(5)
    assert np.array_equal(a["tokens"], b["tokens"]) and a["key"] != c["key"]
    with pytest.raises(ValueError, match="seq_len"):
        PasskeyTask(BYTE, 40, (0,)).window(0)


def test_passkey_with_bpe_tokenizer(tmp_path):
    tok = load_tokenizer(str(_train_bpe(tmp_path / "bpe", ["<s>", "</s>", "<pad>"])))
    batch = passkey_examples(tok, 300, 0.25, n=2, seed=1, key_digits=7)[0]
    assert batch["input_ids"].shape == (2, 300)
    for row in range(2):
        key = tok.decode(batch["labels"][row][batch["answer_mask"][row]])
        assert len(key) == 7 and key in tok.decode(batch["input_ids"][row][:200])


def test_mqar_answers_match_pairs():
    task = MQARTask(BYTE, 300, (0, 0, 2, 1), n_pairs=8, n_queries=3)
    ex = task.example(4)
    item = pack_window(ex["tokens"], ex["doc_start"], ex["answer"])
    assert len(ex["tokens"]) == 301 and len(set(k for k, _ in ex["pairs"])) == 8
    text = BYTE.decode(ex["tokens"])
    assert text.startswith(" ".join(f"{k}:{v}" for k, v in ex["pairs"]))
    values = dict(ex["pairs"])
    pred = item["labels"].clone()[None]
    ok = answer_span_correct(pred, item["labels"][None], item["answer_mask"][None])
    assert ok.tolist() == [True] * 3
    spans = BYTE.decode(item["labels"][item["answer_mask"]])
    assert spans == "".join(values[q] for q in ex["queries"])
    first = int(torch.nonzero(item["answer_mask"])[0])
    pred[0, first] += 1                                                      # break the first answer
    assert answer_span_correct(pred, item["labels"][None], item["answer_mask"][None]).tolist() == [
        False, True, True]
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(BYTE, 50, (0,), n_pairs=16).window(0)
