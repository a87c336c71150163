"""Windows of whole conversations over prepared chat shards (tokens + loss mask).

Shapes: T = seq_len, W = T + 1 (a window's tokens), D = conversations.

`ChatStream(shards, dtype, seq_len, seed_key, ...)` is the window provider of
a prepared chat source (shards with a .mask file, trainer/data/chat.py).
Unlike the pre-training stream (reader.py), which cuts a concatenated stream
into windows anywhere, conversations are packed whole:

  - each epoch takes the conversations in a seeded order (seed_key, epoch) and
    fills windows next-fit: a conversation goes into the current window when
    it fits in the W tokens left, else it opens the next window; the unused
    tail of a window is padding (pad_id, no loss, its own segment);
  - every conversation starts a new segment (doc_start, so position_ids reset
    and no attention or recurrent state crosses into it: the packer's
    document boundaries);
  - a conversation longer than W is never cut silently: too_long="truncate"
    keeps its first W tokens alone in a window, "skip" leaves it out; both are
    counted (`truncated`, `skipped`; the trainer logs them at start-up and
    `loom data stats DIR --seq-len T` reports them before training).

`window(k)` -> tokens (W,) int64, doc_start (W,) bool, answer (W,) bool (all
False) and loss (W,) bool (True at tokens the loss is taken on), a pure
function of (shards, filters, seed_key, k): the packing of an epoch depends
only on its seeded order, so resume is exact at any world size. token_offset
(a seq_len schedule stage starting where the previous one ended) starts the
stage at packed window token_offset // T of this stage's packing.

Memory: 20 bytes per conversation for the index, plus the packing of the
cached epochs (8 bytes per window): SFT corpora (millions of conversations)
fit; tokens and masks are memory-mapped and checked against their per-block
crc32 the first time a window touches a block (prepared.check_block).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from loom.trainer.data.packing import seeded_rng
from loom.trainer.data.prepared import CRC_DOCS, Shard, check_block, shard_lengths

_EPOCH_CACHE = 2


def pack_next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Window starts (n+1,) int64 into a sequence of items of these lengths (each <= capacity),
    packed next-fit: item j opens a new window when it does not fit in the current one."""
    starts = [0]
    used = 0
    for j, L in enumerate(lengths.tolist()):
        if used + L > capacity:
            starts.append(j)
            used = 0
        used += L
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class ChatStream:
    """Window provider over prepared chat shards (module docstring).

    Example:
        >>> s = ChatStream(prep.split_shards("train"), prep.dtype, 512, (seed, 0, 0, 0), pad_id=tok.pad_id)
        >>> toks, starts, answer, loss = s.window(3)      # each (513,)
    """

    def __init__(self, shards: list[Shard], dtype: np.dtype, seq_len: int, seed_key: tuple[int, ...],
                 pad_id: int, min_tokens: int = 0, max_tokens: Optional[int] = None, too_long: str = "truncate",
                 token_offset: int = 0, name: str = "chat source"):
        if too_long not in ("truncate", "skip"):
            raise ValueError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
        if any(s.mask is None for s in shards):
            raise ValueError(f"{name}: a chat stream needs shards with loss masks (prepared from a chat source)")
        self.shards, self.dtype, self.seq_len = shards, dtype, seq_len
        self.seed_key, self.pad_id, self.too_long = tuple(seed_key), pad_id, too_long
        W = seq_len + 1
        sh, off, ln, idx = [], [], [], []
        for si, shard in enumerate(shards):
            lengths = shard_lengths(shard)
            sh.append(np.full(len(lengths), si, dtype=np.int32))
            off.append(np.cumsum(lengths) - lengths)
            ln.append(lengths)
            idx.append(np.arange(len(lengths), dtype=np.int64))
        lengths = np.concatenate(ln) if ln else np.zeros(0, np.int64)
        keep = lengths >= min_tokens
        if max_tokens is not None:
            keep &= lengths <= max_tokens
        long = keep & (lengths > W)
        self.truncated = int(long.sum()) if too_long == "truncate" else 0
        self.skipped = int(long.sum()) if too_long == "skip" else 0
        if too_long == "skip":
            keep &= ~long
        self.doc_shard = np.concatenate(sh)[keep] if sh else np.zeros(0, np.int32)
        self.doc_offset = np.concatenate(off)[keep] if off else np.zeros(0, np.int64)
        self.doc_index = np.concatenate(idx)[keep] if idx else np.zeros(0, np.int64)
        self.doc_len = np.minimum(lengths[keep], W)
        self.documents = int(keep.sum())
        if self.documents == 0:
            raise ValueError(f"{name} has no conversations" + (
                f" of at most {W} tokens (too_long: skip)" if self.skipped else ""))
        self.start_window = token_offset // seq_len
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epoch_windows: list[int] = []
        self._maps: dict[tuple[int, str], np.memmap] = {}
        self._checked: set[tuple[int, int]] = set()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (D,), window starts (n+1,)) of epoch e."""
        if e not in self._epochs:
            order = seeded_rng(*self.seed_key, e).permutation(self.documents)
            self._epochs[e] = (order, pack_next_fit(self.doc_len[order], self.seq_len + 1))
            if len(self._epochs) > _EPOCH_CACHE:
                self._epochs.pop(min(k for k in self._epochs if k != e))
        return self._epochs[e]

    def _locate(self, k: int) -> tuple[int, int]:
        """(epoch, window within it) of packed window k."""
        e = 0
        while True:
            if e == len(self._epoch_windows):
                self._epoch_windows.append(len(self._epoch(e)[1]) - 1)
            if k < self._epoch_windows[e]:
                return e, k
            k -= self._epoch_windows[e]
            e += 1

    def _map(self, si: int, what: str) -> np.memmap:
        if (si, what) not in self._maps:
            shard = self.shards[si]
            self._maps[si, what] = (np.memmap(shard.tokens, dtype=self.dtype, mode="r") if what == "tokens"
                                    else np.memmap(shard.mask, dtype=np.uint8, mode="r"))
        return self._maps[si, what]

    def _check(self, si: int, doc: int) -> None:
        c = doc // CRC_DOCS
        if (si, c) in self._checked:
            return
        ends = np.memmap(self.shards[si].index, dtype="<u8", mode="r")
        first = c * CRC_DOCS
        span = (int(ends[first - 1]) if first else 0, int(ends[min(first + CRC_DOCS, len(ends)) - 1]))
        del ends
        check_block(self.shards[si], c, self._map(si, "tokens"), span)
        check_block(self.shards[si], c, self._map(si, "mask"), span, mask=True)
        self._checked.add((si, c))

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tokens (W,) int64, doc_start (W,) bool, answer (W,) bool, loss (W,) bool of window k."""
        W = self.seq_len + 1
        e, j = self._locate(self.start_window + k)
        order, starts = self._epoch(e)
        tokens = np.full(W, self.pad_id, dtype=np.int64)
        doc_start = np.zeros(W, dtype=bool)
        loss = np.zeros(W, dtype=bool)
        pos = 0
        for d in order[starts[j]:starts[j + 1]]:
            si, off, n = int(self.doc_shard[d]), int(self.doc_offset[d]), int(self.doc_len[d])
            self._check(si, int(self.doc_index[d]))
            tokens[pos:pos + n] = self._map(si, "tokens")[off:off + n]
            loss[pos:pos + n] = self._map(si, "mask")[off:off + n] != 0
            doc_start[pos] = True
            pos += n
        if pos < W:
            doc_start[pos] = True       # the padding is a segment of its own
        return tokens, doc_start, np.zeros(W, dtype=bool), loss
