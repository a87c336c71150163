"""`loom eval RECIPE`: the long-context suite on a run's checkpoint, and the same
suite during training (`eval.suite_tasks`).

    loom eval RECIPE [key=value ...] [--checkpoint DIR] [--lengths 512,1024]
              [--tasks passkey,niah_single] [--examples 8] [--no-generate] [--out DIR]

Writes results.json, heatmap.png and loss_by_position.png into --out (default
<run>/eval/step-XXXXXXXX/) and prints a table. Under `torchrun ... parallel.cp=N`
every forward is sharded over the cp ranks (loom.trainer.longeval.cp); rank 0 writes.
Recipe keys (eval.*): suite_tasks, suite_lengths, suite_n, suite_depths,
suite_fillers, suite_generate (see loom.trainer.config.EvalConfig).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from loom.models.config import ConfigError
from loom.trainer.longeval.report import plot_heatmaps, plot_loss_by_position, summary_lines, write_json
from loom.trainer.longeval.suite import LocalRunner, SuiteSpec, flat_metrics, run_suite
from loom.trainer.longeval.tasks import FILLERS, TASKS

REAL_TEXT = ("files", "hub", "stdlib")


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


def check_lengths(model, lengths: list[int], cp) -> None:
    """Every evaluation length must be shardable by the cp layout and keep each
    mixer's chunk on one rank (ValueError naming the length and the layer)."""
    for T in lengths:
        if T < 2:
            raise ValueError(f"evaluation length {T} is too short")
        if cp is None:
            continue
        if T % cp.n_chunks:
            raise ValueError(f"evaluation length {T} is not divisible by 2 * parallel.cp = {cp.n_chunks}; "
                             f"use a multiple of {cp.n_chunks}")
        piece = T // cp.n_chunks
        for i, block in enumerate(model.blocks):
            chunk = block.mixer.cp_chunk_tokens()
            if piece % chunk:
                raise ValueError(f"evaluation length {T}: model.layers[{i}] ({block.kind}) keeps chunks of "
                                 f"{chunk} tokens on one rank, but parallel.cp={cp.world_size} cuts it into "
                                 f"pieces of {piece}; use a multiple of {cp.n_chunks * chunk}")


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


def restore(cfg, checkpoint: Optional[str], log):
    """(model, tokenizer, meta, checkpoint path) of the recipe's run, or of --checkpoint.

    The checkpoint's run folder records the recipe it was trained with
    (config.yaml); a model section that differs from this recipe's is an error
    naming the first differing key, not a failed load_state_dict.
    """
    from loom.trainer.checkpoint import CheckpointManager
    from loom.trainer.data import load_tokenizer
    from loom.trainer.train import build_model

    if checkpoint:
        path = Path(checkpoint)
        if (path / "checkpoints").is_dir():          # a run folder: its latest checkpoint
            run_dir, path = path, CheckpointManager(path).latest_valid(log=log)
        else:
            run_dir = path.parent.parent
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    else:
        run_dir = cfg.run_dir
        path = CheckpointManager(run_dir).latest_valid(log=log)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}; train first with `loom train`")
    check_recipe_matches(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer)
    tensors, _, meta = CheckpointManager(run_dir).load(path)
    missing, unexpected = set(model.state_dict()) - set(tensors), set(tensors) - set(model.state_dict())
    shapes = [k for k, v in model.state_dict().items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        what = (f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(unexpected)[0]}" if unexpected
                else f"{shapes[0]} has shape {tuple(tensors[shapes[0]].shape)}, the recipe builds "
                     f"{tuple(model.state_dict()[shapes[0]].shape)}")
        raise ConfigError(f"checkpoint {path} does not match the recipe's model ({what})")
    model.load_state_dict(tensors)
    model.eval()
    return model, tokenizer, meta, path


def _first_difference(a, b, prefix: str) -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix} is {b!r} in the checkpoint's run, {a!r} in the recipe"


def check_recipe_matches(cfg, saved: Path) -> None:
    """ConfigError when the model section of the run's config.yaml differs from cfg.model."""
    from loom.models.config import to_dict

    if not saved.is_file():
        return
    try:
        theirs = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    except yaml.YAMLError:
        return
    ours = to_dict(cfg.model)
    for key in ("vocab_size", "activation_checkpointing"):   # filled from the tokenizer / not in the weights
        ours.pop(key, None)
        theirs.pop(key, None)
    diff = _first_difference(ours, theirs, "model")
    if diff:
        raise ConfigError(f"the checkpoint's recipe does not match: {diff}")


def run_eval(cfg, checkpoint: Optional[str] = None, tasks=None, lengths=None, n=None, generate=None,
             out: Optional[str] = None) -> int:
    from loom.trainer import dist

    env = dist.setup(cfg.parallel)
    say = dist.log
    model, tokenizer, meta, path = restore(cfg, checkpoint, dist.warn)
    spec = suite_spec(cfg, tasks, lengths, n, generate)
    check_lengths(model, spec.lengths, env.cp)
    if env.cp is not None:
        from loom.trainer.longeval.cp import CPRunner

        runner = CPRunner(env.cp)
    else:
        runner = LocalRunner()
    if env.cp is None:   # the trainer's own evaluation at the training length, as logged during training
        from loom.trainer.data import eval_windows
        from loom.trainer.train import evaluate, fmt_eval

        plain = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, suite_tasks=[]))   # the suite runs below
        say(fmt_eval(meta["step"], evaluate(model, plain, tokenizer, eval_windows(
            cfg.data, tokenizer, cfg.seed, batch_size=cfg.train.batch_size))))
    text, windows = validation_text(cfg, tokenizer, spec.lengths, cfg.eval.suite_val_windows, cfg.seed)
    say(f"evaluating {path} (step {meta['step']}) at lengths {spec.lengths}, {spec.n} examples per cell"
        + (f", context-parallel over {env.cp.world_size} ranks" if env.cp is not None else ""))
    res = run_suite(model, tokenizer, spec, cfg.data.seq_len, runner, seed=cfg.seed, text_tokens=text,
                    val_windows=windows, log=say)
    res.update({"recipe": cfg.name, "checkpoint": str(path), "step": meta["step"],
                "cp": 1 if env.cp is None else env.cp.world_size})
    if env.is_main:
        out_dir = Path(out) if out else cfg.run_dir / "eval" / path.name
        paths = write_outputs(res, out_dir)
        for line in summary_lines(res):
            say(line)
        for p in paths:
            say(f"wrote {p}")
    dist.teardown()
    return 0


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
        from loom.trainer import dist

        for p in write_outputs(res, out_dir):
            if p.suffix == ".png":
                dist.log(f"suite: wrote {p}")
    return out


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
