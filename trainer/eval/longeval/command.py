"""`loom eval RECIPE`: the long-context suite on a run's checkpoint, and the same
suite during training (`eval.suite_tasks`).

    loom eval RECIPE [key=value ...] [--checkpoint DIR] [--lengths 512,1024]
              [--tasks passkey,niah_single] [--examples 8] [--no-generate] [--out DIR]

Writes results.json, heatmap.png and loss_by_position.png into --out (default
<run>/eval/step-NNNNNNNN/) and prints a table. Under `torchrun ... parallel.cp=N`
every forward is sharded over the cp ranks (loom.trainer.eval.longeval.cp); rank 0 writes.
Recipe keys (eval.*): suite_tasks, suite_lengths, suite_n, suite_depths,
suite_fillers, suite_generate (see loom.trainer.config.EvalConfig).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import yaml

from loom.models.config import ConfigError
from loom.trainer.eval.longeval.report import summary_lines
from loom.trainer.eval.longeval.spec import suite_spec, validation_text, write_outputs
from loom.trainer.eval.longeval.suite import LocalRunner, run_suite


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


def restore(cfg, checkpoint: Optional[str], log):
    """(model, tokenizer, meta, checkpoint path) of the recipe's run, or of --checkpoint.

    The checkpoint's run folder records the recipe it was trained with
    (config.yaml); a model section that differs from this recipe's is an error
    naming the first differing key, not a failed load_state_dict.
    """
    from loom.trainer.checkpoint.manager import CheckpointManager
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
    from loom.trainer.distributed import dist
    from loom.trainer.distributed.mesh import setup_env

    env = setup_env(cfg.parallel)
    say = dist.log
    model, tokenizer, meta, path = restore(cfg, checkpoint, dist.warn)
    spec = suite_spec(cfg, tasks, lengths, n, generate)
    check_lengths(model, spec.lengths, env.cp)
    if env.cp is not None:
        from loom.trainer.eval.longeval.cp import CPRunner

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
    env.teardown()
    return 0


