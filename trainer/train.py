"""The training loop: one code path for every engine.

Order of work: validate config -> process groups -> tokenizer -> model ->
engine -> data -> resume (weights, optimiser, schedule, RNG, data position)
-> steps (log, evaluate, checkpoint) -> final evaluation.
`train(cfg)` does the first two and locks the run folder; a `Trainer` holds the
run's state and reads as its steps (torchtitan's layout):

    Trainer.train()                      the steps left, then the final line
        train_step()                     grad_accum micro-batches, the guard, the optimiser step
            forward_backward_step()      one micro-batch: forward, loss, backward
        log() / evaluate()               on train.log_every / train.eval_every
        checkpointer.due() / .save()     on train.save_every, the last step, a stop

The Checkpointer (checkpoint/checkpointer.py) owns the save cadence, the
asynchronous save in flight, the last good checkpoint and rewind.
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
from loom.trainer.checkpoint.checkpointer import Checkpointer
from loom.trainer.checkpoint.layout import check_layout, run_layout
from loom.trainer.checkpoint.manager import CheckpointManager, read_meta, rng_state
from loom.trainer.checkpoint.resume_policy import check_resume, recipe_record
from loom.trainer.config import RunConfig, dump, mqar_shape, passkey_key_digits
from loom.trainer.data import StagedBatches, load_tokenizer, mqar_examples, passkey_examples
from loom.trainer.data.schedule import check_stages_with_model, resolve_stages
from loom.trainer.distributed import dist
from loom.trainer.distributed.mesh import setup_env
from loom.trainer.distributed.parallel_check import check_cp_support
from loom.trainer.distributed.parallelize import parallelize
from loom.trainer.distributed.precision import forward_autocast
from loom.trainer.eval.longeval.spec import suite_during_training, suite_spec
from loom.trainer.eval.validation import answer_accuracy, answer_scores, validation
from loom.trainer.observe.logs import show_kernel_backends
from loom.trainer.observe.metrics import MetricsWriter
from loom.trainer.observe.perf import StepProfiler, device_peak, mfu
from loom.trainer.reliability.faults import poison_grads
from loom.trainer.reliability.guard import StepGuard, TrainingError, resume_advice
from loom.trainer.reliability.inputs import validate_inputs
from loom.trainer.reliability.lock import RunLock

__all__ = ["Trainer", "TrainingError", "build_model", "evaluate", "fmt_eval", "model_config_for", "train"]


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
    if cfg.eval.suite_tasks:
        spec = suite_spec(cfg.eval, cfg.data.seq_len, cfg.train.batch_size, passkey_key_digits(cfg), mqar_shape(cfg))
        out.update(suite_during_training(model, tokenizer, spec, cfg.data, cfg.eval.suite_val_windows, cfg.seed,
                                         suite_dir))
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


def train(cfg: RunConfig, trainer_cls: type | None = None) -> int:
    """`loom train`: check the inputs, set up the processes, lock the run folder, then run
    (or resume) the Trainer (or `trainer_cls`, a subclass: loom.trainer.distill). Returns the exit code."""
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
        manager = CheckpointManager(cfg.run_dir, keep_last=cfg.train.keep_last) if env.is_main else None
        latest = env.broadcast_object(manager.latest_valid(log=dist.warn) if manager else None)
        done_step = int(Path(latest).name.split("-")[1]) if latest is not None else 0
        if latest is not None and done_step >= cfg.train.steps:
            dist.log(f"run {cfg.run_dir} already finished at step {done_step} (train.steps={cfg.train.steps}); "
                     "nothing to do")
            env.teardown()
            return 0
        return (trainer_cls or Trainer)(cfg, env, manager, latest).train()
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    """One run's state (model, engine, data, guard, metrics, checkpointer, counters) and the
    loop over it: train -> train_step -> forward_backward_step.

    cfg: the recipe; env: this process's Env; manager: the run's CheckpointManager on
    rank 0 (None elsewhere); latest: the checkpoint to resume from, or None.
    Building it does everything before the first step (the model, the engine, the data,
    the resume); `train()` runs the steps and returns the exit code.
    """

    def __init__(self, cfg: RunConfig, env, manager: CheckpointManager | None, latest: str | None):
        self.cfg, self.env = cfg, env
        self.bar = None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        resume_notice = check_resume(cfg, self.tokenizer, read_meta(latest)) if latest is not None else None
        self.model = model = self.build_model()
        p = cfg.parallel
        check_stages_with_model(lambda seq_len: check_cp_support(model, p.cp, p.cp_impl, seq_len),
                                cfg.data, cfg.train.batch_size, p.cp)   # every seq_len stage
        # described before the engine wraps it: ZeRO-3 leaves empty partitions behind
        model_line = (f"model: {model.num_params() / 1e6:.2f}M parameters, {len(model.blocks)} layers "
                      f"({', '.join(b.kind for b in model.blocks)}), "
                      f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOPs/token (train)")
        self.flops_per_token = {st.seq_len: model.flops_per_token(st.seq_len)   # MFU at each stage's length
                                for st in resolve_stages(cfg.data, cfg.train.batch_size, p.cp)}
        show_kernel_backends()
        self.peak, peak_source = device_peak(env.device, cfg.train.peak_flops)
        self.engine = parallelize(model, cfg.train, cfg.parallel, cfg.optim, env)
        self.batcher = StagedBatches(cfg.data, cfg.train.batch_size, self.tokenizer, cfg.seed, env.dp_rank,
                                     env.dp_size, cfg.parallel.cp)
        self.batcher.val_batches(0, cfg.train.batch_size)   # bad data fails here, before any step
        self.guard = StepGuard(cfg.train.max_bad_steps, cfg.train.spike_skip, cfg.train.spike_window,
                               cfg.train.spike_rewind)
        self.metrics = MetricsWriter(cfg.run_dir, enabled=env.is_main, warn=dist.warn)
        self.checkpointer = Checkpointer(cfg.run_dir, manager, env, self.engine, self.guard, self.metrics, cfg.train,
                                         cfg.optim, cfg.seed, self.say, last_good=latest)
        self.step, self.tokens, self.elapsed_before, self.loss_tokens = 0, 0, 0.0, 0
        if latest is not None:
            self._resume(latest, resume_notice)
        self.metrics.truncate_after(self.step)  # a fresh start (step 0) clears the lines of an earlier attempt
        if env.is_main:
            tmp = cfg.run_dir / "config.yaml.tmp"
            tmp.write_text(dump(cfg))
            os.replace(tmp, cfg.run_dir / "config.yaml")
            dist.log(model_line)
            dist.log(f"perf: peak {self.peak / 1e12:.3g} TFLOP/s per device ({peak_source})" if self.peak
                     else f"perf: {peak_source}")

    def build_model(self) -> HybridLM:
        """The model of the run, before the engine wraps it (a subclass adds to it)."""
        if self.cfg.distill.teacher is not None and type(self) is Trainer:
            raise ConfigError("distill.teacher is set: run it with `loom train` (loom.trainer.distill.train_distill)")
        return build_model(self.cfg, self.tokenizer)

    def extra_metrics(self) -> dict:
        """Fields a subclass adds to each metrics.jsonl train line (a collective: every rank calls it)."""
        return {}

    def _resume(self, latest: str, notice: str | None) -> None:
        state, meta = self.checkpointer.restore(latest)
        self.batcher.load_state_dict(state["data"])
        self.step, self.tokens, self.elapsed_before = meta["step"], meta["tokens"], meta.get("elapsed_s", 0.0)
        self.loss_tokens = meta.get("loss_tokens", 0)
        check_layout(state.get("layout"), self._layout())
        dist.log(f"resumed {self.cfg.run_dir} from step {self.step}")
        if notice:
            dist.log(notice)

    def _layout(self) -> dict:
        t = self.cfg.train
        return run_layout(self.env, self.cfg.parallel.engine, t.batch_size, t.grad_accum)

    def say(self, msg: str) -> None:
        """One line for the user: above the progress bar when there is one."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            dist.log(msg)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run the steps left; save, evaluate and log on their cadences; stop (exit code 0,
        checkpoint saved) on SIGTERM/SIGINT or after train.stop_after_steps."""
        cfg, env = self.cfg, self.env
        self.bar = tqdm(total=cfg.train.steps, initial=self.step, dynamic_ncols=True, desc=cfg.name,
                        disable=not (env.is_main and sys.stderr.isatty()))
        self.t_start = self.t_log = time.time()
        self.last_eval, start_step, self.tokens_since_log = None, self.step, 0
        self.profiler = StepProfiler(cfg.run_dir, cfg.train.profile_steps, enabled=env.is_main)
        self.model.train()
        with StopFlag() as stop:
            while self.step < cfg.train.steps:
                result = self.train_step()
                if result is None:   # rewound to the last good checkpoint
                    continue
                step = self.step
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    self.log(*result)
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    self.evaluate()
                limit = cfg.train.stop_after_steps
                # every rank must take the same decision, whichever of them the signal reached first
                stopping = env.any(stop.signal is not None) or (limit is not None and step - start_step >= limit)
                if self.checkpointer.due(step, stopping):
                    self.checkpointer.save(step, step == cfg.train.steps or stopping, self.checkpoint_contents)
                if stopping and step < cfg.train.steps:
                    self.close(f"stopped at step {step}; checkpoint saved in {cfg.run_dir}. "
                               "Run the same command to resume.")
                    return 0
        self.close("final: " + fmt_eval(self.step, self.last_eval) if self.last_eval is not None else None)
        return 0

    def train_step(self) -> tuple[float, float, list] | None:
        """One optimiser step over train.grad_accum micro-batches, guarded: returns (loss,
        grad_norm, aux losses), or None when the guard rewound the run instead."""
        cfg, env, guard = self.cfg, self.env, self.guard
        losses, aux = [], []
        self.profiler.begin(self.step + 1)
        # the loss is the mean over the labelled tokens of the whole global batch (all micro-batches,
        # all ranks), counted first: per-micro-batch means would weight short (chat) answers up
        batches = [env.shard_batch(self.batcher.next(self.step)) for _ in range(cfg.train.grad_accum)]
        count = env.count_labels([b["labels"] for b in batches])
        for micro, batch in enumerate(batches):
            loss, aux_loss = self.forward_backward_step(batch, last=micro == cfg.train.grad_accum - 1, count=count)
            losses.append(loss)
            aux.append(aux_loss)
        poison_grads(self.model, self.step + 1)  # test hook, a no-op unless LOOM_TEST_NAN_STEPS is set
        loss_value = env.mean(torch.stack(losses).sum())
        skipped = guard.check_loss(loss_value)
        if skipped is None:
            grad_norm = self.engine.step()  # skips the update itself when the global grad norm is not finite
        else:
            self.engine.skip_step()
            grad_norm = float("nan")
        if self._guarded(loss_value, grad_norm, skipped):
            return None
        tokens_per_step = self.batcher.tokens_per_step(self.step, cfg.train.grad_accum)
        self.step += 1
        self.profiler.end(self.step)
        self.tokens += tokens_per_step
        self.loss_tokens += int(count)   # whole windows' labels: cp slices add up over the ranks
        self.tokens_since_log += tokens_per_step
        self.bar.update(1)
        return loss_value, grad_norm, aux

    def forward_backward_step(self, batch: dict, last: bool,
                              count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (this rank's shard); `last`: the final
        micro-batch of the step (gradients synchronise); `count`: labelled tokens of the whole
        step (env.count_labels). Returns (loss share, aux_loss), detached: the step's loss is
        the sum of the shares."""
        cfg, env, engine = self.cfg, self.env, self.engine
        with engine.accumulating(last):
            with forward_autocast(cfg.parallel, env.device):  # bf16 compute, fp32 master weights
                out = engine.module(batch["input_ids"], position_ids=batch["position_ids"],
                                    seq_ids=batch["seq_ids"], cp=env.cp)
                loss = env.reduce_loss(self.model, out.hidden, batch["labels"], cfg.train.loss_chunk, count)
            engine.backward(loss + out.aux_loss / cfg.train.grad_accum)
        return loss.detach(), out.aux_loss.detach()

    def _guarded(self, loss: float, grad_norm: float, skipped: str | None) -> bool:
        """Record the step with the guard; stop the run (TrainingError) or rewind it (True)
        when the guard says so."""
        step, guard = self.step + 1, self.guard
        event = guard.record(step, loss, grad_norm, skipped)
        if event is not None:
            self.metrics.write(event)
            self.say(f"warning: step {step}: {event['reason'].replace('_', ' ')}; update skipped")
        last_good = self.checkpointer.last_good
        if guard.should_stop:
            raise TrainingError(f"{guard.bad_in_a_row} consecutive steps with a non-finite loss or gradient "
                                f"norm (last at step {step}); " + resume_advice(last_good, self.cfg.optim.lr))
        if guard.should_rewind and last_good is None:
            self.say(f"warning: {len(guard.spikes)} loss spikes but no checkpoint to rewind to; training goes on")
            guard.checkpointed()
        elif guard.should_rewind:
            self.step, self.tokens = self.checkpointer.rewind(step, self.batcher.position)
            self.loss_tokens = read_meta(self.checkpointer.last_good).get("loss_tokens", 0)
            self.bar.reset(total=self.cfg.train.steps)
            self.bar.update(self.step)
            return True
        return False

    # ------------------------------------------------------------------ around the steps

    def log(self, loss: float, grad_norm: float, aux: list) -> None:
        """A metrics.jsonl line and the progress line. MFU counts the FLOPs per token at this
        step's sequence length (data.seq_len_schedule)."""
        step, engine = self.step, self.engine
        now = time.time()
        rec = {"step": step, "loss": loss, "lr": engine.lr, "grad_norm": grad_norm, "tokens": self.tokens,
               "loss_tokens": self.loss_tokens,
               "tokens_per_s": self.tokens_since_log / max(now - self.t_log, 1e-9),
               "elapsed_s": self.elapsed_before + now - self.t_start}
        seq_len = self.batcher.stage(step - 1).seq_len
        rec["mfu"] = mfu(rec["tokens_per_s"], self.flops_per_token[seq_len], self.peak, self.env.world)
        if any(a.item() != 0 for a in aux):
            rec["aux_loss"] = float(torch.stack(aux).mean())
        rec.update(self.extra_metrics())
        self.metrics.write(rec)
        mfu_text = "n/a" if rec["mfu"] is None else f"{rec['mfu']:.1%}"
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{engine.lr:.2e}", mfu=mfu_text)
        if self.bar.disable:
            self.say(f"step {step}/{self.cfg.train.steps} loss {loss:.4f} lr {engine.lr:.2e} "
                     f"grad_norm {grad_norm:.3f} tok/s {rec['tokens_per_s']:.0f} mfu {mfu_text}")
        self.t_log, self.tokens_since_log = now, 0

    def evaluate(self) -> None:
        """The evaluation of eval.* at this step's stage; a metrics line and a progress line."""
        cfg, step = self.cfg, self.step
        suite_dir = cfg.run_dir / "eval" / f"step-{step:08d}" if self.env.is_main else None
        self.last_eval = evaluate(self.model, cfg, self.tokenizer,
                                  self.batcher.val_batches(step, cfg.train.batch_size), suite_dir)
        stage = self.batcher.stage(step - 1)
        self.last_eval.update(seq_len=stage.seq_len, stage=stage.index)
        self.metrics.write({"step": step, "split": "val", **self.last_eval})
        self.say(fmt_eval(step, self.last_eval))

    def checkpoint_contents(self) -> tuple[dict, dict]:
        """The loop's part of a checkpoint at this step: (state, meta). A collective (every
        rank's RNG state is gathered)."""
        cfg = self.cfg
        state = {"data": self.batcher.state_dict(), "rng": self.env.gather_object(rng_state()),
                 "layout": self._layout(), "guard": self.guard.state_dict()}
        meta = {"step": self.step, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "elapsed_s": self.elapsed_before + time.time() - self.t_start, "config": cfg.name,
                "checkpoint_format": cfg.train.checkpoint_format, **recipe_record(cfg, self.tokenizer)}
        return state, meta

    def close(self, last_line: str | None) -> None:
        """End the run's outputs, print `last_line` (if any), then leave the process group."""
        self.bar.close()
        self.profiler.close()
        self.metrics.close()
        if last_line is not None:
            dist.log(last_line)
        self.env.teardown()
