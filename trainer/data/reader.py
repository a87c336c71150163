"""Memory-mapped windows over prepared shards: the one reading path for real text.

Shapes: T = seq_len, W = T + 1 (a window's tokens), D = documents, K = docs per block.

`PreparedStream(shards, dtype, seq_len, seed_key, ...)` is the window provider
of a prepared source: `window(k)` -> tokens (W,) int64, doc_start (W,) bool,
a pure function of (shards, filters, seed_key, k), like the in-memory packer
it replaces (packing.py describes the stream: documents concatenated in a
shuffled order, epoch after epoch, window k = stream[offset + k*T : offset + k*T + W]).

What stays in RAM does not grow with the tokens: token files are memory
maps read window by window; documents are grouped into blocks of K = BLOCK_DOCS
consecutive documents of a shard, and only per-block numbers are kept
(shard, first document, tokens: 20 bytes per K documents). An epoch's order is
a seeded permutation of the blocks followed, inside a block, by a seeded
permutation of its documents; a block's order is computed when a window
first touches it (LRU-cached), so start-up does one vectorised pass over the
document index (8 bytes per document, read by memory map) and nothing per
token. The first touch also checks the block's tokens against their crc32 in
the manifest (prepared.check_block), so no window is built from damaged data.

Length engineering (per source, at read time, so one prepared folder serves
many mixtures):
  min_tokens / max_tokens   keep documents whose length (with bos/eos) is in range;
  length_upsample           [[min_len, weight], ...]: a document of length >= min_len
                            (the largest such entry) is repeated `weight` times per
                            epoch in expectation (floor(weight) times, plus once more
                            with probability frac(weight), seeded per document).
The source's share of the mixture is set by the mixture schedule, in windows,
so upsampling changes what a source's windows hold, never how many there are.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from loom.trainer.data.packing import seeded_rng
from loom.trainer.data.prepared import CRC_DOCS, Shard, check_block, shard_lengths

BLOCK_DOCS = 1024
_BLOCK_CACHE = 64
_EPOCH_CACHE = 2


def _uniform(doc_ids: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per document id, from a splitmix64 hash of (salt, id):
    the same for a document whether drawn with its whole shard or its block."""
    with np.errstate(over="ignore"):
        z = doc_ids.astype(np.uint64) + np.uint64(salt % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def repeat_counts(lengths: np.ndarray, upsample: Sequence[Sequence[float]], u: np.ndarray) -> np.ndarray:
    """Copies per epoch (D,) int64 of documents of these lengths under length_upsample rules;
    u (D,) uniform numbers decide the fractional part."""
    weight = np.ones(len(lengths), dtype=np.float64)
    for min_len, w in sorted(upsample):
        weight[lengths >= min_len] = w
    whole = np.floor(weight)
    return (whole + (u < weight - whole)).astype(np.int64)


class PreparedStream:
    """Window provider over prepared shards (see the module docstring).

    shards: the Shard list of one part (prepared.Prepared.split_shards);
    dtype: their token dtype; seq_len: T; seed_key: ints seeding the epoch order;
    min_tokens, max_tokens, length_upsample: document selection;
    token_offset: stream position of window 0 (a seq_len schedule stage starts
    where the previous one ended).

    Example:
        >>> prep = open_prepared("data/stdlib", tokenizer)
        >>> s = PreparedStream(prep.split_shards("train"), prep.dtype, 512, (seed, 0, 0, 0))
        >>> toks, starts = s.window(7)       # (513,) int64, (513,) bool
    """

    def __init__(self, shards: list[Shard], dtype: np.dtype, seq_len: int, seed_key: tuple[int, ...],
                 min_tokens: int = 0, max_tokens: Optional[int] = None,
                 length_upsample: Sequence[Sequence[float]] = (), token_offset: int = 0, name: str = "source"):
        self.shards = shards
        self.dtype = dtype
        self.seq_len = seq_len
        self.seed_key = tuple(seed_key)
        self.token_offset = token_offset
        self.min_tokens, self.max_tokens, self.upsample = min_tokens, max_tokens, [tuple(r) for r in length_upsample]
        b_shard, b_lo, b_hi, b_tokens = [], [], [], []
        self.documents = 0
        for si, shard in enumerate(shards):
            lengths = shard_lengths(shard)
            reps = self._counts(lengths, si)
            self.documents += int(reps.sum())
            if len(lengths):
                los = np.arange(0, len(lengths), BLOCK_DOCS, dtype=np.int64)
                b_shard.append(np.full(len(los), si, dtype=np.int32))
                b_lo.append(los)
                b_hi.append(np.minimum(los + BLOCK_DOCS, len(lengths)))
                b_tokens.append(np.add.reduceat(lengths * reps, los))
        if not b_tokens:
            raise ValueError(f"{name} has no documents")
        self.block_shard, self.block_lo, self.block_hi, self.block_tokens = (
            np.concatenate(a) for a in (b_shard, b_lo, b_hi, b_tokens))
        self.epoch_tokens = int(self.block_tokens.sum())
        if self.epoch_tokens == 0:
            rule = "" if (min_tokens, max_tokens) == (0, None) else \
                f" within min_tokens={min_tokens}, max_tokens={max_tokens}"
            raise ValueError(f"{name} has no documents{rule}")
        self._maps: dict[int, np.memmap] = {}
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._checked: set[tuple[int, int]] = set()   # (shard, crc block) verified in this process

    def _counts(self, lengths: np.ndarray, shard: int, first: int = 0) -> np.ndarray:
        """Copies per epoch of documents first.. of a shard with these lengths (0 = filtered out)."""
        keep = lengths >= self.min_tokens
        if self.max_tokens is not None:
            keep &= lengths <= self.max_tokens
        if not self.upsample:
            return keep.astype(np.int64)
        salt = int.from_bytes(hashlib.sha256(repr((self.seed_key, shard)).encode()).digest()[:8], "little")
        u = _uniform(np.arange(first, first + len(lengths)), salt)
        return repeat_counts(lengths, self.upsample, u) * keep

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _tokens(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shards[shard].tokens, dtype=self.dtype, mode="r")
        return self._maps[shard]

    def _check(self, si: int, lo: int, hi: int, ends: np.ndarray) -> None:
        """crc32 of the checksummed blocks covering documents [lo, hi) of shard si, once each."""
        for c in range(lo // CRC_DOCS, (hi - 1) // CRC_DOCS + 1):
            if (si, c) not in self._checked:
                first = c * CRC_DOCS
                span = (int(ends[first - 1]) if first else 0, int(ends[min(first + CRC_DOCS, len(ends)) - 1]))
                check_block(self.shards[si], c, self._tokens(si), span)
                self._checked.add((si, c))

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (NB,), starts (NB+1,)): block order of epoch e and their stream offsets."""
        if e not in self._epochs:
            order = seeded_rng(*self.seed_key, e).permutation(len(self.block_tokens))
            starts = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.block_tokens[order], out=starts[1:])
            self._epochs[e] = (order, starts)
            if len(self._epochs) > _EPOCH_CACHE:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _block(self, e: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_lo (n,), doc_len (n,), starts (n+1,)) of block b's documents in epoch e's order:
        token offsets in the shard, lengths, and offsets within the block's stream."""
        key = (e, b)
        if key not in self._blocks:
            si, lo, hi = int(self.block_shard[b]), int(self.block_lo[b]), int(self.block_hi[b])
            ends = np.memmap(self.shards[si].index, dtype="<u8", mode="r")
            self._check(si, lo, hi, ends)
            ends_b = ends[max(lo - 1, 0):hi].astype(np.int64)
            del ends
            first = ends_b[0] if lo > 0 else 0
            doc_ends = ends_b[1:] if lo > 0 else ends_b
            doc_starts = np.concatenate([[first], doc_ends[:-1]])
            lengths = doc_ends - doc_starts
            reps = self._counts(lengths, si, lo)
            docs = np.repeat(np.arange(hi - lo), reps)
            docs = docs[seeded_rng(*self.seed_key, e, b).permutation(len(docs))]
            starts = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum(lengths[docs], out=starts[1:])
            self._blocks[key] = (doc_starts[docs], lengths[docs], starts)
            if len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        return self._blocks[key]

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (W,) int64 of window k and doc_start (W,) bool (True at a document's first token)."""
        W = self.seq_len + 1
        lo = self.token_offset + k * self.seq_len
        out = np.empty(W, dtype=np.int64)
        doc_start = np.zeros(W, dtype=bool)
        filled = 0
        while filled < W:
            e, pos = divmod(lo + filled, self.epoch_tokens)
            order, bstarts = self._epoch(e)
            j = int(np.searchsorted(bstarts, pos, side="right")) - 1
            b = int(order[j])
            doc_lo, doc_len, dstarts = self._block(e, b)
            toks = self._tokens(int(self.block_shard[b]))
            inner = pos - bstarts[j]
            d = int(np.searchsorted(dstarts, inner, side="right")) - 1
            block_end = min(W - filled, int(bstarts[j + 1]) - pos)    # tokens to take from this block
            taken = 0
            while taken < block_end:
                off = inner + taken - dstarts[d]
                if off == 0:
                    doc_start[filled] = True
                n = int(min(block_end - taken, doc_len[d] - off))
                src = int(doc_lo[d] + off)
                out[filled:filled + n] = toks[src:src + n]
                filled += n
                taken += n
                d += 1
        return out, doc_start
