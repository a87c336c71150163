"""WindowDataset: an infinite, seeded mixture of packed real text and synthetic tasks.

Shapes: T = seq_len, W = T + 1, S = number of sources.

`dataset[i]` is a pure function of (sources, seed, split, i): the mixture
schedule decides which source window i comes from and which window k of that
source it is, and each source's window k is itself a pure function of
(seed, split, source index, k). Nothing depends on what was read before, so a
run resumes exactly from a single integer (windows consumed) and data-parallel
ranks can read disjoint windows without coordination.

Mixture schedule (a seeded, stratified draw with the source weights): the
window indices are cut into blocks of MIX_BLOCK = 1024. In every block source s
gets a fixed quota of windows, its weight share of 1024 rounded by largest
remainder, and the order of the block is a permutation seeded by (seed, split,
block). So source s's k-th window is window k of its own stream, no source
window is skipped, and the weights hold exactly over every block.

Seeds: every generator is seeded by (seed, split code, purpose, source index,
...), with split codes SPLIT_CODES and purposes shuffle (document order of an
epoch), mix (block order) and task (one synthetic example).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from loom.trainer.data.chat_stream import ChatStream
from loom.trainer.data.packing import pack_window, seeded_rng
from loom.trainer.data.prepare import ensure_prepared
from loom.trainer.data.prepared import ManifestError, open_prepared
from loom.trainer.data.reader import PreparedStream
from loom.trainer.data.synthetic import CopyTask, MQARTask, PasskeyTask

log = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "val": 1, "eval": 2}
PURPOSE_SHUFFLE, PURPOSE_MIX, PURPOSE_TASK = 0, 1, 2
MIX_BLOCK = 1024


class MixtureSchedule:
    """Maps a global window index to (source index, window index within that source).

    weights: S positive floats. seed_key: ints seeding each block's order.
    """

    def __init__(self, weights: list[float], seed_key: tuple[int, ...]):
        w = np.asarray(weights, dtype=np.float64)
        raw = w / w.sum() * MIX_BLOCK
        quota = np.floor(raw).astype(np.int64)
        for s in np.argsort(-(raw - quota), kind="stable")[: MIX_BLOCK - quota.sum()]:
            quota[s] += 1
        if (quota == 0).any():
            s = int(np.nonzero(quota == 0)[0][0])
            raise ValueError(f"source {s} has weight {weights[s]}, below 1/{MIX_BLOCK} of the total; "
                             "raise it or drop the source")
        self.quota = quota
        self.seed_key = tuple(seed_key)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            assign = np.repeat(np.arange(len(self.quota)), self.quota)        # (MIX_BLOCK,)
            src = assign[seeded_rng(*self.seed_key, b).permutation(MIX_BLOCK)]
            rank = np.empty(MIX_BLOCK, dtype=np.int64)                       # order within its source
            for s in range(len(self.quota)):
                where = np.nonzero(src == s)[0]
                rank[where] = np.arange(len(where))
            self._blocks[b] = (src, b * self.quota[src] + rank)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def count(self, s: int, n: int) -> int:
        """Windows of source s among global windows 0..n-1."""
        full, rest = divmod(n, MIX_BLOCK)
        if len(self.quota) == 1:
            return n
        return int(full * self.quota[s] + (self._block(full)[0][:rest] == s).sum())

    def locate(self, i: int) -> tuple[int, int]:
        if len(self.quota) == 1:
            return 0, i
        src, local = self._block(i // MIX_BLOCK)
        return int(src[i % MIX_BLOCK]), int(local[i % MIX_BLOCK])


class WindowDataset:
    """Infinite map-style dataset of packed windows.

    sources: S window providers (`window(k)` -> tokens (W,), doc_start (W,)
    [, answer (W,)]), weights: S floats, names: S labels for logs;
    window_offsets: S ints added to each source's window index (seq_len stages).

    `dataset[i]` -> dict of input_ids, labels, position_ids (T,) int64,
    answer_mask (T,) bool and source () int64 (index into `names`).
    There is no __len__: the stream cycles epochs forever.

    Example:
        >>> ds = build_dataset(DataConfig(seq_len=256), load_tokenizer("byte"), "train", seed=0)
        >>> ds[12345]["input_ids"].shape
        torch.Size([256])
    """

    def __init__(self, sources: list, weights: list[float], names: list[str], seq_len: int,
                 seed: int, split: str, window_offsets: Optional[list[int]] = None):
        self.sources = sources
        self.window_offsets = window_offsets or [0] * len(sources)
        self.names = names
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        self.schedule = MixtureSchedule(weights, (seed, SPLIT_CODES[split], PURPOSE_MIX))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            raise IndexError(f"window index must be >= 0, got {i}")
        s, k = self.schedule.locate(i)
        item = pack_window(*self.sources[s].window(self.window_offsets[s] + k))
        item["source"] = torch.tensor(s, dtype=torch.int64)
        return item

    def __repr__(self) -> str:
        return f"WindowDataset(split={self.split!r}, seq_len={self.seq_len}, sources={self.names})"


def make_source(src, index: int, tokenizer, seq_len: int, seed: int, split: str, part: str,
                cache_dir: Optional[str] = None, token_offset: int = 0):
    """Window provider for one SourceConfig at position `index` of its list.

    part: which documents of a real-text source ("train", "val" or "all");
    a raw source (files, hub, stdlib) is prepared into cache_dir on first use.
    token_offset: stream position of window 0 of a real-text source.
    """
    code = SPLIT_CODES[split]
    if src.kind == "passkey":
        return PasskeyTask(tokenizer, seq_len, (seed, code, PURPOSE_TASK, index), src.depth, src.key_digits)
    if src.kind == "mqar":
        return MQARTask(tokenizer, seq_len, (seed, code, PURPOSE_TASK, index), src.n_pairs, src.n_queries)
    if src.kind == "copy":
        return CopyTask(tokenizer, seq_len, (seed, code, PURPOSE_TASK, index), src.min_period, src.max_period)
    path = src.path if src.kind == "prepared" else ensure_prepared(src, tokenizer, cache_dir)
    prep = open_prepared(path, tokenizer)
    shards = prep.split_shards(part)
    name = f"data.sources[{index}] ({src.kind}, {prep.path}, {part} split)"
    if not any(s.documents for s in shards):
        raise ManifestError(f"{name} has no documents; give data.val_sources or prepare with a larger "
                            "val_fraction" if part == "val" else f"{name} has no documents")
    if any(s.mask is not None for s in shards):     # a chat source: whole conversations with loss masks
        stream = ChatStream(shards, prep.dtype, seq_len, (seed, code, PURPOSE_SHUFFLE, index), tokenizer.pad_id,
                            src.min_tokens, src.max_tokens, src.too_long, token_offset, name)
        if stream.truncated or stream.skipped:
            log.warning("%s: %d conversations longer than %d tokens %s", name, stream.truncated or stream.skipped,
                        seq_len + 1, "truncated" if stream.truncated else "skipped")
        return stream
    return PreparedStream(shards, prep.dtype, seq_len, (seed, code, PURPOSE_SHUFFLE, index), src.min_tokens,
                          src.max_tokens, src.length_upsample, token_offset, name)
