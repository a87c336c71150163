"""The long-context suite: RULER-style tasks, passkey and NIAH depth x length
grids, MQAR and loss by position, scored teacher-forced and by greedy generation.

Legend: B rows, T evaluation length, D model width.

Two scores per task and length:
    teacher_forced  share of answer spans whose tokens are all the argmax
                    prediction given the true prefix (works for base models
                    that never learnt to stop; one forward per batch)
    generated       greedy decoding from the prompt (the window up to the
                    first answer token), then RULER's string_match_all: the
                    share of the reference strings found in the output

Forward passes go through a runner (LocalRunner here, loom.trainer.eval.longeval.cp.CPRunner
under context parallelism), so the scoring code is the same at every length.

Example:
    >>> spec = SuiteSpec(tasks=["passkey", "niah_single"], lengths=[256, 512], n=8)
    >>> res = run_suite(model, tok, spec, train_length=256, runner=LocalRunner())
    >>> res["tasks"]["passkey"]["repeat"]["512"]["teacher_forced"]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from loom.models import HybridLM
from loom.trainer.data import answer_span_correct, collate
from loom.trainer.data.packing import pack_window
from loom.trainer.eval.validation import token_losses
from loom.trainer.eval.longeval.tasks import NIAH_TASKS, TASKS, SuiteTask

GRID_TASKS = ("passkey", "niah_single")   # scored on the depth x length grid


@dataclass
class SuiteSpec:
    """What `run_suite` evaluates.

    tasks: names from loom.trainer.eval.longeval.tasks.TASKS.
    lengths: evaluation lengths T (may exceed the training length).
    n: examples per (task, filler, length) and per grid cell.
    depths: needle depths of the passkey / niah_single grid.
    fillers: haystacks of the NIAH and vt tasks ("repeat", "text").
    generate: also score by greedy generation (slower: one decode per example).
    batch_size: rows per teacher-forced forward.
    position_buckets: points of the loss-by-position curve per length.
    key_digits, mqar_pairs, mqar_queries: passkey / MQAR shapes (as trained).
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=list)
    n: int = 8
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    fillers: list[str] = field(default_factory=lambda: ["repeat", "text"])
    generate: bool = True
    batch_size: int = 8
    position_buckets: int = 16
    key_digits: int = 5
    mqar_pairs: int = 16
    mqar_queries: int = 4


class LocalRunner:
    """Forward passes in this process."""

    def token_scores(self, model: HybridLM, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss (B, T) and argmax-correct (B, T) of a collated batch."""
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], seq_ids=batch.get("seq_ids")).hidden
        return token_losses(model, hidden, batch["labels"], chunk)

    def generate(self, model: HybridLM, ids: torch.Tensor, max_new_tokens: int, eos_id: Optional[int]):
        """Greedy continuation of ids (1, P) -> (1, P + new)."""
        return model.generate(ids, max_new_tokens, eos_id=eos_id)


def _batch(examples: list[dict]) -> dict:
    items = []
    for ex in examples:
        doc_start = np.zeros(len(ex["tokens"]), dtype=bool)
        doc_start[0] = True
        items.append(pack_window(ex["tokens"], doc_start, ex["answer"]))
    return collate(items)


@torch.no_grad()
def teacher_forced(model: HybridLM, examples: list[dict], runner, batch_size: int) -> float:
    """Share of answer spans predicted entirely right, the true prefix given."""
    right, total = 0, 0
    for lo in range(0, len(examples), batch_size):
        batch = _batch(examples[lo:lo + batch_size])
        _, correct = runner.token_scores(model, batch)
        pred = torch.where(correct, batch["labels"], -1)
        spans = answer_span_correct(pred, batch["labels"], batch["answer_mask"])
        right += int(spans.sum())
        total += spans.numel()
    return right / max(total, 1)


@torch.no_grad()
def generated(model: HybridLM, examples: list[dict], tokenizer, runner) -> float:
    """Mean over examples of the share of reference strings in the greedy output."""
    scores = []
    for ex in examples:
        prompt = torch.as_tensor(ex["tokens"][:ex["prompt_len"]], dtype=torch.int64)[None]
        budget = len(ex["tokens"]) - 1 - ex["prompt_len"] + 2    # the answer, its end and a little slack
        out = runner.generate(model, prompt, budget, tokenizer.eos_id)
        text = tokenizer.decode(out[0, ex["prompt_len"]:].tolist())
        scores.append(sum(ref in text for ref in ex["refs"]) / len(ex["refs"]))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def loss_by_position(model: HybridLM, windows: list[dict], runner, buckets: int) -> dict:
    """Mean token loss over `buckets` equal slices of the window, and the overall mean (nats)."""
    T = windows[0]["input_ids"].shape[1]
    nb = max(1, min(buckets, T))
    s = torch.zeros(nb, dtype=torch.float64)
    c = torch.zeros(nb, dtype=torch.float64)
    for batch in windows:
        loss, _ = runner.token_scores(model, batch)
        valid = batch["labels"] != -100
        which = (torch.arange(T) * nb // T).expand_as(loss)
        s.index_add_(0, which[valid], loss[valid].double())
        c.index_add_(0, which[valid], torch.ones_like(loss[valid], dtype=torch.float64))
    edges = [round(i * T / nb) for i in range(nb + 1)]
    return {"start": edges[:-1], "end": edges[1:], "loss": (s / c.clamp_min(1)).tolist(),
            "mean": float(s.sum() / c.sum().clamp_min(1))}


def _make(name: str, tokenizer, length: int, seed: int, spec: SuiteSpec, filler: str, text, depth=None):
    return SuiteTask(name, tokenizer, length, seed, filler=filler, text_tokens=text, depth=depth,
                     key_digits=spec.key_digits, mqar_pairs=spec.mqar_pairs, mqar_queries=spec.mqar_queries)


def task_fillers(name: str, spec: SuiteSpec, text) -> list[str]:
    """Haystacks a task runs with: NIAH and vt take the suite's fillers (text only when
    real-text data exists); the others build their own context."""
    if name in NIAH_TASKS or name == "vt":
        return [f for f in spec.fillers if f != "text" or text is not None]
    return ["repeat"]


@torch.no_grad()
def run_suite(model: HybridLM, tokenizer, spec: SuiteSpec, train_length: int, runner, seed: int = 0,
              text_tokens: Optional[np.ndarray] = None, val_windows: Optional[dict[int, list[dict]]] = None,
              log=None) -> dict:
    """Every task at every length, the depth x length grids and loss by position.

    text_tokens: (N,) real validation text for filler "text" (None: repeat filler only).
    val_windows: length -> collated real-text windows for loss by position (None: skipped).
    Returns the results dict written to results.json (see loom.trainer.eval.longeval.report).
    A task too long for a length is recorded as {"skipped": reason}.
    """
    was_training = model.training
    model.eval()
    t0 = time.time()
    res: dict = {"train_length": train_length, "lengths": list(spec.lengths), "n": spec.n,
                 "depths": list(spec.depths), "tasks": {}, "grids": {}, "loss_by_position": {}}
    for name in spec.tasks:
        res["tasks"][name] = {}
        for filler in task_fillers(name, spec, text_tokens):
            cells = res["tasks"][name][filler] = {}
            for length in spec.lengths:
                try:
                    task = _make(name, tokenizer, length, seed, spec, filler, text_tokens)
                    examples = [task.example(i) for i in range(spec.n)]
                except ValueError as e:
                    cells[str(length)] = {"skipped": str(e)}
                    continue
                cell = {"teacher_forced": teacher_forced(model, examples, runner, spec.batch_size),
                        "examples": len(examples)}
                if spec.generate:
                    cell["generated"] = generated(model, examples, tokenizer, runner)
                cells[str(length)] = cell
                if log:
                    log(f"  {name:<16} {filler:<6} @{length:<6} " + " ".join(
                        f"{k} {v:.0%}" for k, v in cell.items() if k != "examples"))
    for name in [t for t in GRID_TASKS if t in spec.tasks]:
        grid = {"depths": list(spec.depths), "lengths": list(spec.lengths), "teacher_forced": [], "generated": []}
        for depth in spec.depths:
            tf_row, gen_row = [], []
            for length in spec.lengths:
                try:
                    task = _make(name, tokenizer, length, seed + 1, spec, "repeat", None, depth=depth)
                    examples = [task.example(i) for i in range(spec.n)]
                except ValueError:
                    tf_row.append(None)
                    gen_row.append(None)
                    continue
                tf_row.append(teacher_forced(model, examples, runner, spec.batch_size))
                gen_row.append(generated(model, examples, tokenizer, runner) if spec.generate else None)
            grid["teacher_forced"].append(tf_row)
            grid["generated"].append(gen_row)
        res["grids"][name] = grid
    for length, windows in (val_windows or {}).items():
        res["loss_by_position"][str(length)] = loss_by_position(model, windows, runner, spec.position_buckets)
    res["seconds"] = round(time.time() - t0, 1)
    model.train(was_training)
    return res


def flat_metrics(res: dict) -> dict[str, float]:
    """The suite's numbers as flat keys for metrics.jsonl / TensorBoard:
    `<task>@<T>` (repeat filler) or `<task>.<filler>@<T>` teacher-forced,
    `<task>@<T>/gen` generated, `<grid>@<T>/depth<d>`, `val_loss@<T>`."""
    out: dict[str, float] = {}
    for name, by_filler in res["tasks"].items():
        for filler, cells in by_filler.items():
            tag = name if filler == "repeat" else f"{name}.{filler}"
            for length, cell in cells.items():
                if "skipped" in cell:
                    continue
                out[f"{tag}@{length}"] = cell["teacher_forced"]
                if "generated" in cell:
                    out[f"{tag}@{length}/gen"] = cell["generated"]
    for name, grid in res["grids"].items():
        for i, depth in enumerate(grid["depths"]):
            for j, length in enumerate(grid["lengths"]):
                if grid["teacher_forced"][i][j] is not None:
                    out[f"{name}_grid@{length}/depth{depth:g}"] = grid["teacher_forced"][i][j]
    for length, curve in res["loss_by_position"].items():
        out[f"val_loss@{length}"] = curve["mean"]
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
