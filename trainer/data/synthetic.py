"""Synthetic tasks that fill one training window exactly: passkey, MQAR and copy.

Shapes: T = seq_len, W = T + 1 tokens per window.

Every example is a pure function of (seed key, index): its generator is seeded
from both, so examples do not depend on iteration order. Examples are built in
token space, segment by segment (each segment tokenized on its own), so the
answer tokens are known exactly and the window is exactly W tokens long; the
filler is cut at a token boundary to make the length exact.

passkey:
    [bos] filler_a  "The pass key is 68157. Remember it. "  filler_b
    "What is the pass key? The pass key is " 68157 [eos]
  Filler is the repeated sentences of FILLER, starting at a random sentence,
  cut at the front so the whole window is W tokens. The needle goes at the
  sentence boundary nearest to `depth` x (filler length): depth 0 puts it right
  after bos, depth 1 right before the question. `depth=None` draws it
  uniformly per example. Answer: the key digits (`key_digits` digits, first
  one non-zero).

mqar (multi-query associative recall):
    [bos] k1:v1 k2:v2 ... kn:vn  filler  q1:v(q1) q2:v(q2) ... [eos]
  Keys are distinct 3-letter lowercase words, values 3-digit numbers; the
  queries are `n_queries` distinct keys in random order. Answers: the value
  tokens after each query key; the filler between pairs and queries is what
  makes the task long-range.

copy (induction warm-up; dense long-range signal):
    [bos] s s s ...
  s is `period` random characters from ALPHABET (each its own token segment),
  repeated to fill the window and cut at the end; `period` is drawn per
  example from [min_period, max_period]. Every token after the first copy of s
  is predictable only by looking `period` tokens back; they form the answer
  (one span per row). Mixed into passkey / MQAR training, it gives the
  copy ("induction") mechanism that both tasks need a signal on most tokens
  instead of a few answer tokens per window.

Answers are marked by a (W,) bool array over window tokens; `pack_window` turns
it into answer_mask (T,) over label positions. Each contiguous run of True is
one answer (passkey: one per row; mqar: one per query), which is how
`answer_span_correct` scores them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from loom.trainer.data.packing import seeded_rng

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
          "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is "


class _Encoder:
    """Tokenizer wrapper with a cache for the fixed strings the tasks repeat."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.eos = [tokenizer.eos_id]
        self._cache: dict[str, list[int]] = {}
        self.sentences = [self.fixed(s + " ") for s in FILLER]

    def fixed(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text)
        return self._cache[text]

    def __call__(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def filler(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n filler tokens and the sentence boundaries in [0, n] (ascending, including 0 and n)."""
        first = int(rng.integers(len(self.sentences)))
        order = self.sentences[first:] + self.sentences[:first]
        cycle = np.concatenate([np.asarray(s, dtype=np.int64) for s in order])
        ends = np.cumsum([len(s) for s in order])                        # sentence ends in one cycle
        reps = max(1, -(-n // len(cycle)))
        excess = reps * len(cycle) - n                                    # tokens cut from the front
        bounds = (np.arange(reps)[:, None] * len(cycle) + ends[None]).ravel() - excess
        bounds = np.unique(np.concatenate([[0, n], bounds[(bounds >= 0) & (bounds <= n)]]))
        return np.tile(cycle, reps)[excess:], bounds


def _assemble(segments: list[tuple[list[int] | np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in segments])
    answer = np.concatenate([np.full(len(s), a, dtype=bool) for s, a in segments])
    return tokens, answer


class PasskeyTask:
    """Passkey retrieval windows of seq_len + 1 tokens.

    seed_key: ints that, with the index, seed each example.
    depth: relative needle depth in [0, 1], or None for uniform per example.

    Example:
        >>> task = PasskeyTask(tok, seq_len=1024, seed_key=(0, 2), depth=0.5)
        >>> tokens, doc_start, answer = task.window(3)     # (1025,) each
    """

    def __init__(self, tokenizer, seq_len: int, seed_key: tuple[int, ...],
                 depth: Optional[float] = None, key_digits: int = 5):
        self.enc = _Encoder(tokenizer)
        self.seq_len = seq_len
        self.seed_key = tuple(seed_key)
        self.depth = depth
        self.key_digits = key_digits

    def example(self, index: int) -> dict:
        """Window arrays plus metadata: key (str), depth (float, requested), needle_start (int token index)."""
        rng = seeded_rng(*self.seed_key, index)
        key = str(int(rng.integers(1, 10))) + "".join(str(d) for d in rng.integers(0, 10, self.key_digits - 1))
        depth = float(rng.uniform()) if self.depth is None else self.depth
        needle = self.enc(f"The pass key is {key}. Remember it. ")
        question, answer = self.enc.fixed(QUESTION), self.enc(key)
        W = self.seq_len + 1
        n_fill = W - len(self.enc.bos) - len(needle) - len(question) - len(answer) - 1
        if n_fill < 0:
            raise ValueError(f"passkey needs seq_len >= {W - n_fill - 1} with key_digits={self.key_digits}, "
                             f"got seq_len={self.seq_len}")
        filler, bounds = self.enc.filler(rng, n_fill)
        cut = int(bounds[np.argmin(np.abs(bounds - depth * n_fill))])
        tokens, is_answer = _assemble([(self.enc.bos, False), (filler[:cut], False), (needle, False),
                                       (filler[cut:], False), (question, False), (answer, True),
                                       (self.enc.eos, False)])
        doc_start = np.zeros(W, dtype=bool)
        doc_start[0] = True
        return {"tokens": tokens, "doc_start": doc_start, "answer": is_answer,
                "key": key, "depth": depth, "needle_start": len(self.enc.bos) + cut}

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ex = self.example(index)
        return ex["tokens"], ex["doc_start"], ex["answer"]


class MQARTask:
    """Multi-query associative recall windows of seq_len + 1 tokens.

    n_pairs key-value pairs, then filler, then n_queries (<= n_pairs) queries.

    Example:
        >>> task = MQARTask(tok, seq_len=512, seed_key=(0, 2), n_pairs=16, n_queries=4)
        >>> tokens, doc_start, answer = task.window(0)     # (513,) each
    """

    def __init__(self, tokenizer, seq_len: int, seed_key: tuple[int, ...],
                 n_pairs: int = 16, n_queries: int = 4):
        if not 1 <= n_queries <= n_pairs <= 26**3:
            raise ValueError(f"mqar needs 1 <= n_queries <= n_pairs <= {26**3}, "
                             f"got n_pairs={n_pairs}, n_queries={n_queries}")
        self.enc = _Encoder(tokenizer)
        self.seq_len = seq_len
        self.seed_key = tuple(seed_key)
        self.n_pairs = n_pairs
        self.n_queries = n_queries

    def example(self, index: int) -> dict:
        """Window arrays plus metadata: pairs (list of (key, value) str) and queries (list of keys)."""
        rng = seeded_rng(*self.seed_key, index)
        codes = rng.choice(26**3, size=self.n_pairs, replace=False)
        keys = ["".join(chr(97 + c // 26**p % 26) for p in (2, 1, 0)) for c in codes]
        values = [f"{v:03d}" for v in rng.integers(0, 1000, self.n_pairs)]
        asked = rng.choice(self.n_pairs, size=self.n_queries, replace=False)
        sep = self.enc.fixed(" ")
        head = [(self.enc.bos, False)]
        for k, v in zip(keys, values):
            head += [(self.enc.fixed(f"{k}:"), False), (self.enc.fixed(v), False), (sep, False)]
        tail = []
        for q in asked:
            tail += [(self.enc.fixed(f"{keys[q]}:"), False), (self.enc.fixed(values[q]), True), (sep, False)]
        tail.append((self.enc.eos, False))
        W = self.seq_len + 1
        n_fill = W - sum(len(s) for s, _ in head + tail)
        if n_fill < 0:
            raise ValueError(f"mqar with n_pairs={self.n_pairs}, n_queries={self.n_queries} needs "
                             f"seq_len >= {W - n_fill - 1}, got seq_len={self.seq_len}")
        filler, _ = self.enc.filler(rng, n_fill)
        tokens, is_answer = _assemble(head + [(filler, False)] + tail)
        doc_start = np.zeros(W, dtype=bool)
        doc_start[0] = True
        return {"tokens": tokens, "doc_start": doc_start, "answer": is_answer,
                "pairs": list(zip(keys, values)), "queries": [keys[q] for q in asked]}

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ex = self.example(index)
        return ex["tokens"], ex["doc_start"], ex["answer"]


class CopyTask:
    """Windows of seq_len + 1 tokens holding a random string repeated.

    Example:
        >>> task = CopyTask(tok, seq_len=128, seed_key=(0, 2), min_period=32, max_period=64)
        >>> tokens, doc_start, answer = task.window(0)     # (129,) each
    """

    ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, tokenizer, seq_len: int, seed_key: tuple[int, ...], min_period: int = 32,
                 max_period: int = 64):
        if not 1 <= min_period <= max_period:
            raise ValueError(f"copy needs 1 <= min_period <= max_period, got {min_period}, {max_period}")
        self.enc = _Encoder(tokenizer)
        self.seq_len = seq_len
        self.seed_key = tuple(seed_key)
        self.min_period, self.max_period = min_period, max_period
        self.chars = [np.asarray(self.enc.fixed(c), dtype=np.int64) for c in self.ALPHABET]

    def example(self, index: int) -> dict:
        """Window arrays plus metadata: text (str, the repeated string s) and period (int, tokens of s)."""
        rng = seeded_rng(*self.seed_key, index)
        n_chars = int(rng.integers(self.min_period, self.max_period + 1))
        picks = rng.integers(0, len(self.ALPHABET), n_chars)
        unit = np.concatenate([self.chars[i] for i in picks])
        W = self.seq_len + 1
        n = W - len(self.enc.bos)
        if n < 2 * len(unit):
            raise ValueError(f"copy with max_period={self.max_period} needs seq_len >= "
                             f"{2 * len(unit) + len(self.enc.bos) - 1}, got seq_len={self.seq_len}")
        body = np.tile(unit, -(-n // len(unit)))[:n]
        tokens, is_answer = _assemble([(self.enc.bos, False), (body[:len(unit)], False), (body[len(unit):], True)])
        doc_start = np.zeros(W, dtype=bool)
        doc_start[0] = True
        return {"tokens": tokens, "doc_start": doc_start, "answer": is_answer,
                "text": "".join(self.ALPHABET[i] for i in picks), "period": len(unit)}

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ex = self.example(index)
        return ex["tokens"], ex["doc_start"], ex["answer"]


def answer_span_correct(pred: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Whether each answer was predicted entirely right (teacher-forced).

    pred (B, T) predicted next-token ids (argmax of logits at each position),
    labels (B, T), answer_mask (B, T) bool. An answer is a contiguous run of
    True in a row of answer_mask. Returns (N,) bool over the N answers in
    row-major order (passkey: one per row; mqar: one per query).
    """
    B, T = answer_mask.shape
    prev = torch.zeros_like(answer_mask)
    prev[:, 1:] = answer_mask[:, :-1]
    span_start = (answer_mask & ~prev).reshape(-1)                        # (B*T,)
    span_id = span_start.to(torch.int64).cumsum(0) - 1                    # (B*T,)
    m = answer_mask.reshape(-1)
    wrong = (pred != labels).reshape(-1)[m].to(torch.int64)
    n_wrong = torch.zeros(int(span_start.sum()), dtype=torch.int64, device=pred.device)
    n_wrong.index_add_(0, span_id[m], wrong)
    return n_wrong == 0
