"""`loom data stats DIR`: documents, tokens, length percentiles and long-document shares of a prepared folder.

Reads only the document indexes (8 bytes per document, memory-mapped), never
the tokens. The length histogram (log-spaced bins) goes to a PNG when
matplotlib is installed (the `data` extra).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from loom.trainer.data.prepared import open_prepared, shard_lengths

LONG_THRESHOLDS = (4096, 16384, 65536, 131072)
PERCENTILES = (10, 50, 90, 99)


def length_stats(path: str, part: str = "all", seq_len: Optional[int] = None) -> dict:
    """Summary of document lengths (tokens, with bos/eos) of a prepared folder's part.

    A chat folder (loss masks) adds `loss_tokens` (tokens the loss is taken on) and,
    given seq_len, `too_long`: the conversations longer than a window of seq_len + 1
    tokens, which training truncates or skips (counted by either name).
    """
    prep = open_prepared(path, verify=False)
    shards = prep.split_shards(part)
    lengths = [shard_lengths(s) for s in shards]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    tokens = int(lengths.sum())
    out = {"path": prep.path, "part": part, "documents": int(len(lengths)), "tokens": tokens,
           "dtype": prep.dtype.name, "tokenizer": prep.manifest["tokenizer"]["fingerprint"]}
    if len(lengths):
        out["mean"] = float(lengths.mean())
        out["max"] = int(lengths.max())
        out["percentiles"] = {p: float(np.percentile(lengths, p)) for p in PERCENTILES}
        out["share_tokens_longer_than"] = {t: float(lengths[lengths > t].sum() / max(tokens, 1))
                                           for t in LONG_THRESHOLDS}
    if any(s.mask is not None for s in shards):
        out["loss_tokens"] = sum(int(np.memmap(s.mask, dtype=np.uint8, mode="r").sum()) for s in shards
                                 if s.mask is not None and s.n_tokens)
        if seq_len is not None:
            out["seq_len"] = seq_len
            out["too_long"] = int((lengths > seq_len + 1).sum())
    out["_lengths"] = lengths
    return out


def format_stats(st: dict) -> str:
    lines = [f"{st['path']} ({st['part']}): {st['documents']:,} documents, {st['tokens']:,} tokens "
             f"({st['dtype']}, tokenizer {st['tokenizer']})"]
    if st["documents"]:
        pct = ", ".join(f"p{p} {v:,.0f}" for p, v in st["percentiles"].items())
        lines.append(f"document length (tokens): mean {st['mean']:,.1f}, {pct}, max {st['max']:,}")
        for t, share in st["share_tokens_longer_than"].items():
            lines.append(f"tokens in documents longer than {t // 1024}K: {share:.2%}")
    if "loss_tokens" in st:
        lines.append(f"chat: {st['loss_tokens']:,} of {st['tokens']:,} tokens take the loss "
                     f"({st['loss_tokens'] / max(st['tokens'], 1):.2%})")
    if "too_long" in st:
        lines.append(f"chat: {st['too_long']:,} conversations longer than {st['seq_len'] + 1:,} tokens "
                     f"(seq_len {st['seq_len']:,}): truncated or skipped in training, as too_long says")
    return "\n".join(lines)


def write_histogram(st: dict, png: str) -> Optional[str]:
    """Length histogram (documents and tokens per log-spaced bin) to png; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = st["_lengths"]
    if not len(lengths):
        return None
    bins = np.logspace(0, np.log10(max(lengths.max(), 2)) + 0.05, 60)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(lengths, bins=bins)
    a.set(xscale="log", xlabel="document length (tokens)", ylabel="documents", title="documents by length")
    b.hist(lengths, bins=bins, weights=lengths)
    b.set(xscale="log", xlabel="document length (tokens)", ylabel="tokens", title="tokens by document length")
    for ax in (a, b):
        for t in LONG_THRESHOLDS:
            ax.axvline(t, color="grey", lw=0.6, ls="--")
    fig.suptitle(f"{os.path.basename(st['path'])} ({st['part']}): {st['documents']:,} documents, "
                 f"{st['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
