"""The data section of a recipe: DataConfig, its sources and its seq_len stages,
validated before any work (ConfigError naming the key)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from loom.models.config import ConfigError, check_ranges, ranged


@dataclass
class StageConfig:
    """One stage of data.seq_len_schedule: from training step `step` on, windows of
    `seq_len` tokens, `batch_size` rows per rank (None: keep tokens per step)."""

    step: int = ranged(0, ge=0)
    seq_len: int = ranged(512, ge=1)
    batch_size: Optional[int] = ranged(None, ge=1)


@dataclass
class SourceConfig:
    """One document source of the mixture.

    kind: prepared (a folder written by `loom data prepare`), files | hub | stdlib
        (raw text) | datatrove (datatrove tokenizer output), prepared into
        data.cache_dir on first use, then read the same way, or
        passkey | mqar | copy (synthetic, generated from the seed).
    weight: relative share of windows drawn from this source (> 0).
    path, paths: prepared: the folder; files: paths, globs or directories.
    text_field: files (json/parquet) and hub: the column holding the text.
    sample_by: files (txt): one document per line, paragraph or whole file.
    name, subset, split: hub: dataset name, config name and split to load.
    val_fraction: raw text: share of documents held out for val at preparation
        (by hash of the document's text, seed-independent).
    max_bytes: real text: cap on the corpus size in UTF-8 bytes, before the carve.
    min_tokens, max_tokens: real text: keep documents of this many tokens (with
        bos/eos), e.g. min_tokens: 16384 for a long-document source.
    length_upsample: real text: [[min_len, weight], ...]; a document of >= min_len
        tokens (largest matching entry) is seen `weight` times per epoch in
        expectation. The source's share of windows stays its `weight`.
    depth: passkey: needle depth in [0, 1]; None = uniform per example.
    key_digits: passkey: digits of the key.
    n_pairs, n_queries: mqar: key-value pairs shown and queries asked.
    min_period, max_period: copy: range of the repeated string's length (characters).
    loss_on: chat: train on the assistant turns' tokens (assistant) or on every token (all).
    too_long: chat: a conversation longer than a window (seq_len + 1 tokens) is cut to
        the window (truncate) or left out (skip); either is counted (start-up log and
        `loom data stats DIR --seq-len T`). Conversations are never split across windows.
    """

    kind: Literal["prepared", "files", "hub", "stdlib", "datatrove", "chat", "passkey", "mqar", "copy"] = "stdlib"
    weight: float = ranged(1.0, gt=0)
    path: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    val_fraction: float = ranged(0.05, gt=0, lt=1)
    max_bytes: Optional[int] = ranged(None, gt=0)
    min_tokens: int = ranged(0, ge=0)
    max_tokens: Optional[int] = ranged(None, ge=1)
    length_upsample: list[list[float]] = ranged(factory=list, ge=0)
    depth: Optional[float] = ranged(None, ge=0, le=1)
    key_digits: int = ranged(5, ge=1)
    n_pairs: int = ranged(16, ge=1)
    n_queries: int = ranged(4, ge=1)
    min_period: int = ranged(32, ge=1)
    max_period: int = ranged(64, ge=1)
    loss_on: Literal["assistant", "all"] = "assistant"
    too_long: Literal["truncate", "skip"] = "truncate"


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="stdlib", max_bytes=4_000_000)]


@dataclass
class DataConfig:
    """Data of a run.

    seq_len: tokens per training row (T); windows hold T + 1 tokens.
    tokenizer: "byte" or a local tokenizer.json (or folder holding one).
    sources: the training mixture (default: 4 MB of the Python stdlib).
    val_sources: the validation mixture, taken whole; None = the same sources
        with their held-out documents (real text) or fresh examples (synthetic).
    val_windows: windows in the fixed validation set (eval_windows).
    seq_len_schedule: stages of {step, seq_len, batch_size}; empty = one stage
        at seq_len (trainer/data/schedule.py).
    cache_dir: where raw sources (files, hub, stdlib) are prepared on first use,
        one folder per (source, tokenizer); None = $LOOM_DATA_CACHE or
        ~/.cache/loom/data.
    """

    seq_len: int = ranged(512, ge=1)
    tokenizer: str = "byte"
    sources: list[SourceConfig] = field(default_factory=_default_sources)
    val_sources: Optional[list[SourceConfig]] = None
    val_windows: int = ranged(32, ge=1)
    seq_len_schedule: list[StageConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None


def _check_source(src: SourceConfig, where: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}.{key}: {msg}")

    if src.kind == "files" and not src.path and not src.paths:
        raise bad("path", "a files source needs path or paths")
    if src.kind == "hub" and not src.name:
        raise bad("name", "a hub source needs the dataset name")
    if src.kind == "chat" and not src.path and not src.paths:
        raise bad("path", "a chat source needs path or paths (json / jsonl files of messages)")
    if src.kind in ("prepared", "datatrove") and not src.path:
        raise bad("path", f"a {src.kind} source needs the folder it reads")
    if src.kind in ("prepared", "files", "hub", "stdlib", "datatrove", "chat"):
        if src.max_tokens is not None and src.max_tokens < max(src.min_tokens, 1):
            raise bad("max_tokens", f"must be >= min_tokens ({src.min_tokens}) and >= 1, got {src.max_tokens}")
        for rule in src.length_upsample:
            if len(rule) != 2:
                raise bad("length_upsample", f"entries are [min_len >= 0, weight >= 0], got {rule}")
    if src.kind == "chat" and src.length_upsample:
        raise bad("length_upsample", "is not available for chat sources (conversations are packed whole)")
    # single-value ranges (weight > 0, val_fraction in (0, 1), depth in [0, 1], ...) are declared on the
    # fields above and checked by loom.models.config.build; these relate fields or depend on the kind
    if src.kind == "copy" and not 1 <= src.min_period <= src.max_period:
        raise bad("min_period", f"need 1 <= min_period <= max_period, "
                                f"got min_period={src.min_period}, max_period={src.max_period}")
    if src.kind == "mqar" and not 1 <= src.n_queries <= src.n_pairs <= 26**3:
        raise bad("n_queries", f"need 1 <= n_queries <= n_pairs <= {26**3}, "
                               f"got n_queries={src.n_queries}, n_pairs={src.n_pairs}")


def validate_data_config(cfg: DataConfig, prefix: str = "data") -> None:
    """Semantic checks beyond types (which loom.models.config.build does).

    Raises ConfigError (a ValueError) naming the key, e.g. data.sources[1].path.
    """
    check_ranges(cfg, prefix)  # a DataConfig made in code, not by build()
    if not cfg.sources:
        raise ConfigError(f"{prefix}.sources: needs at least one source")
    if cfg.val_sources is not None and not cfg.val_sources:
        raise ConfigError(f"{prefix}.val_sources: empty list; use null for the held-out part of sources")
    for i, src in enumerate(cfg.sources):
        _check_source(src, f"{prefix}.sources[{i}]")
    for i, src in enumerate(cfg.val_sources or []):
        _check_source(src, f"{prefix}.val_sources[{i}]")
