"""Entry points of the data path: the training mixture, evaluation windows and the
synthetic evaluation tasks, each a pure function of (config, seed, split, index)."""
from __future__ import annotations

from typing import Optional

import torch

from loom.trainer.data.batcher import collate
from loom.trainer.data.config import DataConfig, validate_data_config
from loom.trainer.data.dataset import (PURPOSE_MIX, PURPOSE_TASK, SPLIT_CODES, MixtureSchedule, WindowDataset,
                                       make_source)
from loom.trainer.data.packing import pack_window
from loom.trainer.data.prepare import REAL_KINDS
from loom.trainer.data.synthetic import MQARTask, PasskeyTask


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
