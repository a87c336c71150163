"""Packing documents into fixed training windows, and the document-boundary helpers.

Shapes: T = seq_len (tokens the model sees per row), W = T + 1 (tokens in a
window: inputs plus the one extra target), B = batch rows, D = documents,
N = documents (segments) in a flattened batch.

Layout. Every document is stored as `[bos] + tokens + [eos]` (bos only when the
tokenizer has one). Documents are concatenated into one stream per epoch, in
an order shuffled with a generator seeded by (seed key, epoch), and the epochs
follow each other into an infinite stream. Window k is stream[k*T : k*T + W]:
consecutive windows overlap by exactly one token, so the inputs of consecutive
windows concatenate to the stream and every token is a target exactly once.
A window may span an epoch boundary; nothing is ever padded.

Per window (all (T,)):
  input_ids     window[:-1]
  labels        window[1:], with -100 where the target starts a new document
                (predicting a document's first token from the previous one would
                leak across the boundary that attention masks out)
  position_ids  0, 1, 2, ... restarting at 0 at every document start *and* at
                the window start (a window that begins mid-document numbers the
                visible part of that document from 0, as the model sees it)
  answer_mask   True at label positions whose target is an answer token
                (synthetic tasks), False elsewhere

`seq_ids_from_position_ids` and `cu_seqlens_from_position_ids` turn
position_ids back into the document structure the mixers and flash-attn use;
they rely on every row starting at position 0, which `pack_window` guarantees.
Compute them on the full window, before a context-parallel split.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from loom.models import seq_ids_from_position_ids  # noqa: F401  (re-exported: the data path's seq_ids)

IGNORE_INDEX = -100


def seeded_rng(*keys: int) -> np.random.Generator:
    """numpy Generator seeded from a tuple of ints (platform-independent)."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])


def tokenize_documents(tokenizer, docs: list[str], chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents into one flat buffer.

    Returns tokens (N,) int32 (each document as [bos] + ids + [eos]) and
    offsets (D+1,) int64, document d being tokens[offsets[d]:offsets[d+1]].
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [tokenizer.eos_id]
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(docs), dtype=np.int64)
    for start in range(0, len(docs), chunk):
        for j, ids in enumerate(tokenizer.encode_batch(docs[start:start + chunk])):
            pieces.append(np.asarray(bos + ids + eos, dtype=np.int32))
            lengths[start + j] = len(pieces[-1])
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return tokens, offsets


class PackedStream:
    """The infinite, epoch-shuffled stream of a tokenized corpus, cut into windows.

    tokens (N,) int32 and offsets (D+1,) int64 as from `tokenize_documents`;
    seed_key: ints that, with the epoch number, seed each epoch's document order.

    Example:
        >>> s = PackedStream(tokens, offsets, seq_len=512, seed_key=(seed, 0, 0))
        >>> toks, starts = s.window(7)   # (513,) int64, (513,) bool
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, seed_key: tuple[int, ...]):
        if len(offsets) < 2 or offsets[-1] == 0:
            raise ValueError("cannot pack an empty corpus")
        self.tokens = tokens
        self.offsets = offsets
        self.lengths = np.diff(offsets)
        self.seq_len = seq_len
        self.seed_key = tuple(seed_key)
        self.epoch_tokens = int(offsets[-1])
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def n_docs(self) -> int:
        return len(self.lengths)

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (D,), starts (D+1,)): document order of epoch e and stream offsets."""
        if e not in self._epochs:
            order = seeded_rng(*self.seed_key, e).permutation(self.n_docs)
            starts = np.zeros(self.n_docs + 1, dtype=np.int64)
            np.cumsum(self.lengths[order], out=starts[1:])
            self._epochs[e] = (order, starts)
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (W,) int64 of window k and doc_start (W,) bool (True at a document's first token)."""
        W = self.seq_len + 1
        lo = k * self.seq_len
        out = np.empty(W, dtype=np.int64)
        doc_start = np.zeros(W, dtype=bool)
        filled = 0
        while filled < W:
            e, pos = divmod(lo + filled, self.epoch_tokens)
            order, starts = self._epoch(e)
            end = min(self.epoch_tokens, pos + W - filled)   # stream range [pos, end) of epoch e
            j = int(np.searchsorted(starts, pos, side="right")) - 1
            while pos < end:
                doc, doc_lo = order[j], starts[j]
                if pos == doc_lo:
                    doc_start[filled] = True
                n = min(end, starts[j + 1]) - pos
                src = self.offsets[doc] + (pos - doc_lo)
                out[filled:filled + n] = self.tokens[src:src + n]
                filled += n
                pos += n
                j += 1
        return out, doc_start


def pack_window(tokens: np.ndarray, doc_start: np.ndarray,
                answer: Optional[np.ndarray] = None) -> dict[str, torch.Tensor]:
    """Model fields of one window.

    tokens (W,) int, doc_start (W,) bool, answer (W,) bool or None (True at
    answer tokens). Returns input_ids, labels, position_ids (T,) int64 and
    answer_mask (T,) bool, as described in the module docstring.
    """
    T = len(tokens) - 1
    labels = tokens[1:].astype(np.int64)
    labels[doc_start[1:]] = IGNORE_INDEX
    starts = doc_start[:-1].copy()
    starts[0] = True
    idx = np.arange(T)
    position_ids = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    answer_mask = np.zeros(T, dtype=bool) if answer is None else answer[1:].astype(bool)
    return {
        "input_ids": torch.from_numpy(tokens[:-1].astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
        "answer_mask": torch.from_numpy(answer_mask),
    }


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document boundaries of the flattened batch, as flash-attn's varlen API expects.

    position_ids (B, T) -> cu_seqlens (N+1,) int32: the offsets, in the (B*T,)
    flattening, of every document start plus B*T at the end. Each row start
    is a boundary, so no document spans two rows.
    """
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]          # (N,)
    end = torch.tensor([B * T], dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)
