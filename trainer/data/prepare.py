"""`loom data prepare`: tokenize a real-text source into prepared shards (format: prepared.py).

    prepare_source(src, tokenizer, out_dir, worker=0, workers=1, procs=1)

Work is cut into the source's units (sources.py: a file, a hub stream shard,
a group of stdlib files). Worker i of N takes units u with u % N == i, so N
machines (`--worker i --workers N`) write disjoint shards into one shared
folder; `procs` processes share a worker's units. Each unit streams its
documents in batches, carves each document to train or val by the hash of
its text, tokenizes the batch (the `tokenizers` Rust encoder for HF files,
a numpy view of the UTF-8 bytes for the byte tokenizer) and appends
[bos] + ids + [eos] to the open shard of its split, rolling to a new shard
after `shard_tokens` tokens. Memory per process is one batch plus one
shard's document index.

Crash safety: shard files are written as NAME.tmp-PID and renamed when
complete, and a unit counts as done only once its marker units/UUUUU.json is
renamed into place after its shards. A re-run skips done units (whose files
are present with the right sizes), deletes stale temporaries and redoes the
rest; every byte depends only on (source, tokenizer, format), so the result
equals an uninterrupted run's byte for byte. The manifest is written by the
worker that finds every unit done.

Why Loom writes shards itself rather than through datatrove's DocumentTokenizer
(benchmarks/README.md has the numbers): that writer opens its files in place
(a killed task leaves partial shards), shuffles with its own generator, and
has no train/val carve, no sha256 manifest and no byte tokenizer. Both tools
spend their time in the same `tokenizers` encoder. To let datatrove (and its
SLURM executor) do the tokenizing, prepare its output folder as a
`kind: datatrove` source: its documents are copied into this format with the
carve, hashes and manifest added (the shard layout is the same: .tokens =
.ds, .index = .ds.index).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np

from loom.trainer.data.chat import ChatTemplate, chat_rows, check_messages, encode_conversation, load_chat_template
from loom.trainer.data.config import SourceConfig
from loom.trainer.data.prepared import (FORMAT, FORMAT_VERSION, INDEX_DTYPE, SPLITS, ManifestError, Prepared,
                                        block_crc32, open_prepared, token_dtype, tokenizer_identity,
                                        write_json_atomic)
from loom.trainer.data.sources import (Unit, datatrove_documents, datatrove_token_size, in_val, source_identity,
                                      source_units, unit_documents)
from loom.trainer.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SHARD_TOKENS = 1 << 28   # tokens per shard before rolling over (512 MiB as uint16)
BATCH_DOCS = 512         # documents tokenized together
REAL_KINDS = ("files", "hub", "stdlib", "datatrove", "chat")


def default_cache_dir() -> str:
    """Where raw sources are prepared when data.cache_dir is null: $LOOM_DATA_CACHE or ~/.cache/loom/data."""
    return os.environ.get("LOOM_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loom", "data")


def prepare_identity(src, tokenizer, dtype: np.dtype, shard_tokens: int) -> dict:
    """Everything the bytes of a prepared folder depend on (a chat source: also its template)."""
    ident = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity(tokenizer),
             "dtype": dtype.name, "source": source_identity(src), "shard_tokens": shard_tokens}
    if src.kind == "chat":
        template, specials = load_chat_template(tokenizer)
        ident["chat_template_sha256"] = hashlib.sha256(json.dumps([template, specials], sort_keys=True)
                                                       .encode()).hexdigest()
    return ident


def cache_path(src, tokenizer, cache_dir: Optional[str]) -> str:
    """The folder a raw source is prepared into under cache_dir (keyed by its identity)."""
    ident = prepare_identity(src, tokenizer, token_dtype(tokenizer.vocab_size), SHARD_TOKENS)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(), "prepared", f"{src.kind}-{key}")


# ----------------------------------------------------------------------------- encoding

def encode_batch(tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of documents, each as [bos] + ids + [eos]: flat (N,) int64 and lengths (D,) int64."""
    if getattr(tokenizer, "path", None) is None:    # byte tokenizer: ids are the UTF-8 bytes
        ids = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs]
    else:
        ids = [np.asarray(e, dtype=np.int64) for e in tokenizer.encode_batch(docs)]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids)) + len(bos) + 1
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for a, s, e in zip(ids, starts, ends):
        if bos:
            flat[s] = bos[0]
        flat[s + len(bos):e - 1] = a
    flat[ends - 1] = tokenizer.eos_id
    return flat, lengths


# ----------------------------------------------------------------------------- writing

class _ShardWriter:
    """Appends documents of one split of one unit to shards UUUUU-KKKK.{tokens,index}
    (and UUUUU-KKKK.mask, one uint8 per token, when `masked`: chat sources)."""

    def __init__(self, out_dir: str, split: str, unit: int, dtype: np.dtype, shard_tokens: int,
                 masked: bool = False):
        self.dir = os.path.join(out_dir, split)
        self.split, self.unit, self.dtype, self.shard_tokens = split, unit, dtype, shard_tokens
        self.masked = masked
        self.done: list[dict] = []
        self._k = 0
        self._f = None

    def _open(self) -> None:
        self.name = f"{self.unit:05d}-{self._k:04d}"
        self.tmp = os.path.join(self.dir, f"{self.name}.tokens.tmp-{os.getpid()}")
        self._f = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        if self.masked:
            self.mask_tmp = os.path.join(self.dir, f"{self.name}.mask.tmp-{os.getpid()}")
            self._mf = open(self.mask_tmp, "wb")
            self._mhash = hashlib.sha256()
        self._ends: list[np.ndarray] = []
        self._n = 0

    def write(self, flat: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Documents of a batch, flat ids, their lengths and (masked writers) the flat uint8
        loss mask; a document never spans two shards."""
        ends = np.cumsum(lengths)
        starts = ends - lengths
        lo = 0
        for cut in self._cuts(lengths):
            if cut > lo:
                if self._f is None:
                    self._open()
                data = flat[starts[lo]:ends[cut - 1]].astype(self.dtype).tobytes()
                self._f.write(data)
                self._hash.update(data)
                if self.masked:
                    mdata = mask[starts[lo]:ends[cut - 1]].astype(np.uint8).tobytes()
                    self._mf.write(mdata)
                    self._mhash.update(mdata)
                self._ends.append(self._n + np.cumsum(lengths[lo:cut]))
                self._n += int(ends[cut - 1] - starts[lo])
            if cut < len(lengths):
                self._close()
            lo = cut
        if self._n >= self.shard_tokens:
            self._close()

    def _cuts(self, lengths: np.ndarray) -> list[int]:
        """Batch positions after which the shard is full (the last one is len(lengths))."""
        cuts, room, n = [], self.shard_tokens - (self._n if self._f is not None else 0), 0
        for i, L in enumerate(lengths):
            if n >= room and i > 0:
                cuts.append(i)
                room, n = self.shard_tokens, 0
            n += int(L)
        cuts.append(len(lengths))
        return cuts

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        ends = (np.concatenate(self._ends) if self._ends else np.zeros(0, np.int64)).astype(INDEX_DTYPE)
        idx_tmp = os.path.join(self.dir, f"{self.name}.index.tmp-{os.getpid()}")
        with open(idx_tmp, "wb") as f:
            f.write(ends.tobytes())
            f.flush()
            os.fsync(f.fileno())
        crcs = block_crc32(self.tmp, self.dtype, ends)
        entry = {"split": self.split, "tokens_file": f"{self.split}/{self.name}.tokens",
                 "index_file": f"{self.split}/{self.name}.index", "documents": len(ends),
                 "tokens": self._n, "sha256": self._hash.hexdigest(),
                 "index_sha256": hashlib.sha256(ends.tobytes()).hexdigest(),
                 "block_crc32": crcs, "index_crc32": zlib.crc32(ends.tobytes())}
        if self.masked:
            self._mf.flush()
            os.fsync(self._mf.fileno())
            self._mf.close()
            entry.update(mask_file=f"{self.split}/{self.name}.mask", mask_sha256=self._mhash.hexdigest(),
                         mask_block_crc32=block_crc32(self.mask_tmp, np.dtype(np.uint8), ends))
            os.replace(self.mask_tmp, os.path.join(self.dir, f"{self.name}.mask"))
        os.replace(self.tmp, os.path.join(self.dir, f"{self.name}.tokens"))
        os.replace(idx_tmp, os.path.join(self.dir, f"{self.name}.index"))
        self.done.append(entry)
        self._k += 1

    def finish(self) -> list[dict]:
        self._close()
        return self.done


def _process_unit(src, tokenizer, unit: Unit, out_dir: str, dtype: np.dtype, shard_tokens: int) -> dict:
    """Tokenize one unit into its shards and write its marker; returns the marker."""
    writers = {s: _ShardWriter(out_dir, s, unit.index, dtype, shard_tokens, src.kind == "chat") for s in SPLITS}
    batch: list[str] = []

    def flush() -> None:
        for split in SPLITS:
            docs = [d for d in batch if in_val(d, src.val_fraction) == (split == "val")]
            if docs:
                writers[split].write(*encode_batch(tokenizer, docs))
        batch.clear()

    if src.kind == "chat":                      # one document per conversation, with its loss mask
        template = ChatTemplate(*load_chat_template(tokenizer))
        for where, row in chat_rows(unit.files[0]):
            text, ids, mask = encode_conversation(tokenizer, template, check_messages(row, where), src.loss_on, where)
            if len(ids):
                split = "val" if in_val(text, src.val_fraction) else "train"
                writers[split].write(ids, np.array([len(ids)], dtype=np.int64), mask)
    elif src.kind == "datatrove":                 # already tokenized: carve by the hash of the token bytes
        size = datatrove_token_size(unit.files[0], 4 if tokenizer.vocab_size > 2**16 else 2)
        for ids in datatrove_documents(unit.files[0], size):
            if int(ids.max()) >= tokenizer.vocab_size:
                raise ValueError(f"{unit.files[0]} holds token id {int(ids.max())}, outside the vocabulary of "
                                 f"{tokenizer.fingerprint} ({tokenizer.vocab_size}); give the tokenizer datatrove used")
            split = "val" if in_val(ids.astype("<u4").tobytes(), src.val_fraction) else "train"
            writers[split].write(ids.astype(np.int64), np.array([len(ids)], dtype=np.int64))
    else:
        for doc in unit_documents(src, unit):
            batch.append(doc)
            if len(batch) >= BATCH_DOCS:
                flush()
        flush()
    marker = {"unit": unit.index, "shards": writers["train"].finish() + writers["val"].finish()}
    write_json_atomic(os.path.join(out_dir, "units", f"{unit.index:05d}.json"), marker)
    return marker


def _pool_unit(args) -> dict:
    src_dict, tok_spec, unit, out_dir, dtype_name, shard_tokens = args
    return _process_unit(SourceConfig(**src_dict), load_tokenizer(tok_spec), unit, out_dir,
                         np.dtype(dtype_name), shard_tokens)


def _unit_done(out_dir: str, u: int, itemsize: int) -> Optional[dict]:
    """The marker of unit u if it and all its shard files are complete, else None."""
    path = os.path.join(out_dir, "units", f"{u:05d}.json")
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    for s in marker["shards"]:
        files = [(s["tokens_file"], s["tokens"] * itemsize), (s["index_file"], s["documents"] * 8)]
        if "mask_file" in s:
            files.append((s["mask_file"], s["tokens"]))
        for rel, n in files:
            p = os.path.join(out_dir, rel)
            if not os.path.isfile(p) or os.path.getsize(p) != n:
                return None
    return marker


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_target(out_dir: str, ident: dict) -> None:
    """Refuse to write into a folder that holds (or is preparing) something else."""
    spec = os.path.join(out_dir, "prepare.json")
    if os.path.isfile(spec):
        with open(spec) as f:
            other = json.load(f)
        if other != ident:
            what = [k for k in ident if other.get(k) != ident[k]]
            raise ManifestError(f"{out_dir} holds data prepared with another {' and '.join(what)}; "
                                "choose another output folder (or delete that one)")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ManifestError(f"{out_dir} exists and is not a prepared-data folder; choose another output folder")


def prepare_source(src, tokenizer, out_dir: str, worker: int = 0, workers: int = 1, procs: int = 1,
                   dtype: str = "auto", shard_tokens: int = SHARD_TOKENS,
                   say: Callable[[str], None] = log.info) -> Optional[Prepared]:
    """Prepare a real-text SourceConfig into out_dir (see the module docstring).

    Returns the opened folder once every unit is done (None when units of
    other workers remain). Raises ManifestError / ValueError / FileNotFoundError
    (one line) on bad input, before writing anything when it can be known then.
    """
    if src.kind not in REAL_KINDS:
        raise ValueError(f"only {', '.join(REAL_KINDS)} sources are prepared; {src.kind!r} is not one")
    if not 0 <= worker < workers:
        raise ValueError(f"--worker must be in [0, --workers={workers}), got {worker}")
    np_dtype = token_dtype(tokenizer.vocab_size, dtype)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    ident = prepare_identity(src, tokenizer, np_dtype, shard_tokens)
    _check_target(out_dir, ident)
    units = source_units(src)
    if os.path.isfile(os.path.join(out_dir, "manifest.json")) and \
            all(_unit_done(out_dir, u.index, np_dtype.itemsize) for u in units):
        return open_prepared(out_dir, tokenizer)
    if not units:
        raise ValueError(f"{src.kind} source has no files or stream shards to prepare")
    for d in ("train", "val", "units"):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    if not os.path.isfile(os.path.join(out_dir, "prepare.json")):
        write_json_atomic(os.path.join(out_dir, "prepare.json"), ident)
    mine = [u for u in units if u.index % workers == worker]
    with _locked(os.path.join(out_dir, f".lock-{worker}-of-{workers}")):
        todo = [u for u in mine if _unit_done(out_dir, u.index, np_dtype.itemsize) is None]
        for u in mine:   # temporaries of killed runs
            for stale in glob.glob(os.path.join(out_dir, "*", f"{u.index:05d}*.tmp-*")):
                os.remove(stale)
        t0 = time.perf_counter()
        say(f"preparing {src.kind} source into {out_dir}: {len(todo)} of {len(mine)} units to do "
            f"(worker {worker} of {workers}, {procs} process{'es' if procs > 1 else ''})")
        if procs > 1 and len(todo) > 1:
            import multiprocessing as mp

            tok_spec = getattr(tokenizer, "path", None) or "byte"
            jobs = [(asdict(src), tok_spec, u, out_dir, np_dtype.name, shard_tokens) for u in todo]
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            with mp.get_context("spawn").Pool(min(procs, len(todo))) as pool:
                for _ in pool.imap_unordered(_pool_unit, jobs):
                    pass
        else:
            for u in todo:
                _process_unit(src, tokenizer, u, out_dir, np_dtype, shard_tokens)
        if todo:
            say(f"prepared {len(todo)} units in {time.perf_counter() - t0:.1f}s")
    markers = [_unit_done(out_dir, u.index, np_dtype.itemsize) for u in units]
    if any(m is None for m in markers):
        left = sum(m is None for m in markers)
        say(f"{left} of {len(units)} units remain for other workers; the last worker to finish writes the manifest")
        return None
    return _write_manifest(out_dir, ident, markers, tokenizer)


def _write_manifest(out_dir: str, ident: dict, markers: list[dict], tokenizer) -> Prepared:
    shards = sorted((s for m in markers for s in m["shards"]), key=lambda s: (SPLITS.index(s["split"]),
                                                                              s["tokens_file"]))
    totals = {split: {"documents": sum(s["documents"] for s in shards if s["split"] == split),
                      "tokens": sum(s["tokens"] for s in shards if s["split"] == split)} for split in SPLITS}
    if totals["train"]["documents"] + totals["val"]["documents"] == 0:
        raise ValueError(f"{ident['source']['kind']} source has no documents (all files empty or "
                         f"no text in field {ident['source']['text_field']!r}); nothing was prepared in {out_dir}")
    manifest = {**ident, "units": len(markers), "shards": shards, "totals": totals}
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return open_prepared(out_dir, tokenizer)


def ensure_prepared(src, tokenizer, cache_dir: Optional[str]) -> str:
    """The prepared folder of a raw source under cache_dir, preparing it on first use.

    Concurrent callers (the ranks of one run) serialise on a lock; the first
    prepares, the others find it done.
    """
    path = cache_path(src, tokenizer, cache_dir)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    os.makedirs(path, exist_ok=True)
    with _locked(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")):
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            prepare_source(src, tokenizer, path, say=lambda m: print(m, flush=True))
    return path
