"""The training loop: one code path for every engine.

Order of work: validate config -> process groups -> tokenizer -> model ->
engine -> data -> resume (weights, optimiser, schedule, RNG, data position)
-> steps (log, evaluate, checkpoint) -> final evaluation.
Stopping (SIGTERM/SIGINT) finishes the current step, writes a checkpoint and
exits 0; running the same command again resumes exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loom.models import HybridLM
from loom.models.config import ConfigError
from loom.trainer import dist
from loom.trainer.checkpoint import CheckpointManager, rng_state
from loom.trainer.config import RunConfig, dump, mqar_shape, passkey_key_digits
from loom.trainer.data import Batcher, build_dataset, load_tokenizer, mqar_examples, passkey_examples, eval_windows
from loom.trainer.distributed import setup_env
from loom.trainer.distributed.resume import check_layout, restore_rng, run_layout
from loom.trainer.evaluate import answer_accuracy, answer_scores, validation
from loom.trainer.logs import show_kernel_backends
from loom.trainer.metrics import MetricsWriter
from loom.trainer.parallel_check import check_cp_support
from loom.trainer.parallelize import parallelize
from loom.trainer.perf import StepProfiler, device_peak, mfu


class TrainingError(RuntimeError):
    """A run that cannot continue; the message is one user-facing line."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        dist.log(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def model_config_for(cfg: RunConfig, vocab_size: int):
    vocab = cfg.model.vocab_size or 64 * math.ceil(vocab_size / 64)
    if vocab < vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's ({vocab_size})")
    return dataclasses.replace(cfg.model, vocab_size=vocab)


def build_model(cfg: RunConfig, tokenizer) -> HybridLM:
    torch.manual_seed(cfg.seed)
    model = HybridLM(model_config_for(cfg, tokenizer.vocab_size))
    if cfg.init_from:
        from loom.trainer.convert import load_converted

        _, weights = load_converted(cfg.init_from)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ConfigError(f"init_from {cfg.init_from}: the weights do not fit model.* of this recipe "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                              f"start from the model.yaml written by `loom convert`") from None
    return model


def check_eval_tasks(cfg: RunConfig, tokenizer) -> None:
    """Build one passkey and one MQAR evaluation window per length, so that a length too
    short for its task fails before training, naming the key (ConfigError)."""
    checks = []
    if cfg.eval.passkey_n > 0:
        checks += [("passkey_lengths", n, lambda n: passkey_examples(tokenizer, n, 0.5, 1, cfg.seed + 1,
                                                                     key_digits=passkey_key_digits(cfg)))
                   for n in cfg.eval.passkey_lengths or [cfg.data.seq_len]]
    if cfg.eval.mqar_n > 0:
        checks += [("mqar_lengths", n, lambda n: mqar_examples(tokenizer, n, 1, cfg.seed + 1, *mqar_shape(cfg)))
                   for n in cfg.eval.mqar_lengths or [cfg.data.seq_len]]
    for key, length, build in checks:
        try:
            build(length)
        except ValueError as e:
            raise ConfigError(f"eval.{key}: {e}") from None


def evaluate(model: HybridLM, cfg: RunConfig, tokenizer, val_batches: list[dict]) -> dict:
    out = validation(model, val_batches, cfg.eval.position_buckets)
    lengths = cfg.eval.passkey_lengths or [cfg.data.seq_len]
    for length in lengths if cfg.eval.passkey_n > 0 else []:
        accs = []
        for depth in cfg.eval.passkey_depths:
            batches = passkey_examples(tokenizer, length, depth, cfg.eval.passkey_n, cfg.seed + 1,
                                       key_digits=passkey_key_digits(cfg), batch_size=cfg.train.batch_size)
            acc = answer_accuracy(model, batches)
            out[f"passkey@{length}/depth{depth:g}"] = acc
            accs.append(acc)
        out[f"passkey@{length}"] = sum(accs) / len(accs)
    pairs, queries = mqar_shape(cfg)
    for length in (cfg.eval.mqar_lengths or [cfg.data.seq_len]) if cfg.eval.mqar_n > 0 else []:
        batches = mqar_examples(tokenizer, length, cfg.eval.mqar_n, cfg.seed + 1, pairs, queries,
                                batch_size=cfg.train.batch_size)
        out[f"mqar@{length}"] = answer_scores(model, batches)["exact"]   # share of queries answered exactly
    return out


def fmt_eval(step: int, ev: dict) -> str:
    keys = [k for k in ev if k.startswith(("passkey@", "mqar@")) and "/" not in k]
    extra = " ".join(f"{k} {ev[k]:.0%}" for k in keys)
    return f"eval step {step}: val loss {ev['loss']:.4f} ppl {ev['ppl']:.2f} {extra}".rstrip()


def train(cfg: RunConfig) -> int:
    env = setup_env(cfg.parallel)
    run_dir = cfg.run_dir
    ckpt = CheckpointManager(run_dir, keep_last=cfg.train.keep_last) if env.is_main else None
    latest = env.broadcast_object(ckpt.latest_valid(log=dist.warn) if ckpt else None)
    if latest is not None:
        done_step = int(Path(latest).name.split("-")[1])
        if done_step >= cfg.train.steps:
            dist.log(f"run {run_dir} already finished at step {done_step} (train.steps={cfg.train.steps}); "
                     "nothing to do")
            env.teardown()
            return 0

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_eval_tasks(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    check_cp_support(model, cfg)
    # described before the engine wraps it: ZeRO-3 leaves empty partitions behind
    model_line = (f"model: {model.num_params() / 1e6:.2f}M parameters, {len(model.blocks)} layers "
                  f"({', '.join(b.kind for b in model.blocks)}), "
                  f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOPs/token (train)")
    show_kernel_backends()
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak, peak_source = device_peak(env.device, cfg.train.peak_flops)
    engine = parallelize(model, cfg, env)
    train_set = build_dataset(cfg.data, tokenizer, "train", cfg.seed)
    batcher = Batcher(train_set, cfg.train.batch_size, dp_rank=env.dp_rank, dp_size=env.dp_size)
    val_batches = eval_windows(cfg.data, tokenizer, cfg.seed, batch_size=cfg.train.batch_size)

    step, tokens, elapsed_before = 0, 0, 0.0
    metrics = MetricsWriter(run_dir, enabled=env.is_main)
    if latest is not None:
        # every rank reads the (verified) files itself; only rank 0 owns the manager that prunes
        tensors, state, meta = (ckpt or CheckpointManager(Path(latest).parent.parent)).load(latest)
        engine.load_checkpoint_state(tensors, state["engine"])
        batcher.load_state_dict(state["data"])
        step, tokens, elapsed_before = meta["step"], meta["tokens"], meta.get("elapsed_s", 0.0)
        check_layout(state.get("layout"), env, cfg)
        restore_rng(state["rng"], env, cfg.seed, step)
        metrics.truncate_after(step)
        dist.log(f"resumed {run_dir} from step {step}")
    elif env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump(cfg))
        os.replace(tmp, run_dir / "config.yaml")
        dist.log(model_line)
        dist.log(f"perf: peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})" if peak else f"perf: {peak_source}")

    def save(at_step: int) -> None:
        tensors, engine_state = engine.checkpoint_state()
        state = {"engine": engine_state, "data": batcher.state_dict(), "rng": env.gather_object(rng_state()),
                 "layout": run_layout(env, cfg)}
        meta = {"step": at_step, "tokens": tokens, "elapsed_s": elapsed_before + time.time() - t_start,
                "config": cfg.name}
        if env.is_main:
            ckpt.save(at_step, tensors, state, meta)
        env.barrier()

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * env.dp_size
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (env.is_main and sys.stderr.isatty()),
               dynamic_ncols=True, desc=cfg.name)
    say = bar.write if not bar.disable else dist.log
    t_start = t_log = time.time()
    bad_steps, last_eval, start_step = 0, None, step
    profiler = StepProfiler(run_dir, cfg.train.profile_steps, enabled=env.is_main)
    model.train()
    with StopFlag() as stop:
        while step < cfg.train.steps:
            losses, aux = [], []
            profiler.begin(step + 1)
            for micro in range(cfg.train.grad_accum):
                batch = env.shard_batch(batcher.next())
                with engine.accumulating(micro == cfg.train.grad_accum - 1):
                    out = engine.module(batch["input_ids"], position_ids=batch["position_ids"],
                                        seq_ids=batch["seq_ids"], cp=env.cp)
                    loss = env.reduce_loss(model, out.hidden, batch["labels"], cfg.train.loss_chunk)
                    engine.backward((loss + out.aux_loss) / cfg.train.grad_accum)
                losses.append(loss.detach())
                aux.append(out.aux_loss.detach())
            loss = torch.stack(losses).mean()
            loss_value = env.mean(loss)
            if not math.isfinite(loss_value):
                engine.skip_step()
                bad_steps += 1
                say(f"warning: non-finite loss at step {step + 1}; update skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingError(f"loss was not finite for {bad_steps} consecutive steps (last at step "
                                        f"{step + 1}); lower optim.lr or check the data. The last checkpoint "
                                        "is intact; the run resumes from it")
                grad_norm = float("nan")
            else:
                bad_steps = 0
                grad_norm = engine.step()
            step += 1
            profiler.end(step)
            tokens += tokens_per_step
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.time()
                rec = {"step": step, "loss": loss_value, "lr": engine.lr, "grad_norm": grad_norm, "tokens": tokens,
                       "tokens_per_s": tokens_per_step * cfg.train.log_every / max(now - t_log, 1e-9),
                       "elapsed_s": elapsed_before + now - t_start}
                rec["mfu"] = mfu(rec["tokens_per_s"], flops_per_token, peak, env.world)
                if any(a.item() != 0 for a in aux):
                    rec["aux_loss"] = float(torch.stack(aux).mean())
                metrics.write(rec)
                mfu_text = "n/a" if rec["mfu"] is None else f"{rec['mfu']:.1%}"
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{engine.lr:.2e}", mfu=mfu_text)
                if bar.disable:
                    say(f"step {step}/{cfg.train.steps} loss {loss_value:.4f} lr {engine.lr:.2e} "
                        f"grad_norm {grad_norm:.3f} tok/s {rec['tokens_per_s']:.0f} mfu {mfu_text}")
                t_log = now
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                last_eval = evaluate(model, cfg, tokenizer, val_batches)
                metrics.write({"step": step, "split": "val", **last_eval})
                say(fmt_eval(step, last_eval))
            limit = cfg.train.stop_after_steps
            # every rank must take the same decision, whichever of them the signal reached first
            stopping = env.any(stop.signal is not None) or (limit is not None and step - start_step >= limit)
            if step % cfg.train.save_every == 0 or step == cfg.train.steps or stopping:
                save(step)
            if stopping and step < cfg.train.steps:
                bar.close()
                profiler.close()
                dist.log(f"stopped at step {step}; checkpoint saved in {run_dir}. "
                         "Run the same command to resume.")
                metrics.close()
                env.teardown()
                return 0
    bar.close()
    profiler.close()
    metrics.close()
    if last_eval is not None:
        dist.log("final: " + fmt_eval(step, last_eval))
    env.teardown()
    return 0
