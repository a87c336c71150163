"""Resuming with changed settings: the recipe given now is the one in force.

Every checkpoint's meta.json records the whole recipe (`recipe`) and the
tokenizer's identity (`tokenizer`, its fingerprint: a hash of the tokenizer
file, not its vocabulary size). On resume `check_resume` compares them with
the recipe given now, before the model is built:

- refused (ConfigError naming the key): any `model.*` change (the weights would
  not fit or would mean something else), another tokenizer, `data.seq_len`
  (no `data.seq_len_schedule` to move between lengths), and the data sources
  (`data.sources`, `data.val_sources`: the saved data position indexes them);
- honoured, listed in one notice line: everything else, e.g. optim.* (lr,
  schedule, warmup, betas, weight decay), train.steps, grad clip, log / eval /
  save cadence, batch size and grad accumulation (the data position counts
  windows, so a different global batch continues without repeats), eval.*.

The optimizer and scheduler state restore the old hyper-parameters with them
(AdamW's param groups hold lr, betas, eps and weight decay; LambdaLR's state
holds its base lr); `apply_optim_settings` puts the current recipe's values
back after loading, at the restored step of the current schedule.
"""
from __future__ import annotations

from typing import Any

from loom.models.config import ConfigError, to_dict

# changes that cannot be honoured: prefix -> why
_REFUSED = {
    "model.": "the checkpoint's weights have another model shape",
    "data.seq_len": "the data position and the model were trained at the saved length",
    "data.sources": "the saved data position indexes the saved sources",
    "data.val_sources": "the saved data position indexes the saved sources",
    "data.tokenizer": "the weights were trained with another tokenizer",
}
# keys that describe this invocation, not the run
_IGNORED = ("name", "output_dir", "train.stop_after_steps")


def recipe_record(cfg, tokenizer) -> dict[str, Any]:
    """What a checkpoint's meta.json keeps of the recipe: the whole config and the tokenizer's identity."""
    return {"recipe": to_dict(cfg), "tokenizer": tokenizer.fingerprint}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dicts stay leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every leaf that differs, sorted by key."""
    a, b = flatten(saved), flatten(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_IGNORED)]


def check_resume(cfg, tokenizer, meta: dict) -> str | None:
    """Refuse impossible changes (ConfigError, one line naming the key); return the notice line or None."""
    if "recipe" not in meta:  # a checkpoint written before recipes were recorded: nothing to compare
        return None
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise ConfigError(f"data.tokenizer: this run's checkpoint {meta['step']} was trained with tokenizer "
                          f"{meta['tokenizer']}, the recipe now gives {tokenizer.fingerprint}; resume with the "
                          "original tokenizer or start a new output_dir")
    changes = changed_settings(meta["recipe"], to_dict(cfg))
    has_schedule = bool(getattr(cfg.data, "seq_len_schedule", None))
    for key, old, new in changes:
        if key == "data.tokenizer":
            continue  # another path to the same file (same fingerprint) is fine
        for prefix, why in _REFUSED.items():
            if key.startswith(prefix) and not (prefix == "data.seq_len" and has_schedule):
                raise ConfigError(f"{key}: cannot change from {_show(old)} to {_show(new)} when resuming "
                                  f"({why}); restore it or start a new output_dir")
    shown = [f"{k} {_show(old)} -> {_show(new)}" for k, old, new in changes if k != "data.tokenizer"]
    if not shown:
        return None
    return f"resume: the recipe given now wins; changed since step {meta['step']}: " + ", ".join(shown)


def apply_optim_settings(engine, optim_cfg) -> None:
    """After loading optimizer and scheduler state: the current recipe's lr, betas, eps and weight decay,
    and the lr of the current schedule at the restored step."""
    sched = engine.scheduler
    groups = engine.optimizer.param_groups
    for i, group in enumerate(groups):
        group["betas"] = tuple(optim_cfg.betas)
        group["eps"] = optim_cfg.eps
        if i == 0:  # trainer/optim.py: group 0 decays, group 1 (norms, biases) does not
            group["weight_decay"] = optim_cfg.weight_decay
        group["initial_lr"] = optim_cfg.lr
    # LambdaLR's lambdas are this recipe's (they are never saved); only its base lrs came from the checkpoint
    sched.base_lrs = [optim_cfg.lr for _ in groups]
    for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in groups]


def _show(v: Any) -> str:
    return "(unset)" if v is None else str(v)
