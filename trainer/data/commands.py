"""`loom data ...` commands: prepare, stats, verify.

    loom data prepare RECIPE [key=value ...] [--worker I --workers N] [--procs P]
        prepare every raw source (files, hub, stdlib) of the recipe's data.sources and
        data.val_sources into data.cache_dir, where training looks for them
    loom data prepare --source '{kind: files, path: /data/*.jsonl.gz}' --tokenizer T --out DIR
        prepare one source given on the command line into DIR (read it with
        `data.sources: [{kind: prepared, path: DIR}]`)
    loom data stats DIR [--split all|train|val] [--png FILE] [--seq-len T]
    loom data verify DIR                hash every shard against the manifest
"""
from __future__ import annotations

import os

import yaml


def _say(msg: str) -> None:
    print(msg, flush=True)


def _source_from_cli(text: str):
    from loom.models.config import ConfigError, build
    from loom.trainer.data.config import SourceConfig, _check_source

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--source is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("--source must be a mapping, e.g. '{kind: files, path: data/*.jsonl}'")
    src = build(SourceConfig, data, "--source")
    _check_source(src, "--source")
    return src


def cmd_prepare(args) -> int:
    from loom.models.config import ConfigError
    from loom.trainer.data.tokenizer import load_tokenizer
    from loom.trainer.data.prepare import REAL_KINDS, cache_path, prepare_source
    from loom.trainer.data.prepared import open_prepared

    if args.worker >= args.workers:
        raise ConfigError(f"--worker must be < --workers ({args.workers}), got {args.worker}")
    common = dict(worker=args.worker, workers=args.workers, procs=args.procs, say=_say)
    if args.source is not None:
        if args.recipe is not None or not args.out:
            raise ConfigError("--source takes --out DIR (and --tokenizer), not a recipe")
        src = _source_from_cli(args.source)
        tok = load_tokenizer(args.tokenizer)
        prep = prepare_source(src, tok, args.out, dtype=args.dtype, **common)
        if prep is not None:
            _summary(prep)
        return 0
    if args.recipe is None:
        raise ConfigError("give a recipe, or --source with --out")
    if args.out or args.dtype != "auto":
        raise ConfigError("--out and --dtype go with --source; a recipe's sources are prepared into data.cache_dir")
    from loom.trainer.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    sources = [("data.sources", i, s) for i, s in enumerate(cfg.data.sources)]
    sources += [("data.val_sources", i, s) for i, s in enumerate(cfg.data.val_sources or [])]
    n = 0
    for where, i, src in sources:
        if src.kind == "prepared":
            prep = open_prepared(src.path, tok)
            _say(f"{where}[{i}]: already prepared in {prep.path}")
        elif src.kind in REAL_KINDS:
            n += 1
            prep = prepare_source(src, tok, cache_path(src, tok, cfg.data.cache_dir), **common)
            if prep is not None:
                _summary(prep)
    if n == 0:
        _say(f"{args.recipe}: no raw text sources to prepare (synthetic sources are generated from the seed)")
    return 0


def _summary(prep) -> None:
    for part in ("train", "val"):
        docs, toks = prep.totals(part)
        _say(f"  {part}: {docs:,} documents, {toks:,} tokens")
    _say(f"ready: {prep.path}")


def cmd_stats(args) -> int:
    from loom.trainer.data.stats import format_stats, length_stats, write_histogram

    st = length_stats(args.dir, args.split, args.seq_len)
    print(format_stats(st))
    png = args.png or os.path.join(args.dir, f"lengths-{args.split}.png")
    written = write_histogram(st, png)
    print(f"histogram: {written}" if written else "histogram: skipped (pip install 'loom-lm[data]' for matplotlib)")
    return 0


def cmd_verify(args) -> int:
    from loom.trainer.data.prepared import open_prepared, verify_shards

    prep = open_prepared(args.dir, verify=False)
    verify_shards(prep, full=True)
    print(f"{prep.path}: {len(prep.shards)} shards verified (sha256)")
    return 0


def add_data_commands(sub) -> None:
    """Register `loom data {prepare,stats,verify}` on the CLI's subparsers."""
    from loom.trainer.cli_args import count

    data = sub.add_parser("data", help="prepare, inspect and verify tokenized data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("prepare", help="tokenize sources into memory-mappable shards")
    p.add_argument("recipe", nargs="?", help="recipe YAML whose raw sources to prepare")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.cache_dir=/scratch/data")
    p.add_argument("--source", help="one source as YAML, e.g. '{kind: hub, name: HuggingFaceFW/fineweb-edu}'")
    p.add_argument("--tokenizer", default="byte", help="with --source: 'byte' or a tokenizer.json")
    p.add_argument("--out", help="with --source: the folder to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--worker", type=count(0), default=0, help="this worker's index (machines share units)")
    p.add_argument("--workers", type=count(1), default=1, help="number of workers")
    p.add_argument("--procs", type=count(1), default=1, help="processes on this machine")
    p.set_defaults(fn=cmd_prepare)
    s = dsub.add_parser("stats", help="documents, tokens and lengths of a prepared folder")
    s.add_argument("dir")
    s.add_argument("--split", default="all", choices=["all", "train", "val"])
    s.add_argument("--png", help="histogram file (default DIR/lengths-SPLIT.png)")
    s.add_argument("--seq-len", type=int, help="chat data: count the conversations longer than a window "
                   "(seq_len + 1 tokens), which training truncates or skips (data.sources[i].too_long)")
    s.set_defaults(fn=cmd_stats)
    v = dsub.add_parser("verify", help="check every shard's sha256 against the manifest")
    v.add_argument("dir")
    v.set_defaults(fn=cmd_verify)

