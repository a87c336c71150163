"""Real-text document sources: local files, the HF hub, and the Python standard library.

Each loader returns a list of documents (str) in a deterministic order. The
synthetic tasks (passkey, mqar) live in synthetic.py.

Kinds:
  files   local json / jsonl / parquet / txt (optionally .gz/.bz2/.xz/.zst), given
          as paths or globs, read with `datasets.load_dataset(<builder>,
          data_files=...)`; the documents are the `text_field` column (json,
          parquet) or, for txt, one per line / paragraph / file (`sample_by`).
  hub     `datasets.load_dataset(name, subset, split=split)`; needs the network
          or a dataset already in the local HF cache.
  stdlib  the .py files of the running interpreter's standard library
          (`sysconfig.get_paths()["stdlib"]`, no tests, no site-packages): real
          text that needs no download. Its content depends on the Python version.

Train / val split (`part`): when a recipe gives no separate val sources, each
real-text source is carved deterministically by document: a document belongs to
val when the hash of its key (relative path for stdlib, "<row>" for files and
hub) falls below `val_fraction`, independently of the seed, so the val set is
the same for every run. part="all" takes every document (used when val sources
are given explicitly). `max_bytes` caps the UTF-8 size of the corpus *before*
the carve: stdlib files are taken in hash order (a spread over the whole
library, not the first packages alphabetically), other sources in row order.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from typing import Literal, Optional

Part = Literal["train", "val", "all"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def key_fraction(key: str) -> float:
    """Stable uniform number in [0, 1) from a string (first 8 bytes of sha1)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def carve(keys: list[str], part: Part, val_fraction: float) -> list[int]:
    """Indices of the documents in `part`; see the module docstring.

    If no key hashes below `val_fraction` (tiny corpora), the document with the
    smallest hash is the val set, so val is never empty when there are >= 2
    documents. With a single document, train and val are both that document.
    """
    if part == "all" or len(keys) <= 1:
        return list(range(len(keys)))
    fracs = [key_fraction(k) for k in keys]
    in_val = [f < val_fraction for f in fracs]
    if not any(in_val):
        in_val[min(range(len(keys)), key=fracs.__getitem__)] = True
    want_val = part == "val"
    return [i for i, v in enumerate(in_val) if v == want_val]


def _cap_bytes(docs: list[str], max_bytes: Optional[int]) -> list[str]:
    if max_bytes is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_bytes:
            break
        out.append(d)
        total += len(d.encode("utf-8"))
    return out


# ----------------------------------------------------------------------------- files

def expand_paths(paths: list[str]) -> list[str]:
    """Expand globs (sorted), keep the given order otherwise, drop duplicates.

    Raises FileNotFoundError naming the first path or glob that matches nothing.
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
            raise FileNotFoundError(f"{spec} is a directory; give files or a glob such as {spec}/*.jsonl")
        else:
            raise FileNotFoundError(f"data file not found: {spec}")
        out.extend(m for m in matches if m not in out)
    return out


def _builder_for(path: str) -> str:
    stem = path
    for comp in _COMPRESSIONS:
        if stem.endswith(comp):
            stem = stem[: -len(comp)]
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _BUILDERS:
        raise ValueError(f"{path}: unsupported file type {ext or '(none)'}; "
                         "use .json, .jsonl, .parquet or .txt")
    return _BUILDERS[ext]


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                         "set text_field")
    values = ds.data.column(text_field).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: field {text_field!r} holds {type(bad).__name__}, not text")
    return [v for v in values if v]


def files_documents(paths: list[str], text_field: str = "text",
                    sample_by: Literal["line", "paragraph", "document"] = "line",
                    cache_dir: Optional[str] = None) -> list[str]:
    """Documents from local files of one type, in file order then row order.

    Empty documents (blank txt lines, empty strings, nulls) are dropped.
    """
    files = expand_paths(paths)
    builders = {_builder_for(p) for p in files}
    if len(builders) > 1:
        raise ValueError(f"one files source must hold one file type, got {sorted(builders)}; "
                         "use one source per type")
    builder = builders.pop()
    import datasets

    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    field = "text" if builder == "text" else text_field
    docs = _column(ds, field, files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)")
    if builder == "text" and sample_by == "line":
        docs = [d for d in docs if d.strip()]
    return docs


# ----------------------------------------------------------------------------- hub

def hub_documents(name: str, subset: Optional[str] = None, split: str = "train",
                  text_field: str = "text", cache_dir: Optional[str] = None) -> list[str]:
    """Documents of a hub dataset split. Fails with one line when unavailable."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
    except Exception as e:  # the library raises many types (ConnectionError, DatasetNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"hub dataset {name!r} (split {split!r}) could not be loaded: {first} "
                           "(offline runs need it in the local HF cache)") from None
    return _column(ds, text_field, f"hub dataset {name!r}")


# ----------------------------------------------------------------------------- stdlib

def stdlib_files(root: Optional[str] = None) -> list[str]:
    """Sorted relative paths of the standard library's .py files, tests excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(rel)


def stdlib_documents(part: Part, val_fraction: float, max_bytes: Optional[int] = None,
                     root: Optional[str] = None) -> list[str]:
    """Standard-library sources as documents (one per file), carved into `part`.

    Files are ordered by the hash of their relative path, capped at `max_bytes`
    (size on disk, the whole corpus before the carve), then carved.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    # Order by a hash independent of the carve's, or the cap would keep mostly val files.
    rel = sorted(stdlib_files(root), key=lambda p: (key_fraction("order:" + p), p))
    if max_bytes is not None:
        kept, total = [], 0
        for p in rel:
            if total >= max_bytes:
                break
            kept.append(p)
            total += os.path.getsize(os.path.join(root, p))
        rel = kept
    chosen = [rel[i] for i in carve(rel, part, val_fraction)]
    docs = []
    for p in chosen:
        with open(os.path.join(root, p), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text:
            docs.append(text)
    return docs


# ----------------------------------------------------------------------------- dispatch

def load_documents(src, part: Part, cache_dir: Optional[str] = None) -> list[str]:
    """Documents of one real-text source config (loom.trainer.data.SourceConfig) for `part`."""
    if src.kind == "stdlib":
        return stdlib_documents(part, src.val_fraction, src.max_bytes)
    if src.kind == "files":
        paths = ([src.path] if src.path else []) + list(src.paths)
        docs = files_documents(paths, src.text_field, src.sample_by, cache_dir)
    elif src.kind == "hub":
        docs = hub_documents(src.name, src.subset, src.split, src.text_field, cache_dir)
    else:
        raise ValueError(f"{src.kind!r} is not a real-text source kind")
    docs = _cap_bytes(docs, src.max_bytes)
    return [docs[i] for i in carve([str(i) for i in range(len(docs))], part, src.val_fraction)]
