"""The data path: configs and entry points.

recipe `data:` -> DataConfig -> load_tokenizer(cfg.tokenizer)
    -> build_dataset(cfg, tokenizer, "train", seed) -> WindowDataset (infinite, pure in i)
    -> Batcher(dataset, batch_size, dp_rank, dp_size) -> dict of (B, T) tensors
    (StagedBatches chains one Batcher per stage of data.seq_len_schedule)

Real text is read one way only: from prepared folders (`loom data prepare`),
memory-mapped. Raw sources (files, hub, stdlib) are prepared into
cache_dir on first use; synthetic tasks are generated from the seed.

Batch fields (B = rows, T = seq_len): input_ids, labels (-100 where the target
starts a new document), position_ids (restart at 0 at each document and at the
window start), seq_ids (document index per row), all (B, T) int64;
answer_mask (B, T) bool (label positions holding synthetic-task answers);
source (B,) int64 (index of the source in the config list).
Everything is a deterministic function of (config, seed, split, window index);
the Batcher's state is one integer. Files: tokenizer.py, sources.py (raw text
streams), prepare.py (tokenize into shards), prepared.py (format, checks),
reader.py (memory-mapped windows), synthetic.py (passkey, mqar, copy),
packing.py (window fields, boundary helpers), dataset.py (mixture),
batcher.py, schedule.py (seq_len stages), stats.py and commands.py (`loom data`).

Example:
    >>> cfg = DataConfig(seq_len=256)
    >>> tok = load_tokenizer(cfg.tokenizer)
    >>> batcher = Batcher(build_dataset(cfg, tok, "train", seed=0), batch_size=4)
    >>> batch = batcher.next()             # batch["input_ids"].shape == (4, 256)
    >>> val = eval_windows(cfg, tok, seed=0)
    >>> pk = passkey_examples(tok, seq_len=2048, depth=0.5, n=16, seed=0)
    >>> mq = mqar_examples(tok, seq_len=512, n=16, seed=0, n_pairs=8, n_queries=4)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from loom.models.config import ConfigError
from loom.trainer.data.batcher import Batcher, collate
from loom.trainer.data.dataset import (PURPOSE_MIX, PURPOSE_TASK, SPLIT_CODES, MixtureSchedule, WindowDataset,
                                       make_source)
from loom.trainer.data.prepare import REAL_KINDS
from loom.trainer.data.packing import (IGNORE_INDEX, cu_seqlens_from_position_ids, pack_window,
                                  seq_ids_from_position_ids)
from loom.trainer.data.synthetic import MQARTask, PasskeyTask, answer_span_correct
from loom.trainer.data.schedule import StageConfig, StagedBatches
from loom.trainer.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "SourceConfig", "DataConfig", "build_dataset", "eval_windows", "passkey_examples", "mqar_examples",
    "validate_data_config", "WindowDataset", "Batcher", "collate", "load_tokenizer",
    "ByteTokenizer", "HFTokenizer", "seq_ids_from_position_ids", "cu_seqlens_from_position_ids",
    "answer_span_correct", "IGNORE_INDEX", "StageConfig", "StagedBatches",
]


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
    """

    kind: Literal["prepared", "files", "hub", "stdlib", "datatrove", "passkey", "mqar", "copy"] = "stdlib"
    weight: float = 1.0
    path: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    val_fraction: float = 0.05
    max_bytes: Optional[int] = None
    min_tokens: int = 0
    max_tokens: Optional[int] = None
    length_upsample: list[list[float]] = field(default_factory=list)
    depth: Optional[float] = None
    key_digits: int = 5
    n_pairs: int = 16
    n_queries: int = 4
    min_period: int = 32
    max_period: int = 64


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

    seq_len: int = 512
    tokenizer: str = "byte"
    sources: list[SourceConfig] = field(default_factory=_default_sources)
    val_sources: Optional[list[SourceConfig]] = None
    val_windows: int = 32
    seq_len_schedule: list[StageConfig] = field(default_factory=list)
    cache_dir: Optional[str] = None


def _check_source(src: SourceConfig, where: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}.{key}: {msg}")

    if src.weight <= 0:
        raise bad("weight", f"must be > 0, got {src.weight}")
    if src.kind == "files" and not src.path and not src.paths:
        raise bad("path", "a files source needs path or paths")
    if src.kind == "hub" and not src.name:
        raise bad("name", "a hub source needs the dataset name")
    if src.kind in ("prepared", "datatrove") and not src.path:
        raise bad("path", f"a {src.kind} source needs the folder it reads")
    if src.kind in ("prepared", "files", "hub", "stdlib", "datatrove"):
        if src.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {src.min_tokens}")
        if src.max_tokens is not None and src.max_tokens < max(src.min_tokens, 1):
            raise bad("max_tokens", f"must be >= min_tokens ({src.min_tokens}) and >= 1, got {src.max_tokens}")
        for rule in src.length_upsample:
            if len(rule) != 2 or rule[0] < 0 or rule[1] < 0:
                raise bad("length_upsample", f"entries are [min_len >= 0, weight >= 0], got {rule}")
    if src.kind in ("files", "hub", "stdlib", "datatrove"):
        if not 0 < src.val_fraction < 1:
            raise bad("val_fraction", f"must be in (0, 1), got {src.val_fraction}")
        if src.max_bytes is not None and src.max_bytes <= 0:
            raise bad("max_bytes", f"must be > 0, got {src.max_bytes}")
    if src.kind == "passkey":
        if src.depth is not None and not 0 <= src.depth <= 1:
            raise bad("depth", f"must be in [0, 1] or null, got {src.depth}")
        if src.key_digits < 1:
            raise bad("key_digits", f"must be >= 1, got {src.key_digits}")
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
    if cfg.seq_len < 1:
        raise ConfigError(f"{prefix}.seq_len: must be >= 1, got {cfg.seq_len}")
    if cfg.val_windows < 1:
        raise ConfigError(f"{prefix}.val_windows: must be >= 1, got {cfg.val_windows}")
    if not cfg.sources:
        raise ConfigError(f"{prefix}.sources: needs at least one source")
    if cfg.val_sources is not None and not cfg.val_sources:
        raise ConfigError(f"{prefix}.val_sources: empty list; use null for the held-out part of sources")
    for i, src in enumerate(cfg.sources):
        _check_source(src, f"{prefix}.sources[{i}]")
    for i, src in enumerate(cfg.val_sources or []):
        _check_source(src, f"{prefix}.val_sources[{i}]")


def build_dataset(cfg: DataConfig, tokenizer, split: str, seed: int,
                  history: Optional[list[tuple[int, int]]] = None) -> WindowDataset:
    """The infinite window dataset of `split` ("train" or "val").

    Real-text sources are read from their prepared folders (raw ones are
    prepared into cache_dir on first use); synthetic examples are generated on
    access. history: (windows, seq_len) of earlier seq_len stages; each source
    continues where they left it (schedule.py).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    validate_data_config(cfg)
    explicit_val = cfg.val_sources is not None
    sources = cfg.val_sources if split == "val" and explicit_val else cfg.sources
    part = "all" if explicit_val else split
    weights = [s.weight for s in sources]
    used = [0] * len(sources)        # windows of each source consumed by earlier stages
    tokens = [0] * len(sources)      # and their tokens
    for n, seq_len in history or []:
        sched = MixtureSchedule(weights, (seed, SPLIT_CODES[split], PURPOSE_MIX))
        for i in range(len(sources)):
            k = sched.count(i, n)
            used[i] += k
            tokens[i] += k * seq_len
    providers = [make_source(src, i, tokenizer, cfg.seq_len, seed, split, part, cfg.cache_dir, tokens[i])
                 for i, src in enumerate(sources)]
    return WindowDataset(providers, weights, [s.kind for s in sources], cfg.seq_len, seed, split,
                         [0 if s.kind in REAL_KINDS + ("prepared",) else used[i] for i, s in enumerate(sources)])


def eval_windows(cfg: DataConfig, tokenizer, seed: int, n: Optional[int] = None,
                 batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: windows 0..n-1 (n = cfg.val_windows) of the val
    split, as batches of up to batch_size rows (fields as from Batcher)."""
    ds = build_dataset(cfg, tokenizer, "val", seed)
    n = cfg.val_windows if n is None else n
    return [collate([ds[i] for i in range(lo, min(n, lo + batch_size))]) for lo in range(0, n, batch_size)]


def _task_batches(task, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Windows 0..n-1 of a synthetic task, packed and collated in batches of up to batch_size."""
    items = []
    for i in range(n):
        item = pack_window(*task.window(i))
        item["source"] = torch.tensor(0, dtype=torch.int64)
        items.append(item)
    return [collate(items[lo:lo + batch_size]) for lo in range(0, n, batch_size)]


def passkey_examples(tokenizer, seq_len: int, depth: float, n: int, seed: int, key_digits: int = 5,
                     batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """n passkey windows of seq_len tokens with the needle at `depth`, as batches.

    Examples i = 0..n-1 use the same keys and filler offsets for every seq_len
    and depth at one seed, so a length x depth grid compares like with like.
    Score with answer_span_correct(logits.argmax(-1), batch["labels"], batch["answer_mask"]).
    """
    task = PasskeyTask(tokenizer, seq_len, (seed, SPLIT_CODES["eval"], PURPOSE_TASK, 0), depth, key_digits)
    return _task_batches(task, n, batch_size)


def mqar_examples(tokenizer, seq_len: int, n: int, seed: int, n_pairs: int = 16, n_queries: int = 4,
                  batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """n held-out MQAR windows of seq_len tokens (n_pairs pairs, n_queries queries each), as batches.

    Drawn from the "eval" split's seed stream, so they never coincide with a
    training or validation window of a run with the same seed. Score each query
    with answer_span_correct(logits.argmax(-1), batch["labels"], batch["answer_mask"]).
    """
    task = MQARTask(tokenizer, seq_len, (seed, SPLIT_CODES["eval"], PURPOSE_TASK, 1), n_pairs, n_queries)
    return _task_batches(task, n, batch_size)
