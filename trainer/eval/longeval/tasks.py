"""RULER-style long-context tasks, regenerated offline from seeds.

Shapes: T = evaluation length (tokens the model reads), W = T + 1 tokens per
window (inputs plus the one extra target), as in loom.trainer.data.synthetic.

Every example is a pure function of (seed, task, length, index): the same
needles, keys and filler offsets at every length, so a row of the grid
compares like with like. Windows are built in token space, segment by segment,
so the answer tokens are known exactly and the window is exactly W tokens.

Each example is a dict:
    tokens (W,) int64, answer (W,) bool   True at answer tokens; each
        contiguous run is one answer span (scored on its own, teacher-forced)
    prompt_len int                        tokens before the first answer token
        (the prompt of greedy generation)
    refs list[str]                        the strings a generated answer must
        contain (RULER's string_match_all: score = share of refs found)
    depth float | None                    needle depth (single-needle tasks)

Tasks (RULER, Hsieh et al. 2024, shortened wording for small models):
    niah_single      one needle "The magic number for KEY is VALUE." in a
                     haystack, at `depth`; asked for that key's number.
    niah_multikey    4 needles with different keys; asked for one of them.
    niah_multivalue  4 needles with the same key; asked for all 4 values.
    niah_multiquery  4 needles with different keys; asked for all 4.
    vt               variable tracking: "VAR A = 12345." then a chain of
                     "VAR B = VAR A." spread through the haystack; asked for
                     every variable that holds 12345, in chain order.
    cwe              common words: a list of words where 10 words occur far
                     more often than the rest; asked for them (answer order:
                     first occurrence in the list).
    fwe              frequent words: word counts fall off like Zipf; asked for
                     the 3 most frequent, most frequent first.
    passkey          loom.trainer.data.synthetic.PasskeyTask (depth x length grid).
    mqar             loom.trainer.data.synthetic.MQARTask.

Haystacks: `filler="repeat"` is RULER's repeated sentences ("The grass is
green. The sky is blue. ..."); `filler="text"` is real text (the recipe's
validation data, passed in as a token array), cut at the front. Needles go
between sentences (repeat) or at the nearest token (text).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from loom.models.config import ConfigError
from loom.trainer.data.packing import seeded_rng
from loom.trainer.data.synthetic import MQARTask, PasskeyTask, _Encoder

NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
TASKS = NIAH_TASKS + ("vt", "cwe", "fwe", "passkey", "mqar")
FILLERS = ("repeat", "text")
_TASK_CODE = {name: i for i, name in enumerate(TASKS)}
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvz", "aeiou"


def pseudo_word(rng: np.random.Generator, syllables: int = 2) -> str:
    """A pronounceable lowercase word such as 'kavo' (consonant-vowel syllables)."""
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def distinct_words(rng: np.random.Generator, n: int, syllables: int = 2) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = pseudo_word(rng, syllables)
        if w not in words:
            words.append(w)
    return words


def number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(1, 10))) + "".join(str(d) for d in rng.integers(0, 10, digits - 1))


class Haystack:
    """Filler of an exact token count with needles inserted at relative depths.

    enc: loom.trainer.data.synthetic._Encoder; text_tokens: (N,) int64 real-text
    tokens (filler="text") or None.
    """

    def __init__(self, enc: _Encoder, filler: str, text_tokens: Optional[np.ndarray] = None):
        if filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
        if filler == "text" and (text_tokens is None or len(text_tokens) == 0):
            raise ValueError("filler 'text' needs real-text validation data; the recipe has none")
        self.enc, self.filler, self.text = enc, filler, text_tokens

    def build(self, rng: np.random.Generator, n_fill: int, needles: list[list[int]],
              depths: list[float]) -> list[tuple[np.ndarray, bool]]:
        """Segments (tokens, is_answer=False): n_fill filler tokens with needle i at depths[i]."""
        if self.filler == "repeat":
            tokens, bounds = self.enc.filler(rng, n_fill)
        else:
            start = int(rng.integers(0, max(1, len(self.text) - n_fill)))
            reps = -(-(start + n_fill) // len(self.text))
            tokens = np.tile(self.text, reps)[start:start + n_fill].astype(np.int64)
            bounds = np.arange(n_fill + 1)
        cuts = [int(bounds[np.argmin(np.abs(bounds - d * n_fill))]) for d in depths]
        order = np.argsort(cuts, kind="stable")
        segs, prev = [], 0
        for i in order:
            segs += [(tokens[prev:cuts[i]], False), (np.asarray(needles[i], dtype=np.int64), False)]
            prev = cuts[i]
        segs.append((tokens[prev:], False))
        return segs


def _finish(enc: _Encoder, length: int, task: str, head: list, tail: list, extra: dict) -> dict:
    segs = [(enc.bos, False)] + head + tail + [(enc.eos, False)]
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in segs])
    answer = np.concatenate([np.full(len(s), a, dtype=bool) for s, a in segs])
    if len(tokens) != length + 1:
        raise AssertionError(f"{task}: built {len(tokens)} tokens for a window of {length + 1}")
    return {"tokens": tokens, "answer": answer, "prompt_len": int(np.argmax(answer)), **extra}


def _budget(enc: _Encoder, length: int, task: str, fixed: list) -> int:
    n_fill = length + 1 - len(enc.bos) - len(enc.eos) - sum(len(s) for s, _ in fixed)
    if n_fill < 0:
        raise ValueError(f"{task} needs an evaluation length >= {length - n_fill}, got {length}")
    return n_fill


def _answer_list(enc: _Encoder, items: list[str]) -> list:
    """'a, b, c' with each item an answer span and the separators not."""
    segs = []
    for i, item in enumerate(items):
        if i:
            segs.append((enc.fixed(", "), False))
        segs.append((enc(item), True))
    return segs


class SuiteTask:
    """One task of the suite at one length.

    Example:
        >>> task = SuiteTask("niah_multikey", tok, length=1024, seed=0)
        >>> ex = task.example(3)            # ex["tokens"]: (1025,)
    """

    def __init__(self, name: str, tokenizer, length: int, seed: int, filler: str = "repeat",
                 text_tokens: Optional[np.ndarray] = None, depth: Optional[float] = None,
                 n_needles: int = 4, key_digits: int = 5, mqar_pairs: int = 16, mqar_queries: int = 4):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
        self.name, self.length, self.seed, self.depth = name, length, seed, depth
        self.enc = _Encoder(tokenizer)
        self.hay = Haystack(self.enc, filler, text_tokens) if name not in ("passkey", "mqar", "cwe", "fwe") else None
        self.filler = filler
        self.n_needles, self.key_digits = n_needles, key_digits
        key = (seed, 3, _TASK_CODE[name], FILLERS.index(filler))
        self._passkey = PasskeyTask(tokenizer, length, key, depth, key_digits) if name == "passkey" else None
        self._mqar = MQARTask(tokenizer, length, key, mqar_pairs, mqar_queries) if name == "mqar" else None
        self._key = key

    def example(self, index: int) -> dict:
        if self._passkey is not None:
            ex = self._passkey.example(index)
            return {"tokens": ex["tokens"], "answer": ex["answer"], "prompt_len": int(np.argmax(ex["answer"])),
                    "refs": [ex["key"]], "depth": ex["depth"]}
        if self._mqar is not None:
            ex = self._mqar.example(index)
            values = dict(ex["pairs"])
            return {"tokens": ex["tokens"], "answer": ex["answer"], "prompt_len": int(np.argmax(ex["answer"])),
                    "refs": [values[q] for q in ex["queries"]], "depth": None}
        rng = seeded_rng(*self._key, index)
        return getattr(self, "_" + self.name)(rng)

    # ----- needle in a haystack -----
    def _needle(self, key: str, value: str) -> list[int]:
        return self.enc(f"The magic number for {key} is {value}. ")

    def _depths(self, rng: np.random.Generator, n: int) -> list[float]:
        if n == 1:
            return [float(rng.uniform()) if self.depth is None else self.depth]
        return sorted(float(d) for d in rng.uniform(size=n))

    def _niah(self, rng: np.random.Generator, keys: list[str], values: list[str], asked: list[int],
              question: list, answers: list) -> dict:
        needles = [self._needle(k, v) for k, v in zip(keys, values)]
        depths = self._depths(rng, len(needles))
        fixed = [(n, False) for n in needles] + question + answers
        n_fill = _budget(self.enc, self.length, self.name, fixed)
        head = self.hay.build(rng, n_fill, needles, depths)
        return _finish(self.enc, self.length, self.name, head, question + answers,
                       {"refs": [values[i] for i in asked] if asked else values, "depth": depths[0]
                        if len(depths) == 1 else None})

    def _niah_single(self, rng):
        key, value = pseudo_word(rng), number(rng, 7)
        q = [(self.enc(f"What is the magic number for {key}? The magic number for {key} is "), False)]
        return self._niah(rng, [key], [value], [0], q, [(self.enc(value), True)])

    def _niah_multikey(self, rng):
        keys = distinct_words(rng, self.n_needles)
        values = [number(rng, 7) for _ in keys]
        i = int(rng.integers(len(keys)))
        q = [(self.enc(f"What is the magic number for {keys[i]}? The magic number for {keys[i]} is "), False)]
        return self._niah(rng, keys, values, [i], q, [(self.enc(values[i]), True)])

    def _niah_multivalue(self, rng):
        key = pseudo_word(rng)
        values = [number(rng, 7) for _ in range(self.n_needles)]
        q = [(self.enc(f"What are all the magic numbers for {key}? The magic numbers for {key} are "), False)]
        return self._niah(rng, [key] * len(values), values, [], q, _answer_list(self.enc, values))

    def _niah_multiquery(self, rng):
        keys = distinct_words(rng, self.n_needles)
        values = [number(rng, 7) for _ in keys]
        order = [int(i) for i in rng.permutation(len(keys))]
        asked = " and ".join(keys[i] for i in order)
        q = [(self.enc(f"What are the magic numbers for {asked}? They are "), False)]
        return self._niah(rng, keys, values, order, q, _answer_list(self.enc, [values[i] for i in order]))

    # ----- variable tracking -----
    def _vt(self, rng):
        names = [w.upper() for w in distinct_words(rng, self.n_needles + 1, syllables=3)][: self.n_needles + 1]
        value = number(rng, 5)
        needles = [self.enc(f"VAR {names[0]} = {value}. ")]
        needles += [self.enc(f"VAR {names[i]} = VAR {names[i - 1]}. ") for i in range(1, len(names))]
        q = [(self.enc(f"Which variables hold the value {value}? Answer: "), False)]
        answers = _answer_list(self.enc, names)
        fixed = [(n, False) for n in needles] + q + answers
        n_fill = _budget(self.enc, self.length, "vt", fixed)
        depths = sorted(float(d) for d in rng.uniform(size=len(needles)))
        head = self.hay.build(rng, n_fill, needles, depths)
        return _finish(self.enc, self.length, "vt", head, q + answers, {"refs": names, "depth": None})

    # ----- word extraction (the list itself is the context) -----
    def _word_list(self, rng, counts: dict[str, int], rare: list[str], budget: int) -> list[str]:
        """Shuffled list holding each word of `counts` that many times, then topped up
        with rare words (once each, cycling) to about `budget` tokens."""
        words = [w for w, c in counts.items() for _ in range(c)]
        used = sum(len(self.enc.fixed(f"{w} ")) for w in words)
        i = 0
        while rare and used + len(self.enc.fixed(f"{rare[i % len(rare)]} ")) <= budget and i < 10 * len(rare):
            words.append(rare[i % len(rare)])
            used += len(self.enc.fixed(f"{words[-1]} "))
            i += 1
        return [words[j] for j in rng.permutation(len(words))]

    def _extraction(self, rng, task: str, counts: dict[str, int], rare: list[str], question: str,
                    answer_words: list[str]) -> dict:
        q = [(self.enc(question), False)]
        answers = _answer_list(self.enc, answer_words)
        n_fill = _budget(self.enc, self.length, task, q + answers)
        words = self._word_list(rng, counts, rare, n_fill)
        body = np.concatenate([np.asarray(self.enc.fixed(f"{w} "), dtype=np.int64) for w in words]) \
            if words else np.zeros(0, dtype=np.int64)
        if len(body) > n_fill:
            raise ValueError(f"{task} needs an evaluation length >= {self.length + len(body) - n_fill}, "
                             f"got {self.length}")
        pad, _ = self.enc.filler(rng, n_fill - len(body))   # the few tokens a whole word did not fill
        head = [(pad, False), (body, False)]
        if task == "cwe":   # answer order: first occurrence in the list
            first = {w: words.index(w) for w in answer_words}
            answer_words = sorted(answer_words, key=first.__getitem__)
            answers = _answer_list(self.enc, answer_words)
        return _finish(self.enc, self.length, task, head, q + answers, {"refs": answer_words, "depth": None})

    def _cwe(self, rng):
        vocab = distinct_words(rng, 10 + 400)
        common, rare = vocab[:10], vocab[10:]
        # common words: 4 occurrences each at 1K tokens, growing with length; rare words at most once
        reps = max(2, self.length // 256)
        return self._extraction(rng, "cwe", {w: reps for w in common}, rare,
                                "Which 10 words are the most common in the list above? Answer: ", common)

    def _fwe(self, rng):
        vocab = distinct_words(rng, 20)
        q = "Which 3 words are the most frequent in the list above? Answer: "
        room = _budget(self.enc, self.length, "fwe", [(self.enc(q), False)] + _answer_list(self.enc, vocab[:3]))
        size = {w: len(self.enc.fixed(f"{w} ")) for w in vocab}

        def zipf(scale: int) -> dict[str, int]:   # counts scale / rank; from scale 6 the top 3 are distinct
            return {w: max(1, scale // (r + 1)) for r, w in enumerate(vocab)}

        scale = 6
        while sum(c * size[w] for w, c in zipf(scale + 1).items()) <= room:
            scale += 1
        return self._extraction(rng, "fwe", zipf(scale), [], q, vocab[:3])


def task_windows(task: SuiteTask, n: int) -> list[dict]:
    """The first n examples of a task."""
    return [task.example(i) for i in range(n)]


def validate_suite_config(e) -> None:
    """Checks of the eval.suite_* keys (ConfigError naming the key)."""
    for t in e.suite_tasks:
        if t not in TASKS:
            raise ConfigError(f"eval.suite_tasks: unknown task {t!r} (tasks: {', '.join(TASKS)})")
    for f in e.suite_fillers:
        if f not in FILLERS:
            raise ConfigError(f"eval.suite_fillers: unknown filler {f!r} (fillers: {', '.join(FILLERS)})")
    if any(n < 2 for n in e.suite_lengths):
        raise ConfigError(f"eval.suite_lengths must be >= 2, got {e.suite_lengths}")
    if e.suite_n < 1 or e.suite_val_windows < 1:
        raise ConfigError("eval.suite_n and eval.suite_val_windows must be >= 1")
    if any(not 0 <= d <= 1 for d in e.suite_depths):
        raise ConfigError(f"eval.suite_depths must be in [0, 1], got {e.suite_depths}")
