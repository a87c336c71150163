"""Checks of every input before any work: model shapes, lengths, tokenizer file, data sources.

Each check is a small function raising ConfigError (a ValueError: the CLI
prints it as one `error: ...` line) and reads only what it needs, so bad input
fails within seconds, before the model is built:

- `check_model_shapes`   d_model, n_heads positive; n_heads divides d_model
                         unless head_dim is given; head_dim even for RoPE.
- `check_checkpoint_format`  sharded checkpoints need an engine with DTensor state.
- `check_lengths`        a lower bound of the memory one training micro-batch
                         and one evaluation example need, against the device's memory (RAM on CPU)
                         (so `data.seq_len=1000000000` is refused, not a hang).
- `check_tokenizer`      a tokenizer file that is not JSON, or not a tokenizer.
- `validate_sources`     every local file of every `files` source is opened and
                         its head read: empty files, text that is not UTF-8
                         (a binary file), JSON lines without the text field, an
                         empty or unreadable parquet. Hub and stdlib sources are
                         resolved by the data path itself.

`validate_inputs(cfg)` runs them all; trainer/train.py calls it first.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os

from loom.models.config import ConfigError

_HEAD_BYTES = 1 << 16  # bytes of each text/json file read to validate it


def validate_inputs(cfg) -> None:
    check_model_shapes(cfg.model)
    check_checkpoint_format(cfg)
    check_lengths(cfg)
    check_tokenizer(cfg.data.tokenizer)
    validate_sources(cfg.data)


# ----------------------------------------------------------------------------- model and lengths

def check_model_shapes(m) -> None:
    for key in ("d_model", "n_heads"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must divide model.d_model ({m.d_model}), "
                          "or give model.head_dim")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if head_dim < 1 or head_dim % 2:
        raise ConfigError(f"model.head_dim ({head_dim}) must be even and >= 2: rotary embeddings rotate pairs")
    if m.n_kv_heads is not None and m.n_kv_heads < 1:
        raise ConfigError(f"model.n_kv_heads must be >= 1, got {m.n_kv_heads}")


def check_checkpoint_format(cfg) -> None:
    if cfg.train.checkpoint_format == "sharded" and cfg.parallel.engine == "deepspeed":
        raise ConfigError("train.checkpoint_format=sharded needs parallel.engine single, ddp or fsdp "
                          "(DeepSpeed's ZeRO partitions are not DTensors); use train.checkpoint_format=full")
    if cfg.train.checkpoint_async and cfg.train.checkpoint_format != "sharded":
        raise ConfigError("train.checkpoint_async needs train.checkpoint_format=sharded")


def device_memory_bytes() -> tuple[int, str]:
    """Memory of the device activations live on: the first GPU's, else this host's RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host"


def min_bytes_per_token(m, hidden_bytes: int) -> int:
    """A lower bound of the memory a token costs in a forward + backward pass: its five int64 batch
    fields, and one hidden state per layer (kept for backward even under full activation
    checkpointing) plus the embedding output."""
    return 5 * 8 + hidden_bytes * m.d_model * (len(m.layer_kinds()) + 1)


def check_lengths(cfg) -> None:
    """Refuse a micro-batch or an evaluation example whose memory lower bound exceeds the device's."""
    ram, where = device_memory_bytes()
    per_token = min_bytes_per_token(cfg.model, 2 if where == "GPU" else 4)  # bf16 on GPU, fp32 on CPU
    cp = max(1, cfg.parallel.cp)
    lengths = [("data.seq_len", cfg.data.seq_len, cfg.train.batch_size)]
    lengths += [("eval.passkey_lengths", n, 1) for n in cfg.eval.passkey_lengths]
    lengths += [("eval.mqar_lengths", n, 1) for n in cfg.eval.mqar_lengths]
    for key, length, rows in lengths:
        need = rows * length * per_token // cp
        if need > ram:
            raise ConfigError(f"{key}={length}: one {'micro-batch' if rows > 1 else 'example'} needs at least "
                              f"{need / 2**30:.1f} GiB per process (estimate), more than this {where}'s "
                              f"{ram / 2**30:.1f} GiB; lower it")


# ----------------------------------------------------------------------------- tokenizer

def check_tokenizer(spec: str) -> None:
    if spec == "byte":
        return
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer: {spec} not found (expected 'byte', a tokenizer.json file "
                          "or a folder holding one)")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.tokenizer: {path} is not a valid tokenizer.json (not JSON: {e})") from None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(path)
    except Exception as e:  # the Rust binding raises a bare Exception with serde's message
        raise ConfigError(f"data.tokenizer: {path} is not a valid tokenizer.json ({str(e).splitlines()[0]})") \
            from None


# ----------------------------------------------------------------------------- data sources

def validate_sources(data_cfg) -> None:
    """Open every local file of every `files` source far enough to fail early (ConfigError)."""
    from loom.trainer.data.sources import expand_paths, file_type

    for i, src in enumerate(list(data_cfg.sources) + list(data_cfg.val_sources or [])):
        if src.kind != "files":
            continue
        paths = ([src.path] if src.path else []) + list(src.paths)
        if not paths:
            raise ConfigError(f"data source {i} (files): give path or paths")
        try:
            files = expand_paths(paths)
            for path in files:
                builder = file_type(path)
                if os.path.getsize(path) == 0:
                    raise ValueError(f"{path} is empty")
                if builder == "parquet":
                    _check_parquet(path, src.text_field)
                elif builder == "json":
                    _check_json(path, src.text_field)
                else:
                    _check_text(path)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data source {i} ({src.kind}): {e}") from None


def _open_head(path: str) -> bytes:
    """The first _HEAD_BYTES of a file, decompressed when its name says so (.zst is read raw: its
    decoder is optional; the data path reports it)."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)
    try:
        with opener(path, "rb") as f:
            return f.read(_HEAD_BYTES)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"{path} cannot be decompressed ({e})") from None


def _decode_head(path: str) -> str:
    head = _open_head(path)
    if b"\0" in head:
        raise ValueError(f"{path} is not text (it holds NUL bytes; a binary file?)")
    try:  # incremental: a multi-byte character cut by the head's end is not an error
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _check_text(path: str) -> None:
    if path.endswith(".zst"):
        return
    if not _decode_head(path).strip():
        raise ValueError(f"{path} holds no text")


def _check_json(path: str, text_field: str) -> None:
    if path.endswith(".zst"):
        return
    text = _decode_head(path).lstrip()
    if not text:
        raise ValueError(f"{path} holds no records")
    if text.startswith("["):  # a JSON array of records: parse the whole file when the head is all of it
        if os.path.getsize(path) > _HEAD_BYTES:
            return
        try:
            records = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        if not records:
            raise ValueError(f"{path} holds no records")
        first = records[0]
    else:
        line = text.splitlines()[0]
        try:
            first = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line 1 is not a JSON object ({e})") from None
    if not isinstance(first, dict):
        raise ValueError(f"{path}: records must be JSON objects, the first is {type(first).__name__}")
    if text_field not in first:
        raise ValueError(f"{path}: no field {text_field!r} in the first record "
                         f"(fields: {', '.join(first) or 'none'}); set text_field")
    if first[text_field] is not None and not isinstance(first[text_field], str):
        raise ValueError(f"{path}: field {text_field!r} holds {type(first[text_field]).__name__}, not text")


def _check_parquet(path: str, text_field: str) -> None:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = meta.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names) or 'none'}); "
                         "set text_field")
    if meta.metadata.num_rows == 0:
        raise ValueError(f"{path} holds no rows")
