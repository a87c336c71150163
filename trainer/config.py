"""Recipes: YAML with `base:` inheritance and dotted `key=value` overrides.

Each component owns its typed config (ModelConfig in models/, DataConfig in
trainer/data/, the optimiser, loop, evaluation and parallel sections here);
`RunConfig` only composes them. Every key and value is checked before any
work starts: an unknown key fails naming the nearest valid one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loom.models.config import ConfigError, build, check_ranges, to_dict, ranged
from loom.models.model import ModelConfig
from loom.trainer.data import DataConfig, validate_data_config
from loom.trainer.data.schedule import resolve_stages
from loom.trainer.distill.config import DistillConfig, validate_distill
from loom.trainer.reliability.inputs import check_model_shapes


@dataclass
class OptimConfig:
    lr: float = ranged(3e-3, gt=0)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio
    weight_decay: float = ranged(0.1, ge=0)
    betas: list[float] = ranged(factory=lambda: [0.9, 0.95], ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = ranged(20, ge=0)
    decay_frac: float = ranged(0.2, ge=0, le=1)  # WSD: share of steps spent in the final decay
    grad_clip: float = ranged(1.0, ge=0)  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = ranged(200, ge=1)
    batch_size: int = ranged(8, ge=1)  # windows per micro-batch per data-parallel rank
    grad_accum: int = ranged(1, ge=1)
    log_every: int = ranged(10, ge=1)
    eval_every: int = ranged(100, ge=1)
    save_every: int = ranged(100, ge=1)
    keep_last: int = ranged(3, ge=0)
    loss_chunk: int = ranged(1024, ge=1)  # tokens per cross-entropy chunk
    max_bad_steps: int = ranged(5, ge=1)  # consecutive non-finite steps (loss or grad norm) before the run stops
    spike_skip: float | None = ranged(None, gt=1)  # skip a step whose loss > spike_skip x running mean; None: off
    spike_window: int = ranged(50, ge=1)  # accepted losses in the running mean
    spike_rewind: int = ranged(0, ge=0)  # after this many spikes since the last checkpoint, rewind to it; 0: never
    # full: rank 0 gathers and writes whole weights + optimizer; sharded: every rank writes its shard (trainer/checkpoint/dcp.py)
    checkpoint_format: Literal["full", "sharded"] = "full"
    checkpoint_async: bool = False  # sharded only: write shards in the background, commit at the next save
    stop_after_steps: int | None = ranged(None, ge=1)  # checkpoint and exit after this many steps in this invocation
    # per block: none | full (recompute the block) | selective (recompute the MLP); trainer/distributed/parallelize.py
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool | None = None  # torch.compile per block; None: on for CUDA, off on CPU
    tile_mlp: int = ranged(0, ge=0)  # tokens per MLP tile along the sequence (memory of long rows); 0: whole rows
    # tokens per tile of every block (swa: with halo; others: state carried); 0: whole rows
    tile_blocks: int = ranged(0, ge=0)
    # FLOP/s per device for MFU; None: measured GEMM (CPU), bf16 table (GPU)
    peak_flops: float | None = ranged(None, gt=0)
    profile_steps: list[int] = ranged(factory=list, ge=1)  # steps traced by torch.profiler into <run>/profile


@dataclass
class EvalConfig:
    passkey_lengths: list[int] = ranged(factory=list, ge=1)  # empty: data.seq_len
    passkey_depths: list[float] = ranged(factory=lambda: [0.1, 0.5, 0.9], ge=0, le=1)
    passkey_n: int = ranged(8, ge=0)  # examples per (length, depth); 0 turns passkey evaluation off
    passkey_key_digits: int | None = ranged(None, ge=1)  # None: the first passkey source's key_digits, else 5
    # MQAR: exact match per query (all value tokens right, teacher-forced) on fresh examples
    mqar_lengths: list[int] = ranged(factory=list, ge=1)  # empty: data.seq_len
    mqar_n: int = ranged(0, ge=0)  # examples per length; 0 turns MQAR evaluation off
    mqar_pairs: int | None = ranged(None, ge=1)  # None: the first mqar source's n_pairs, else 16
    mqar_queries: int | None = ranged(None, ge=1)  # None: the first mqar source's n_queries, else 4
    position_buckets: int = ranged(8, ge=1)  # loss by position in the context
    # long-context suite (loom.trainer.eval.longeval): `loom eval` runs it; during training only when suite_tasks is set
    suite_tasks: list[str] = field(default_factory=list)  # empty: every task in `loom eval`, none in training
    suite_lengths: list[int] = ranged(factory=list, ge=2)  # empty: 1x, 2x, 4x data.seq_len
    suite_n: int = ranged(8, ge=1)  # examples per (task, length) and per grid cell
    suite_depths: list[float] = ranged(factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], ge=0, le=1)
    suite_fillers: list[str] = field(default_factory=lambda: ["repeat", "text"])
    suite_generate: bool = True  # also score by greedy generation
    suite_val_windows: int = ranged(8, ge=1)  # real-text windows per length for loss by position


@dataclass
class ParallelConfig:
    engine: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    zero: int = ranged(0, ge=0, le=3)  # DeepSpeed ZeRO stage 0-3
    cp: int = ranged(1, ge=1)  # context-parallel degree
    cp_impl: Literal["ring", "ulysses"] = "ring"
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: str | None = None  # a JSON under recipes/deepspeed/; None: generated
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str | None = None  # default runs/<name>
    seed: int = ranged(0, ge=0)
    init_from: str | None = None  # a folder written by `loom convert hf`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # trainer/distill/: a teacher turns a run into distillation

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict:
    """YAML -> dict with `base:` (a path relative to this file) merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} inherits from itself through `base:`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty; give at least `name:` (every other key has a default)")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys")
    base = data.pop("base", None)
    name = data.get("name") or path.stem  # a run's name is its own, never inherited
    if base:
        data = deep_merge(read_recipe(path.parent / base, _seen + (path.resolve(),)), data)
    data["name"] = name
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML) set into the nested dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(recipe: str | Path, overrides: list[str] = ()) -> RunConfig:
    cfg = build(RunConfig, apply_overrides(read_recipe(recipe), list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need no data or model (ConfigError on failure)."""
    check_ranges(cfg)  # again, for a RunConfig made in code rather than by build()
    validate_data_config(cfg.data)
    check_model_shapes(cfg.model)  # before resolved(), which divides by n_heads
    cfg.model.resolved()
    t, p = cfg.train, cfg.parallel
    # Single-value ranges (train.steps >= 1, parallel.cp >= 1, eval.passkey_n >= 0, ...) are declared on
    # the fields (loom.models.config.ranged) and checked by build(); what follows relates fields.
    if p.cp > 1 and cfg.data.seq_len % (2 * p.cp):
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) must be divisible by 2 * parallel.cp "
                          f"({2 * p.cp}) for the load-balanced context-parallel split")
    resolve_stages(cfg.data, t.batch_size, p.cp)   # data.seq_len_schedule
    e = cfg.eval
    pairs, queries = mqar_shape(cfg)
    if e.mqar_n > 0 and not 1 <= queries <= pairs <= 26**3:
        raise ConfigError(f"eval.mqar_queries: need 1 <= mqar_queries <= mqar_pairs <= {26**3}, "
                          f"got mqar_queries={queries}, mqar_pairs={pairs}")
    from loom.trainer.eval.longeval.tasks import validate_suite_config

    validate_suite_config(e)
    validate_distill(cfg.distill)
    if cfg.distill.teacher is not None:
        if cfg.init_from:
            raise ConfigError("init_from and distill.teacher are both set; a distilled student starts from the teacher")
        if p.engine in ("fsdp", "deepspeed") and any(s.kind == "align" for s in cfg.distill.stages):
            raise ConfigError(f"distill: align stages run with parallel.engine single or ddp, not {p.engine} "
                              "(they train the replaced mixers outside the engine's wrapper)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")


def _first_source(cfg: RunConfig, kind: str):
    return next((s for s in cfg.data.sources if s.kind == kind), None)


def passkey_key_digits(cfg: RunConfig) -> int:
    """eval.passkey_key_digits, or the first passkey training source's, or 5."""
    if cfg.eval.passkey_key_digits is not None:
        return cfg.eval.passkey_key_digits
    src = _first_source(cfg, "passkey")
    return src.key_digits if src is not None else 5


def mqar_shape(cfg: RunConfig) -> tuple[int, int]:
    """(n_pairs, n_queries) of MQAR evaluation: eval.mqar_pairs / mqar_queries, or the first
    mqar training source's, or 16 / 4."""
    src = _first_source(cfg, "mqar")
    pairs = cfg.eval.mqar_pairs if cfg.eval.mqar_pairs is not None else (src.n_pairs if src else 16)
    queries = cfg.eval.mqar_queries if cfg.eval.mqar_queries is not None else (src.n_queries if src else 4)
    return pairs, queries


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return build(RunConfig, data)
