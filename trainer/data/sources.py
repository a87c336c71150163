"""Real-text document sources, read as streams: local files, the HF hub, the Python standard library.

Nothing here holds a corpus in memory: a source is cut into *work units*
(`source_units`), and `unit_documents(src, unit)` yields the documents (str)
of one unit in a fixed order. `loom data prepare` (prepare.py) tokenizes the
units in parallel into shards; training only ever reads those shards.

Kinds and their units:
  files   local json / jsonl / parquet / txt, optionally compressed
          (.gz, .bz2, .xz, .zst), given as paths, globs or directories
          (searched recursively for those extensions); one unit per file.
          json/jsonl/parquet documents are the `text_field` value of each row;
          txt gives one document per line, paragraph or file (`sample_by`).
  hub     `datasets.load_dataset(name, subset, split=split, streaming=True)`,
          never materialised; one unit per shard of the streaming dataset
          (its data files). Needs the network or the local HF cache.
  datatrove  the output folder of datatrove's DocumentTokenizer (files NAME.ds of
          tokens + NAME.ds.index of uint64 document ends, searched recursively),
          already tokenized: documents are token arrays, one unit per .ds file.
          This lets the field's pipeline (and its SLURM executor) do the
          tokenizing; `loom data prepare` then adds the carve, the manifest and
          the hashes (it must be given the tokenizer datatrove used).
  chat    local json / jsonl files of `messages` rows (chat.py renders and masks them;
          prepare.py writes a loss mask beside the tokens), one unit per file.
  stdlib  the .py files of the running interpreter's standard library
          (`sysconfig.get_paths()["stdlib"]`, no tests, no site-packages), one
          document per file: real text that needs no download. Files are
          taken in the order of a hash of their relative path (a spread over
          the library), capped at `max_bytes`, in units of STDLIB_UNIT_FILES.

`max_bytes` caps a source's UTF-8 size before the train/val carve; on files
and hub sources it makes the whole source one unit (the cap follows stream
order). Empty documents (blank lines, empty strings, nulls) are dropped.

Train / val carve: a document is held out for val when the hash of its text
falls below `val_fraction` (`in_val`), so the carve needs no global view,
is the same for every run, seed and number of workers, and duplicated
documents always land on the same side.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

_EXTENSIONS = (".json", ".jsonl", ".parquet", ".txt")
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_UNIT_FILES = 128
READ_BATCH = 1024  # parquet rows per read


def key_fraction(key: str | bytes) -> float:
    """Stable uniform number in [0, 1) from a string or bytes (first 8 bytes of sha1)."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big") / 2.0**64


def in_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the val split (hash of its text < val_fraction)."""
    return key_fraction(text) < val_fraction


class SourceError(ValueError):
    """A source that cannot be read; the message is one line."""


@dataclass(frozen=True)
class Unit:
    """One work unit of a source: a file (files), a stream shard (hub) or a list of files (stdlib)."""

    index: int
    files: tuple[str, ...] = ()
    shard: int = 0
    n_shards: int = 1


# ----------------------------------------------------------------------------- files

def _strip_compression(path: str) -> tuple[str, Optional[str]]:
    for comp in _COMPRESSIONS:
        if path.endswith(comp):
            return path[: -len(comp)], comp
    return path, None


def file_type(path: str) -> str:
    """"json" (json and jsonl), "parquet" or "txt"; ValueError for anything else."""
    ext = os.path.splitext(_strip_compression(path)[0])[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {ext or '(none)'}; use .json, .jsonl, .parquet or .txt "
                         "(optionally .gz, .bz2, .xz or .zst)")
    return {".jsonl": "json"}.get(ext, ext[1:])


def _data_files_in(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem = _strip_compression(name)[0]
            if os.path.splitext(stem)[1].lower() in _EXTENSIONS:
                out.append(os.path.join(dirpath, name))
    return out


def expand_paths(paths: list[str]) -> list[str]:
    """Expand globs (sorted) and directories (recursive, sorted), keep the given order
    otherwise, drop duplicates.

    Raises FileNotFoundError naming the first path, glob or directory that matches nothing.
    """
    out: list[str] = []
    for spec in paths:
        spec = os.path.expanduser(spec)
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no data files match {spec}")
        elif os.path.isfile(spec):
            matches = [spec]
        elif os.path.isdir(spec):
            matches = _data_files_in(spec)
            if not matches:
                raise FileNotFoundError(f"directory {spec} holds no .json, .jsonl, .parquet or .txt files")
        else:
            raise FileNotFoundError(f"data file not found: {spec}")
        out.extend(m for m in matches if m not in out)
    return out


def _open_text(path: str) -> io.TextIOBase:
    comp = _strip_compression(path)[1]
    if comp == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if comp == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if comp == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst files needs the zstandard package "
                             "(pip install zstandard)") from None
        return io.TextIOWrapper(io.BufferedReader(_ZstdFrames(path, zstandard)), encoding="utf-8",
                                errors="replace")
    return open(path, encoding="utf-8", errors="replace")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file's frames; EOFError when the last frame is cut short
    (zstandard's stream_reader ends quietly there, so a truncated file would read as a shorter one)."""

    def __init__(self, path: str, zstandard):
        self._raw, self._z = open(path, "rb"), zstandard
        self._d, self._out = zstandard.ZstdDecompressor().decompressobj(), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if not self._d.eof and self._started:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            self._out = self._d.decompress(chunk)
            while self._d.eof and self._d.unused_data:  # the next frame
                rest, self._d = self._d.unused_data, self._z.ZstdDecompressor().decompressobj()
                self._out += self._d.decompress(rest)
        n = min(len(buf), len(self._out))
        buf[:n], self._out = self._out[:n], self._out[n:]
        return n

    @property
    def _started(self) -> bool:
        return self._raw.tell() > 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decoder_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors and pyarrow raise on damaged input (a truncated or corrupt file)."""
    errors: list[type[BaseException]] = [EOFError, OSError, lzma.LZMAError, zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _text_of(row, text_field: str, where: str) -> Optional[str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: rows must be JSON objects, got {type(row).__name__}")
    if text_field not in row:
        raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, row))}); set text_field")
    value = row[text_field]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def _json_rows(path: str) -> Iterator:
    with _open_text(path) as f:
        first = f.readline()
        if first.lstrip().startswith("["):  # one JSON array (parsed whole: small files only)
            yield from json.loads(first + f.read())
            return
        for n, line in enumerate(itertools.chain([first], f), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None


def _parquet_texts(path: str, text_field: str) -> Iterator[Optional[str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no field {text_field!r} (fields: {', '.join(names)}); set text_field")
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=[text_field]):
        col = batch.column(0)
        if not (col.type == "string" or col.type == "large_string"):
            raise ValueError(f"{path}: field {text_field!r} holds {col.type}, not text")
        yield from col.to_pylist()


def _txt_documents(path: str, sample_by: str) -> Iterator[str]:
    with _open_text(path) as f:
        if sample_by == "document":
            yield f.read()
        elif sample_by == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
        else:  # paragraph: blocks separated by blank lines
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\n")


def file_documents(path: str, text_field: str = "text", sample_by: str = "line") -> Iterator[str]:
    """Non-empty documents of one local file, in row order. A damaged file (truncated or corrupt
    compression, a parquet file cut short) is a ValueError naming it."""
    kind = file_type(path)
    if kind == "txt":
        texts = _txt_documents(path, sample_by)
    elif kind == "parquet":
        texts = _parquet_texts(path, text_field)
    else:
        texts = (_text_of(row, text_field, path) for row in _json_rows(path))
    try:
        for t in texts:
            if t:
                yield t
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except _decoder_errors() as e:
        what = (_strip_compression(path)[1] or "." + kind)[1:]
        raise ValueError(f"{path}: damaged or truncated {what} file ({str(e).strip() or type(e).__name__}); "
                         "replace it or leave it out of the source") from None


def files_documents(paths: list[str], text_field: str = "text", sample_by: str = "line") -> list[str]:
    """All documents of some local files, in file order then row order (small corpora and tests)."""
    return [d for p in expand_paths(paths) for d in file_documents(p, text_field, sample_by)]


# ----------------------------------------------------------------------------- hub

def _hub_stream(name: str, subset: Optional[str], split: str):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, streaming=True)
    except Exception as e:  # the library raises many types (ConnectionError, DatasetNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"hub dataset {name!r} (split {split!r}) could not be opened: {first} "
                           "(offline runs need it in the local HF cache)") from None


def hub_documents(name: str, subset: Optional[str] = None, split: str = "train", text_field: str = "text",
                  shard: int = 0, n_shards: int = 1) -> Iterator[str]:
    """Non-empty documents of shard `shard` of `n_shards` of a hub dataset, streamed."""
    ds = _hub_stream(name, subset, split)
    if n_shards > 1:
        ds = ds.shard(num_shards=n_shards, index=shard)
    for row in ds:
        t = _text_of(row, text_field, f"hub dataset {name!r}")
        if t:
            yield t


# ----------------------------------------------------------------------------- stdlib

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None, max_bytes: Optional[int] = None) -> list[str]:
    """Relative paths of the standard library's .py files (tests excluded), in the
    order of a hash of the path, cut after `max_bytes` (size on disk)."""
    root = root or stdlib_root()
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel.append(os.path.relpath(os.path.join(dirpath, name), root))
    rel.sort(key=lambda p: (key_fraction("order:" + p), p))
    if max_bytes is None:
        return rel
    kept, total = [], 0
    for p in rel:
        if total >= max_bytes:
            break
        kept.append(p)
        total += os.path.getsize(os.path.join(root, p))
    return kept


# ----------------------------------------------------------------------------- units

def _paths_of(src) -> list[str]:
    return ([src.path] if src.path else []) + list(src.paths)


def source_units(src) -> list[Unit]:
    """The work units of a real-text source config (loom.trainer.data.SourceConfig), in order."""
    if src.kind == "stdlib":
        files = stdlib_files(max_bytes=src.max_bytes)
        return [Unit(i, tuple(files[lo:lo + STDLIB_UNIT_FILES]))
                for i, lo in enumerate(range(0, len(files), STDLIB_UNIT_FILES))]
    if src.kind == "chat":
        files = expand_paths(_paths_of(src))
        for p in files:
            if file_type(p) != "json":
                raise ValueError(f"{p}: a chat source reads .json / .jsonl files of messages")
        return [Unit(i, (p,)) for i, p in enumerate(files)]
    if src.kind == "files":
        files = expand_paths(_paths_of(src))
        for p in files:
            file_type(p)
        if src.max_bytes is not None:
            return [Unit(0, tuple(files))]
        return [Unit(i, (p,)) for i, p in enumerate(files)]
    if src.kind == "datatrove":
        return [Unit(i, (p,)) for i, p in enumerate(datatrove_files(src.path))]
    if src.kind == "hub":
        if src.max_bytes is not None:
            return [Unit(0)]
        n = int(getattr(_hub_stream(src.name, src.subset, src.split), "n_shards", 1) or 1)
        return [Unit(i, shard=i, n_shards=n) for i in range(n)]
    raise ValueError(f"{src.kind!r} is not a real-text source kind")


def unit_documents(src, unit: Unit) -> Iterator[str]:
    """Documents of one work unit, in a fixed order (max_bytes applied)."""
    if src.kind == "stdlib":
        root = stdlib_root()
        for p in unit.files:
            with open(os.path.join(root, p), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text:
                yield text
        return
    if src.kind == "files":
        docs = (d for p in unit.files for d in file_documents(p, src.text_field, src.sample_by))
    elif src.kind == "hub":
        docs = hub_documents(src.name, src.subset, src.split, src.text_field, unit.shard, unit.n_shards)
    else:
        raise ValueError(f"{src.kind!r} is not a real-text source kind")
    if src.max_bytes is None:
        yield from docs
        return
    total = 0
    for d in docs:
        if total >= src.max_bytes:
            break
        yield d
        total += len(d.encode("utf-8"))


# ----------------------------------------------------------------------------- datatrove output

def datatrove_files(folder: str) -> list[str]:
    """Sorted .ds token files under a datatrove tokenizer output folder."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"datatrove output folder not found: {folder}")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f.endswith(".ds"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no datatrove .ds token files")
    return files


def datatrove_token_size(ds_file: str, default: int) -> int:
    """Bytes per token of a .ds file, from its .metadata ("tokenizer|size" first line) when present."""
    try:
        with open(ds_file + ".metadata") as f:
            return int(f.readline().strip().rsplit("|", 1)[1])
    except (OSError, ValueError, IndexError):
        return default


def datatrove_documents(ds_file: str, token_size: int) -> Iterator["np.ndarray"]:
    """Documents (token arrays) of one datatrove .ds file, via its .ds.index of document ends."""
    import numpy as np

    dtype = np.dtype("<u2") if token_size == 2 else np.dtype("<u4")
    if not os.path.isfile(ds_file + ".index"):
        raise FileNotFoundError(f"{ds_file}.index is missing; run datatrove's DocumentTokenizer with save_index=True")
    ends = np.fromfile(ds_file + ".index", dtype="<u8").astype(np.int64)
    n = os.path.getsize(ds_file)
    if n % dtype.itemsize or (len(ends) and ends[-1] * dtype.itemsize != n):
        raise ValueError(f"{ds_file}: {n} bytes do not match its index ({ends[-1] if len(ends) else 0} tokens of "
                         f"{dtype.itemsize} bytes); is it complete?")
    if not len(ends):
        return
    tokens = np.memmap(ds_file, dtype=dtype, mode="r")
    lo = 0
    for hi in ends:
        if hi > lo:
            yield np.asarray(tokens[lo:hi])
        lo = hi


def source_identity(src) -> dict:
    """What the prepared content of a real-text source depends on (its cache key).

    Local files add their size and modification time, so an edited corpus is
    prepared again; the stdlib adds the Python version and library path.
    """
    keys = ("kind", "path", "paths", "text_field", "sample_by", "name", "subset", "split", "val_fraction",
            "max_bytes")
    ident = {k: getattr(src, k) for k in keys}
    if src.kind == "chat":
        ident["loss_on"] = src.loss_on
    if src.kind in ("files", "chat"):
        ident["files"] = [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in expand_paths(_paths_of(src))]
    if src.kind == "datatrove":
        ident["files"] = [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in datatrove_files(src.path)]
    if src.kind == "stdlib":
        import sys

        ident["python"] = sys.version.split()[0]
        ident["root"] = stdlib_root()
    return ident
