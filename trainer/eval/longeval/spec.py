"""The long-context suite as a recipe configures it (eval.suite_*): its spec, its
validation text, its files, and the run during training. Used by the training
loop and by `loom eval` (longeval/command.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loom.models.config import ConfigError
from loom.trainer.eval.longeval.report import plot_heatmaps, plot_loss_by_position, write_json
from loom.trainer.eval.longeval.suite import LocalRunner, SuiteSpec, flat_metrics, run_suite
from loom.trainer.data.prepare import REAL_KINDS
from loom.trainer.eval.longeval.tasks import TASKS

REAL_TEXT = REAL_KINDS + ("prepared",)   # source kinds that hold real text (the rest are synthetic)



def suite_spec(cfg, tasks: Optional[list[str]] = None, lengths: Optional[list[int]] = None,
               n: Optional[int] = None, generate: Optional[bool] = None) -> SuiteSpec:
    """The SuiteSpec of a recipe (eval.suite_*), with command-line values taking precedence.
    Lengths default to 1x, 2x and 4x data.seq_len."""
    from loom.trainer.config import mqar_shape, passkey_key_digits

    e, T = cfg.eval, cfg.data.seq_len
    tasks = tasks or e.suite_tasks or list(TASKS)
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"unknown suite task {t!r}; tasks: {', '.join(TASKS)}")
    pairs, queries = mqar_shape(cfg)
    return SuiteSpec(tasks=tasks, lengths=lengths or e.suite_lengths or [T, 2 * T, 4 * T],
                     n=n or e.suite_n, depths=list(e.suite_depths), fillers=list(e.suite_fillers),
                     generate=e.suite_generate if generate is None else generate,
                     batch_size=cfg.train.batch_size, position_buckets=e.position_buckets,
                     key_digits=passkey_key_digits(cfg), mqar_pairs=pairs, mqar_queries=queries)


def real_text_config(data_cfg, seq_len: int, windows: int):
    """data config of the recipe's real-text sources only (None when it has none)."""
    keep = [s for s in data_cfg.sources if s.kind in REAL_TEXT]
    val = None if data_cfg.val_sources is None else [s for s in data_cfg.val_sources if s.kind in REAL_TEXT]
    if not keep and not val:
        return None
    if data_cfg.val_sources is not None and not val:
        return None
    return dataclasses.replace(data_cfg, seq_len=seq_len, sources=keep or val, val_sources=val,
                               val_windows=windows)


def validation_text(cfg, tokenizer, lengths: list[int], windows: int, seed: int):
    """(real-text filler tokens (N,) or None, {length: collated val windows} for loss by position)."""
    from loom.trainer.data import eval_windows

    first = real_text_config(cfg.data, max(lengths), windows)
    if first is None:
        return None, {}
    by_len = {T: eval_windows(real_text_config(cfg.data, T, windows), tokenizer, seed,
                              batch_size=cfg.train.batch_size) for T in lengths}
    longest = by_len[max(lengths)]
    text = torch.cat([b["input_ids"].reshape(-1) for b in longest]).numpy().astype(np.int64)
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} - {None}
    text = text[~np.isin(text, list(specials))]
    return text, by_len


def write_outputs(res: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "heatmap.png", out_dir / "loss_by_position.png"]
    write_json(res, paths[0])
    plot_heatmaps(res, paths[1])
    plot_loss_by_position(res, paths[2])
    return [p for p in paths if p.exists()]


@torch.no_grad()


def suite_during_training(model, cfg, tokenizer, out_dir: Optional[Path]) -> dict:
    """The suite as configured by eval.suite_* (on when eval.suite_tasks is set), in this
    process; returns flat metrics for metrics.jsonl / TensorBoard and writes the files
    into out_dir (None: no files), printing the heatmap's path."""
    if not cfg.eval.suite_tasks:
        return {}
    spec = suite_spec(cfg)
    text, windows = validation_text(cfg, tokenizer, spec.lengths, cfg.eval.suite_val_windows, cfg.seed)
    res = run_suite(model, tokenizer, spec, cfg.data.seq_len, LocalRunner(), seed=cfg.seed, text_tokens=text,
                    val_windows=windows)
    out = flat_metrics(res)
    if out_dir is not None:
        from loom.trainer.distributed import dist

        for p in write_outputs(res, out_dir):
            if p.suffix == ".png":
                dist.log(f"suite: wrote {p}")
    return out
