"""The training loop: one code path for every engine.

Order of work: validate config -> process groups -> tokenizer -> model ->
engine -> data -> resume (weights, optimiser, schedule, RNG, data position)
-> steps (log, evaluate, checkpoint) -> final evaluation.
Stopping (SIGTERM/SIGINT) finishes the current step, writes a checkpoint and
exits 0; running the same command again resumes exactly.
Reliability (see each module): inputs are checked first (reliability/inputs.py),
the run folder is locked (reliability/lock.py), the recipe given now wins on
resume (checkpoint/resume_policy.py), diverged steps are skipped and never
checkpointed (reliability/guard.py), a failed save is one line and keeps the
previous checkpoint.
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
from loom.trainer.distributed import dist
from loom.trainer.checkpoint.manager import (CheckpointError, CheckpointManager, NonFiniteCheckpoint, read_meta,
                                    rng_state, step_dir_name)
from loom.trainer.config import RunConfig, dump, mqar_shape, passkey_key_digits
from loom.trainer.data import StagedBatches, load_tokenizer, mqar_examples, passkey_examples
from loom.trainer.data.schedule import check_stages_with_model
from loom.trainer.distributed.mesh import setup_env
from loom.trainer.distributed.precision import forward_autocast
from loom.trainer.checkpoint.layout import check_layout, restore_rng, run_layout
from loom.trainer.checkpoint.dcp import PendingSave, is_sharded, load_sharded, save_sharded
from loom.trainer.reliability.faults import poison_grads
from loom.trainer.reliability.guard import StepGuard, resume_advice
from loom.trainer.reliability.lock import RunLock
from loom.trainer.checkpoint.resume_policy import apply_optim_settings, check_resume, recipe_record
from loom.trainer.reliability.inputs import validate_inputs
from loom.trainer.eval.validation import answer_accuracy, answer_scores, validation
from loom.trainer.observe.logs import show_kernel_backends
from loom.trainer.eval.longeval.spec import suite_during_training
from loom.trainer.observe.metrics import MetricsWriter
from loom.trainer.distributed.parallel_check import check_cp_support
from loom.trainer.distributed.parallelize import parallelize
from loom.trainer.observe.perf import StepProfiler, device_peak, mfu


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
        from loom.trainer.hf.convert import load_converted

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


def evaluate(model: HybridLM, cfg: RunConfig, tokenizer, val_batches: list[dict],
             suite_dir: Path | None = None) -> dict:
    out = validation(model, val_batches, cfg.eval.position_buckets)
    out.update(suite_during_training(model, cfg, tokenizer, suite_dir))
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
    validate_inputs(cfg)
    check_eval_tasks(cfg, load_tokenizer(cfg.data.tokenizer))
    env = setup_env(cfg.parallel)
    lock = RunLock(cfg.run_dir) if env.is_main else None
    busy = env.broadcast_object(lock.acquire() if lock else None)
    if busy:
        env.teardown()
        raise TrainingError(busy)
    if lock is not None and lock.stale_owner:
        dist.log(f"run folder lock: taking over from {lock.stale_owner}, which ended without releasing it")
    try:
        return _train(cfg, env)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, env) -> int:
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
    resume_notice = check_resume(cfg, tokenizer, read_meta(latest)) if latest is not None else None
    model = build_model(cfg, tokenizer)
    check_stages_with_model(lambda staged: check_cp_support(model, staged), cfg)   # every seq_len stage
    # described before the engine wraps it: ZeRO-3 leaves empty partitions behind
    model_line = (f"model: {model.num_params() / 1e6:.2f}M parameters, {len(model.blocks)} layers "
                  f"({', '.join(b.kind for b in model.blocks)}), "
                  f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOPs/token (train)")
    show_kernel_backends()
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak, peak_source = device_peak(env.device, cfg.train.peak_flops)
    engine = parallelize(model, cfg, env)
    batcher = StagedBatches(cfg.data, cfg.train.batch_size, tokenizer, cfg.seed, env.dp_rank, env.dp_size,
                            cfg.parallel.cp)
    batcher.val_batches(0, cfg.train.batch_size)   # bad data fails here, before any step

    guard = StepGuard(cfg.train.max_bad_steps, cfg.train.spike_skip, cfg.train.spike_window,
                      cfg.train.spike_rewind)

    def restore(path) -> tuple[dict, dict]:
        # every rank reads the (verified) files itself; only rank 0 owns the manager that prunes
        manager = ckpt or CheckpointManager(Path(path).parent.parent)
        if is_sharded(path):
            _, state, meta = manager.load(path, weights=False)
            load_sharded(engine, path, env)
            engine.scheduler.load_state_dict(state["engine"]["scheduler"])
        else:
            tensors, state, meta = manager.load(path)
            engine.load_checkpoint_state(tensors, state["engine"])
        apply_optim_settings(engine, cfg.optim)
        guard.load_state_dict(state.get("guard"))
        restore_rng(state["rng"], env, cfg.seed, meta["step"])
        return state, meta

    step, tokens, elapsed_before = 0, 0, 0.0
    metrics = MetricsWriter(run_dir, enabled=env.is_main, warn=dist.warn)
    last_good = latest  # the newest checkpoint known to hold finite weights
    if latest is not None:
        state, meta = restore(latest)
        batcher.load_state_dict(state["data"])
        step, tokens, elapsed_before = meta["step"], meta["tokens"], meta.get("elapsed_s", 0.0)
        check_layout(state.get("layout"), env, cfg)
        dist.log(f"resumed {run_dir} from step {step}")
        if resume_notice:
            dist.log(resume_notice)
    metrics.truncate_after(step)  # a fresh start (step 0) clears the lines of an earlier attempt
    if env.is_main:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump(cfg))
        os.replace(tmp, run_dir / "config.yaml")
        dist.log(model_line)
        dist.log(f"perf: peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})" if peak else f"perf: {peak_source}")

    def save(at_step: int, background: bool = False):
        """A collective: None, or (kind, one-line message) on every rank, kind "nonfinite" or "write";
        with `background`, a PendingSave whose finish() returns that later."""
        state = {"data": batcher.state_dict(), "rng": env.gather_object(rng_state()),
                 "layout": run_layout(env, cfg), "guard": guard.state_dict()}
        meta = {"step": at_step, "tokens": tokens, "elapsed_s": elapsed_before + time.time() - t_start,
                "config": cfg.name, "checkpoint_format": cfg.train.checkpoint_format,
                **recipe_record(cfg, tokenizer)}
        if cfg.train.checkpoint_format == "sharded":
            state["engine"] = {"scheduler": engine.scheduler.state_dict()}
            if background:
                return PendingSave(ckpt, env, engine, at_step, state, meta)
            return save_sharded(ckpt, env, engine, at_step, state, meta)
        tensors, state["engine"] = engine.checkpoint_state()
        problem = None
        if env.is_main:
            try:
                ckpt.save(at_step, tensors, state, meta)
            except NonFiniteCheckpoint as e:
                problem = ("nonfinite", str(e))
            except CheckpointError as e:
                problem = ("write", str(e))
        return env.broadcast_object(problem)

    pending = None  # a background save (train.checkpoint_async) not yet committed

    def saved(at_step: int, final: bool) -> None:
        """Save (the last one and a stop save in the foreground), then go on, or stop with one line naming
        the last good checkpoint."""
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            outcome(done.step, done.finish(), final=False)
        if cfg.train.checkpoint_async and not final:
            pending = save(at_step, background=True)
            if pending.problem is not None:
                done, pending = pending, None
                outcome(at_step, done.problem, final=False)
            return
        outcome(at_step, save(at_step), final)

    def outcome(at_step: int, problem: tuple[str, str] | None, final: bool) -> None:
        nonlocal last_good
        if problem is None:
            last_good = str(run_dir / "checkpoints" / step_dir_name(at_step))
            guard.checkpointed()
            return
        kind, message = problem
        room = kind == "write" and env.broadcast_object(ckpt.has_room_for_next() if env.is_main else None)
        metrics.write({"step": at_step, "event": "checkpoint_failed", "reason": message})
        if kind == "nonfinite":
            raise TrainingError(f"{message}: the weights diverged by step {at_step}; "
                                + resume_advice(last_good, cfg.optim.lr))
        if final or not room:
            raise TrainingError(f"{message}; stopping (not enough free space to go on). "
                                f"The last good checkpoint is {last_good or 'none'}")
        say(f"warning: {message}; the previous checkpoint is intact, training goes on to the next save")

    def rewind(at_step: int) -> tuple[int, int]:
        """Back to the last good checkpoint; the data position stays, so the windows since are skipped."""
        spikes = guard.spikes
        skip_from = restore(last_good)[0]["data"]["position"]
        meta = read_meta(last_good)
        guard.checkpointed()
        metrics.truncate_after(meta["step"])
        metrics.write({"step": meta["step"], "event": "rewind", "from_step": at_step, "spikes": spikes,
                       "skipped_windows": [skip_from, batcher.position]})
        say(f"warning: {len(spikes)} loss spikes (steps {spikes}); rewound from step {at_step} to "
            f"{Path(last_good).name}, skipping windows {skip_from}..{batcher.position - 1}")
        return meta["step"], meta["tokens"]

    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (env.is_main and sys.stderr.isatty()),
               dynamic_ncols=True, desc=cfg.name)
    say = bar.write if not bar.disable else dist.log
    t_start = t_log = time.time()
    last_eval, start_step, tokens_since_log = None, step, 0
    profiler = StepProfiler(run_dir, cfg.train.profile_steps, enabled=env.is_main)
    model.train()
    with StopFlag() as stop:
        while step < cfg.train.steps:
            losses, aux = [], []
            profiler.begin(step + 1)
            for micro in range(cfg.train.grad_accum):
                batch = env.shard_batch(batcher.next(step))
                with engine.accumulating(micro == cfg.train.grad_accum - 1):
                    with forward_autocast(cfg.parallel, env.device):  # bf16 compute, fp32 master weights
                        out = engine.module(batch["input_ids"], position_ids=batch["position_ids"],
                                            seq_ids=batch["seq_ids"], cp=env.cp)
                        loss = env.reduce_loss(model, out.hidden, batch["labels"], cfg.train.loss_chunk)
                    engine.backward((loss + out.aux_loss) / cfg.train.grad_accum)
                losses.append(loss.detach())
                aux.append(out.aux_loss.detach())
            poison_grads(model, step + 1)  # test hook, a no-op unless LOOM_TEST_NAN_STEPS is set
            loss = torch.stack(losses).mean()
            loss_value = env.mean(loss)
            skipped = guard.check_loss(loss_value)
            if skipped is None:
                grad_norm = engine.step()  # skips the update itself when the global grad norm is not finite
            else:
                engine.skip_step()
                grad_norm = float("nan")
            event = guard.record(step + 1, loss_value, grad_norm, skipped)
            if event is not None:
                metrics.write(event)
                say(f"warning: step {step + 1}: {event['reason'].replace('_', ' ')}; update skipped")
            if guard.should_stop:
                raise TrainingError(f"{guard.bad_in_a_row} consecutive steps with a non-finite loss or gradient "
                                    f"norm (last at step {step + 1}); " + resume_advice(last_good, cfg.optim.lr))
            if guard.should_rewind and last_good is None:
                say(f"warning: {len(guard.spikes)} loss spikes but no checkpoint to rewind to; training goes on")
                guard.checkpointed()
            elif guard.should_rewind:
                step, tokens = rewind(step + 1)
                bar.reset(total=cfg.train.steps)
                bar.update(step)
                continue
            tokens_per_step = batcher.tokens_per_step(step, cfg.train.grad_accum)
            step += 1
            profiler.end(step)
            tokens += tokens_per_step
            tokens_since_log += tokens_per_step
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.time()
                rec = {"step": step, "loss": loss_value, "lr": engine.lr, "grad_norm": grad_norm, "tokens": tokens,
                       "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
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
                t_log, tokens_since_log = now, 0
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                last_eval = evaluate(model, cfg, tokenizer, batcher.val_batches(step, cfg.train.batch_size),
                                     run_dir / "eval" / f"step-{step:08d}" if env.is_main else None)
                stage = batcher.stage(step - 1)
                last_eval.update(seq_len=stage.seq_len, stage=stage.index)
                metrics.write({"step": step, "split": "val", **last_eval})
                say(fmt_eval(step, last_eval))
            limit = cfg.train.stop_after_steps
            # every rank must take the same decision, whichever of them the signal reached first
            stopping = env.any(stop.signal is not None) or (limit is not None and step - start_step >= limit)
            if step % cfg.train.save_every == 0 or step == cfg.train.steps or stopping:
                saved(step, final=step == cfg.train.steps or stopping)
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
