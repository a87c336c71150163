"""The prepared-data format and its checks (written by prepare.py, read by reader.py).

A prepared folder holds one tokenized source, carved into train and val:

    DIR/manifest.json              format version, tokenizer identity and hash, dtype,
                                   source spec, and per shard: split, documents, tokens, sha256
    DIR/train/UUUUU-KKKK.tokens    flat token array (uint16 when the vocabulary fits, else uint32),
                                   every document stored as [bos] + ids + [eos]
    DIR/train/UUUUU-KKKK.index     uint64 end offset of each document in .tokens (D values)
    DIR/val/...                    the same for the held-out documents
    DIR/units/UUUUU.json           one per finished work unit (its shards); the manifest is
                                   their union, written once every unit is done

The .tokens/.index pair is the layout of datatrove's tokenizer output
(.ds + .ds.index), so tools that read that layout can read these shards.
Files are written under temporary names and renamed, and every byte is a
function of (source, tokenizer, format), so an interrupted preparation
re-run with the same command ends byte-identical to an uninterrupted one.

Checks at open (`open_prepared`), each one ManifestError line naming the
file and what to do: missing or unreadable manifest, an older format
version, a tokenizer other than the recipe's, a vocabulary too large for the
stored dtype, a shard of the wrong size, and a shard whose sha256 does not
verify. Hashing is O(corpus), so a verified shard is recorded with its size
and mtime in DIR/.verified.json (written by the preparation, which hashes
while writing) and hashed again only when those change (a modified file
has a new mtime); `loom data verify DIR` hashes everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

FORMAT = "loom-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")
HASH_BLOCK = 1 << 22


class ManifestError(ValueError):
    """A prepared folder that cannot be used; the message is one line naming the file."""


def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id < vocab_size fits, else uint32; an explicit dtype that is too small fails."""
    fits16 = vocab_size <= 2**16
    if dtype == "auto":
        return np.dtype("<u2") if fits16 else np.dtype("<u4")
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    if dtype == "uint16" and not fits16:
        raise ValueError(f"a vocabulary of {vocab_size} ids does not fit uint16 (ids up to 65535); "
                         "use dtype uint32 or auto")
    return np.dtype("<u2") if dtype == "uint16" else np.dtype("<u4")


def tokenizer_identity(tokenizer) -> dict:
    """What a prepared folder records of its tokenizer: spec, fingerprint, sha256 of the file, ids."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        digest = hashlib.sha256(tokenizer.fingerprint.encode()).hexdigest()
    else:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"spec": "byte" if path is None else os.path.abspath(path), "fingerprint": tokenizer.fingerprint,
            "sha256": digest, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    """Write JSON (sorted keys, so equal content gives equal bytes) under a temporary name, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Shard:
    """One shard of a prepared folder: `tokens` and `index` are absolute paths."""

    split: str
    tokens: str
    index: str
    documents: int
    n_tokens: int
    sha256: str
    index_sha256: str


@dataclass
class Prepared:
    """An opened, checked prepared folder."""

    path: str
    manifest: dict
    dtype: np.dtype
    shards: list[Shard]

    def split_shards(self, part: str) -> list[Shard]:
        """Shards of "train", "val" or "all" (both, train first)."""
        return [s for s in self.shards if part == "all" or s.split == part]

    def totals(self, part: str) -> tuple[int, int]:
        """(documents, tokens) of a part."""
        shards = self.split_shards(part)
        return sum(s.documents for s in shards), sum(s.n_tokens for s in shards)


def _fail(msg: str) -> ManifestError:
    return ManifestError(msg)


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise _fail(f"prepared data folder not found: {path}; create it with `loom data prepare`")
    if not os.path.isfile(mpath):
        units = os.path.join(path, "units")
        hint = ("its preparation did not finish; run the same `loom data prepare` command again to complete it"
                if os.path.isdir(units) else "it is not a prepared folder; create it with `loom data prepare`")
        raise _fail(f"{mpath} is missing: {hint}")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(f"{mpath} cannot be read ({e}); prepare the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(f"{mpath} is not a Loom prepared-data manifest; create the folder with `loom data prepare`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise _fail(f"{mpath} has format version {version}, this Loom reads version {FORMAT_VERSION}: "
                    + ("prepare the corpus again with `loom data prepare` into a new folder" if older
                       else "upgrade Loom to read it"))
    return manifest


def check_tokenizer(manifest: dict, mpath: str, tokenizer) -> None:
    """Raise ManifestError when `tokenizer` is not the one the data was prepared with."""
    recorded = manifest["tokenizer"]
    dtype = np.dtype(manifest["dtype"])
    if tokenizer.vocab_size > np.iinfo(dtype).max + 1:
        raise _fail(f"{mpath}: tokens are stored as {dtype.name}, too small for the recipe's vocabulary of "
                    f"{tokenizer.vocab_size}; prepare again with this tokenizer (it picks uint32)")
    if recorded["fingerprint"] != tokenizer.fingerprint:
        raise _fail(f"{mpath} was prepared with tokenizer {recorded['spec']} ({recorded['fingerprint']}), the recipe "
                    f"uses {tokenizer.fingerprint}; set data.tokenizer to the one it was prepared with, or prepare "
                    "again with this tokenizer into another folder")


class VerifiedRecord:
    """sha256 checks already done: {relative file: [size, mtime_ns, sha256]}, kept next to the data."""

    def __init__(self, path: str):
        self.file = os.path.join(path, ".verified.json")
        try:
            with open(self.file) as f:
                self.done = json.load(f)
        except (OSError, json.JSONDecodeError):
            self.done = {}
        self.changed = False

    def ok(self, rel: str, st: os.stat_result, sha: str) -> bool:
        return self.done.get(rel) == [st.st_size, st.st_mtime_ns, sha]

    def add(self, rel: str, st: os.stat_result, sha: str) -> None:
        self.done[rel] = [st.st_size, st.st_mtime_ns, sha]
        self.changed = True

    def save(self) -> None:
        if self.changed:
            try:
                write_json_atomic(self.file, self.done)
            except OSError:  # a read-only folder: verify again next time
                pass


def verify_shards(prep: "Prepared", full: bool = False) -> None:
    """Check sizes always and sha256 of files not verified before (all with full=True)."""
    record = VerifiedRecord(prep.path)
    itemsize = prep.dtype.itemsize
    for s in prep.shards:
        for file, nbytes, sha in ((s.tokens, s.n_tokens * itemsize, s.sha256),
                                  (s.index, s.documents * INDEX_DTYPE.itemsize, s.index_sha256)):
            if not os.path.isfile(file):
                raise _fail(f"prepared shard {file} is missing; run `loom data prepare` with the same arguments "
                            "to rebuild it")
            st = os.stat(file)
            if st.st_size != nbytes:
                raise _fail(f"prepared shard {file} has {st.st_size} bytes, the manifest says {nbytes}; delete it "
                            "and run `loom data prepare` with the same arguments to rebuild it")
            rel = os.path.relpath(file, prep.path)
            if not full and record.ok(rel, st, sha):
                continue
            if file_sha256(file) != sha:
                raise _fail(f"prepared shard {file} fails its sha256 check (damaged or modified); delete it and run "
                            "`loom data prepare` with the same arguments to rebuild it")
            record.add(rel, st, sha)
    record.save()


def open_prepared(path: str, tokenizer=None, verify: bool = True) -> Prepared:
    """Open and check a prepared folder (see the module docstring). Raises ManifestError."""
    path = os.path.abspath(os.path.expanduser(path))
    manifest = read_manifest(path)
    mpath = os.path.join(path, "manifest.json")
    if tokenizer is not None:
        check_tokenizer(manifest, mpath, tokenizer)
    shards = [Shard(e["split"], os.path.join(path, e["tokens_file"]), os.path.join(path, e["index_file"]),
                    int(e["documents"]), int(e["tokens"]), e["sha256"], e["index_sha256"])
              for e in manifest["shards"]]
    prep = Prepared(path, manifest, np.dtype(manifest["dtype"]), shards)
    if verify:
        verify_shards(prep)
    return prep


def shard_lengths(shard: Shard) -> np.ndarray:
    """Document lengths (D,) int64 of a shard, from its memory-mapped index."""
    if shard.documents == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.memmap(shard.index, dtype=INDEX_DTYPE, mode="r")
    lengths = np.diff(ends.astype(np.int64), prepend=np.int64(0))
    del ends
    return lengths
