"""`loom` command line (also `python -m loom.trainer`).

    loom train RECIPE [key=value ...]       train, or resume the run in output_dir
    loom eval RECIPE [key=value ...]        long-context suite on the latest checkpoint (JSON + PNGs)
    loom generate RECIPE --prompt TEXT      greedy generation from the latest checkpoint
    loom info RECIPE [key=value ...]        parameters, FLOPs per token, cache size per layer
    loom convert hf SRC OUT                 import a Llama/Qwen2 checkpoint folder
    loom convert to-hf RUN_OR_CKPT OUT      export to a Hugging Face folder (--target auto|llama|qwen2|remote)
    loom data prepare|stats|verify ...      tokenized shards (trainer/data/commands.py)

User errors print one line `error: ...` on stderr and exit 2 (LOOM_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

from loom.trainer.cli_args import OneLineParser, count, counts, text_arg

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 PermissionError)


def _load(args):
    from loom.trainer.config import load_config

    return load_config(args.recipe, args.overrides)


def cmd_train(args) -> int:
    from loom.trainer.train import train

    cfg = _load(args)
    if cfg.distill.teacher is not None:   # distillation: trainer/distill/
        from loom.trainer.distill.trainer import train_distill

        return train_distill(cfg)
    return train(cfg)


def _restore(cfg):
    """Model and tokenizer of the run's latest valid checkpoint (or fresh weights)."""
    from loom.trainer.checkpoint.manager import CheckpointManager
    from loom.trainer.data import load_tokenizer
    from loom.trainer.train import build_model

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer)
    path = CheckpointManager(cfg.run_dir).latest_valid(log=lambda m: print(m, file=sys.stderr))
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {cfg.run_dir}; train first with `loom train`")
    tensors, _, meta = CheckpointManager(cfg.run_dir).load(path)
    model.load_state_dict(tensors)
    model.eval()
    return model, tokenizer, meta


def cmd_eval(args) -> int:
    from loom.trainer.eval.longeval.command import run_eval

    tasks = text_arg("--tasks", args.tasks)
    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if tasks is not None and not tasks:
        raise ValueError(f"--tasks names no task: {args.tasks!r}")
    text_arg("--checkpoint", args.checkpoint)
    text_arg("--out", args.out)
    return run_eval(_load(args), checkpoint=args.checkpoint, tasks=tasks, lengths=args.lengths, n=args.n,
                    generate=False if args.no_generate else None, out=args.out)


def cmd_generate(args) -> int:
    import torch

    prompt = text_arg("--prompt", args.prompt)
    cfg = _load(args)
    model, tokenizer, _ = _restore(cfg)
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, args.max_new_tokens, eos_id=tokenizer.eos_id)
    print(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    return 0


def cmd_info(args) -> int:
    from loom.trainer.data import load_tokenizer
    from loom.trainer.train import model_config_for
    from loom.models import HybridLM

    cfg = _load(args)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = HybridLM(model_config_for(cfg, tokenizer.vocab_size))
    T = cfg.data.seq_len
    print(f"{cfg.name}: {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings)")
    print(f"training FLOPs per token at {T} tokens: {model.flops_per_token(T) / 1e9:.3f} GFLOPs")
    print(f"decoding cache per sequence at {T} tokens (bf16):")
    for layer, nbytes in model.state_bytes(T).items():
        print(f"  {layer:>16}: {nbytes / 2**20:.3f} MiB")
    return 0


def cmd_convert(args) -> int:
    from loom.trainer.hf.convert import main_convert

    return main_convert([args.src, args.out])


def cmd_to_hf(args) -> int:
    from loom.trainer.hf.export import main_to_hf

    return main_to_hf([args.src, args.out, "--target", args.target])


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="loom", description="Train long-context hybrid language models.")
    # the `deepspeed` launcher passes --local_rank=N before the command (LOCAL_RANK is read from the environment)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in [("train", cmd_train, "train or resume a run"),
                            ("eval", cmd_eval, "long-context suite on the latest checkpoint"),
                            ("generate", cmd_generate, "greedy generation"),
                            ("info", cmd_info, "model size, FLOPs and cache accounting")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
        s.set_defaults(fn=fn)
        if name == "eval":
            s.add_argument("--checkpoint", help="a checkpoint folder or run folder (default: the run's latest)")
            s.add_argument("--lengths", type=counts(1), help="comma-separated lengths (default eval.suite_lengths or 1x,2x,4x)")
            s.add_argument("--tasks", help="comma-separated suite tasks (default eval.suite_tasks or all)")
            s.add_argument("--examples", "--n", dest="n", type=count(1), help="examples per cell (default eval.suite_n)")
            s.add_argument("--no-generate", action="store_true", help="teacher-forced scores only")
            s.add_argument("--out", help="output folder (default <run>/eval/<checkpoint>)")
        if name == "generate":
            s.add_argument("--prompt", required=True)
            s.add_argument("--max-new-tokens", type=count(1), default=64)
    from loom.trainer.data.commands import add_data_commands

    add_data_commands(sub)
    conv = sub.add_parser("convert", help="import weights from another format")
    conv_sub = conv.add_subparsers(dest="format", required=True)
    hf = conv_sub.add_parser("hf", help="Llama/Qwen2 folder (config.json + safetensors)")
    hf.add_argument("src")
    hf.add_argument("out")
    hf.set_defaults(fn=cmd_convert)
    to_hf = conv_sub.add_parser("to-hf", help="export a run or checkpoint to a Hugging Face folder")
    to_hf.add_argument("src", help="run folder, checkpoint folder or `loom convert hf` folder")
    to_hf.add_argument("out")
    to_hf.add_argument("--target", default="auto", help="auto | llama | qwen2 | remote (trust_remote_code)")
    to_hf.set_defaults(fn=cmd_to_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, above) or --help
        return e.code if isinstance(e.code, int) else 2
    from loom.trainer.checkpoint.manager import CheckpointError
    from loom.trainer.reliability.guard import TrainingError

    try:
        return args.fn(args)
    except (CheckpointError, TrainingError, *USER_ERRORS) as e:
        if os.environ.get("LOOM_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename:  # raised by open() itself, not a message of ours
            return _os_error(e)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes: unreadable, a folder, read-only, full
        if os.environ.get("LOOM_DEBUG"):
            raise
        return _os_error(e)


def _os_error(e: OSError) -> int:
    where = f" {e.filename}" if e.filename else ""
    print(f"error: cannot use{where} ({e.strerror or type(e).__name__}); check that it is a readable "
          "file and that the folders written to are writable", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
