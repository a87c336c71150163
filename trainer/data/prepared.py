"""The prepared-data format and its checks (written by prepare.py, read by reader.py).

A prepared folder holds one tokenized source, carved into train and val:

    DIR/manifest.json              format version, tokenizer identity and hash, dtype,
                                   source spec, and per shard: split, documents, tokens, sha256
    DIR/train/UUUUU-KKKK.tokens    flat token array (uint16 when the vocabulary fits, else uint32),
                                   every document stored as [bos] + ids + [eos]
    DIR/train/UUUUU-KKKK.index     uint64 end offset of each document in .tokens (D values)
    DIR/train/UUUUU-KKKK.mask      chat sources only: uint8 per token, 1 where the loss is taken
                                   (assistant tokens, trainer/data/chat.py); in the manifest with its
                                   sha256 and per-block crc32, checked like the tokens
    DIR/val/...                    the same for the held-out documents
    DIR/units/UUUUU.json           one per finished work unit (its shards); the manifest is
                                   their union, written once every unit is done

The .tokens/.index pair is the layout of datatrove's tokenizer output
(.ds + .ds.index), so tools that read that layout can read these shards.
Files are written under temporary names and renamed, and every byte is a
function of (source, tokenizer, format), so an interrupted preparation
re-run with the same command ends byte-identical to an uninterrupted one.

Checks, each one ManifestError line naming the file and what to do. At open
(`open_prepared`): missing or unreadable manifest, an older format version,
a tokenizer other than the recipe's, a vocabulary too large for the stored
dtype, a shard of the wrong size, an index whose crc32 does not verify (the
reader reads every index whole at start-up anyway). While reading: the
manifest holds a crc32 of every block of CRC_DOCS consecutive documents of a
shard's tokens (`block_crc32`), and the reader checks a block the first time
a window touches it (`check_block`), before any of its tokens reach a batch.
So damage that keeps a file's size and modification time (bit rot, a
restored backup) stops the run with one line before a step is taken on it,
at the cost of one crc32 pass (GB/s) over the tokens a run reads. A folder
prepared before block checksums existed has none: its shards are verified
by sha256 whole at every open. `loom data verify DIR` checks every sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = "loom-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")
HASH_BLOCK = 1 << 22
CRC_DOCS = 1024  # documents per checksummed block of a shard's tokens (the reader's block size)


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


def block_ranges(ends: np.ndarray, per: int = CRC_DOCS) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the blocks of `per` consecutive documents, from the index `ends` (D,)."""
    out = []
    for lo in range(0, len(ends), per):
        hi = min(lo + per, len(ends))
        out.append((int(ends[lo - 1]) if lo else 0, int(ends[hi - 1])))
    return out


def block_crc32(tokens_file: str, dtype: np.dtype, ends: np.ndarray, per: int = CRC_DOCS) -> list[int]:
    """crc32 of each block of `per` documents' token bytes (the manifest's `block_crc32`)."""
    if len(ends) == 0 or int(ends[-1]) == 0:
        return [0] * len(block_ranges(ends, per))
    toks = np.memmap(tokens_file, dtype=dtype, mode="r")
    crcs = [zlib.crc32(toks[a:b]) for a, b in block_ranges(ends, per)]
    del toks
    return crcs


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
    block_crc32: tuple[int, ...] | None = None   # per CRC_DOCS documents; None in folders older than them
    index_crc32: int | None = None
    mask: str | None = None                      # chat sources: the loss-mask file (uint8 per token)
    mask_sha256: str | None = None
    mask_block_crc32: tuple[int, ...] | None = None


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
    except UnicodeDecodeError:
        raise _fail(f"{mpath} is not text (damaged); prepare the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(f"{mpath} is not a Loom prepared-data manifest; create the folder with `loom data prepare`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise _fail(f"{mpath} has format version {version}, this Loom reads version {FORMAT_VERSION}: "
                    + ("prepare the corpus again with `loom data prepare` into a new folder" if older
                       else "upgrade Loom to read it"))
    return manifest


_SHARD_FIELDS = {"split": str, "tokens_file": str, "index_file": str, "documents": int, "tokens": int,
                 "sha256": str, "index_sha256": str}
_TOKENIZER_FIELDS = {"spec": str, "fingerprint": str, "vocab_size": int}


def check_manifest_fields(manifest: dict, mpath: str) -> None:
    """ManifestError naming the first missing or ill-typed field of a hand-edited or incomplete manifest."""
    def bad(what: str):
        return _fail(f"{mpath}: {what}; the manifest is incomplete or was edited by hand: prepare the folder "
                     "again with `loom data prepare`")

    def typed(obj: dict, fields: dict, where: str) -> None:
        for key, kind in fields.items():
            value = obj.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise bad(f"{where}{key} is {'missing' if key not in obj else repr(value)}, expected "
                          + ("an integer >= 0" if kind is int else "text"))

    if manifest.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"dtype is {manifest.get('dtype')!r}, expected 'uint16' or 'uint32'")
    if not isinstance(manifest.get("tokenizer"), dict):
        raise bad("tokenizer is missing or not a mapping")
    typed(manifest["tokenizer"], _TOKENIZER_FIELDS, "tokenizer.")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise bad("shards is missing or not a list of shard entries")
    for i, e in enumerate(shards):
        typed(e, _SHARD_FIELDS, f"shards[{i}].")
        if e["split"] not in SPLITS:
            raise bad(f"shards[{i}].split is {e['split']!r}, expected one of {', '.join(SPLITS)}")
        crcs = e.get("block_crc32")
        blocks = -(-e["documents"] // CRC_DOCS)
        if crcs is not None and (not isinstance(crcs, list) or len(crcs) != blocks
                                 or not all(isinstance(c, int) for c in crcs)):
            raise bad(f"shards[{i}].block_crc32 must list {blocks} integers (one per {CRC_DOCS} documents)")
        if "mask_file" in e:
            mcrcs = e.get("mask_block_crc32")
            if not isinstance(e.get("mask_sha256"), str) or not isinstance(mcrcs, list) or len(mcrcs) != blocks \
                    or not all(isinstance(c, int) for c in mcrcs):
                raise bad(f"shards[{i}] has mask_file but no mask_sha256 or mask_block_crc32 of {blocks} integers")
        if e.get("index_crc32") is not None and not isinstance(e["index_crc32"], int):
            raise bad(f"shards[{i}].index_crc32 is {e['index_crc32']!r}, expected an integer")


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


def _sha256_check(file: str, sha: str) -> None:
    if file_sha256(file) != sha:
        raise _fail(f"prepared shard {file} fails its sha256 check (damaged or modified); delete it and run "
                    "`loom data prepare` with the same arguments to rebuild it")


def check_sizes(prep: "Prepared") -> None:
    """ManifestError for a shard file that is missing or whose size is not the manifest's."""
    itemsize = prep.dtype.itemsize
    for s in prep.shards:
        files = [(s.tokens, s.n_tokens * itemsize), (s.index, s.documents * INDEX_DTYPE.itemsize)]
        if s.mask is not None:
            files.append((s.mask, s.n_tokens))
        for file, nbytes in files:
            if not os.path.isfile(file):
                raise _fail(f"prepared shard {file} is missing; run `loom data prepare` with the same arguments "
                            "to rebuild it")
            size = os.stat(file).st_size
            if size != nbytes:
                raise _fail(f"prepared shard {file} has {size} bytes, the manifest says {nbytes}; delete it "
                            "and run `loom data prepare` with the same arguments to rebuild it")


def verify_shards(prep: "Prepared", full: bool = False) -> None:
    """Check every file's size, and each index's crc32 (or, for a folder without block checksums,
    the sha256 of every file); with full=True the sha256 of every file."""
    check_sizes(prep)
    for s in prep.shards:
        if full or s.block_crc32 is None or s.index_crc32 is None:
            _sha256_check(s.tokens, s.sha256)
            _sha256_check(s.index, s.index_sha256)
            if s.mask is not None:
                _sha256_check(s.mask, s.mask_sha256)
            continue
        with open(s.index, "rb") as f:
            if zlib.crc32(f.read()) != s.index_crc32:
                raise _fail(f"prepared shard {s.index} fails its crc32 check (damaged since it was prepared); "
                            "delete it and run `loom data prepare` with the same arguments to rebuild it")


def check_block(shard: Shard, block: int, tokens: np.ndarray, span: tuple[int, int], mask: bool = False) -> None:
    """Raise ManifestError unless tokens[span] (block `block` of `shard`) matches its crc32;
    mask=True: `tokens` is the shard's loss mask, checked against mask_block_crc32."""
    crcs = shard.mask_block_crc32 if mask else shard.block_crc32
    if crcs is None:
        return  # verified whole by sha256 at open
    a, b = span
    if zlib.crc32(tokens[a:b]) != crcs[block]:
        lo = block * CRC_DOCS
        raise _fail(f"prepared shard {shard.mask if mask else shard.tokens} fails its crc32 check in documents {lo}-"
                    f"{min(lo + CRC_DOCS, shard.documents) - 1} (damaged since it was prepared); no step was "
                    "taken on it: delete the shard and run `loom data prepare` with the same arguments to rebuild it")


def open_prepared(path: str, tokenizer=None, verify: bool = True) -> Prepared:
    """Open and check a prepared folder (see the module docstring): its manifest's fields and every
    shard's size always, the checksums of verify_shards when `verify`. Raises ManifestError."""
    path = os.path.abspath(os.path.expanduser(path))
    manifest = read_manifest(path)
    mpath = os.path.join(path, "manifest.json")
    check_manifest_fields(manifest, mpath)
    if tokenizer is not None:
        check_tokenizer(manifest, mpath, tokenizer)
    shards = [Shard(e["split"], os.path.join(path, e["tokens_file"]), os.path.join(path, e["index_file"]),
                    int(e["documents"]), int(e["tokens"]), e["sha256"], e["index_sha256"],
                    None if e.get("block_crc32") is None else tuple(int(c) for c in e["block_crc32"]),
                    e.get("index_crc32"),
                    os.path.join(path, e["mask_file"]) if "mask_file" in e else None, e.get("mask_sha256"),
                    tuple(int(c) for c in e["mask_block_crc32"]) if "mask_file" in e else None)
              for e in manifest["shards"]]
    prep = Prepared(path, manifest, np.dtype(manifest["dtype"]), shards)
    if verify:
        verify_shards(prep)
    else:
        check_sizes(prep)
    return prep


def shard_lengths(shard: Shard) -> np.ndarray:
    """Document lengths (D,) int64 of a shard, from its memory-mapped index."""
    if shard.documents == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.memmap(shard.index, dtype=INDEX_DTYPE, mode="r")
    lengths = np.diff(ends.astype(np.int64), prepend=np.int64(0))
    del ends
    return lengths
