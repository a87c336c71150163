"""Packing documents into fixed training windows, and the document-boundary helpers.

Shapes: T = seq_len (tokens the model sees per row), W = T + 1 (tokens in a
window: inputs plus the one extra target), B = batch rows, D = documents,
N = documents (segments) in a flattened batch.

Layout. Every document is stored as `[bos] + tokens + [eos]` (bos only when the
tokenizer has one). Documents are concatenated into one stream per epoch, in
a seeded shuffled order (reader.py: blocks of documents, then documents within
a block), and the epochs follow each other into an infinite stream. Window k is stream[k*T : k*T + W]:
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

Chat sources (chat_stream.py) pack whole conversations instead, one window
never overlapping the next, and pass a loss mask: labels are -100 also where
the target is not a trained (assistant) token, and at the padding.

`seq_ids_from_position_ids` and `cu_seqlens_from_position_ids` turn
position_ids back into the document structure the mixers and flash-attn use;
they rely on every row starting at position 0, which `pack_window` guarantees.
Compute them on the full window, before a context-parallel split.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from loom.models import seq_ids_from_position_ids  # noqa: F401  (re-exported: the data path's seq_ids)

IGNORE_INDEX = -100


def seeded_rng(*keys: int) -> np.random.Generator:
    """numpy Generator seeded from a tuple of ints (platform-independent)."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])


def pack_window(tokens: np.ndarray, doc_start: np.ndarray, answer: Optional[np.ndarray] = None,
                loss: Optional[np.ndarray] = None) -> dict[str, torch.Tensor]:
    """Model fields of one window.

    tokens (W,) int, doc_start (W,) bool, answer (W,) bool or None (True at
    answer tokens), loss (W,) bool or None (chat sources: True at tokens the
    loss is taken on; a label whose target token is False becomes -100).
    Returns input_ids, labels, position_ids (T,) int64 and answer_mask (T,)
    bool, as described in the module docstring.
    """
    T = len(tokens) - 1
    labels = tokens[1:].astype(np.int64)
    labels[doc_start[1:]] = IGNORE_INDEX
    if loss is not None:
        labels[~loss[1:].astype(bool)] = IGNORE_INDEX
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
