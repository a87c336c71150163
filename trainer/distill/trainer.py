"""The distillation loop: the Trainer with a teacher beside the student.

`distill.teacher` turns a run into distillation (`loom train` dispatches here). The
student is built from the recipe's `model:` (same width, depth and vocabulary as the
teacher, some layers of another mixer kind) and starts from the teacher's weights
(teacher.py: init_student); the stages of `distill.stages` (config.py) then train it:

  align   the teacher runs under no_grad; forward hooks keep, per replaced layer i, the
          mixer's input (the normed hidden state) and its output. Each student mixer i
          runs on that input alone and is fitted to that output (MSE, the mean over layers
          of each layer's mean squared error). Only the replaced mixers' parameters get
          gradients; no full-model backward. Logged: `align_mse` (and per layer
          `align_mse/<i>`), `teacher_loss`; `kl` is null.
  kl      end to end: loss = kl_weight * T^2 * KL + (1 - kl_weight) * LM loss, with KL the
          mean over labelled tokens of KL(teacher || student) at temperature T (kl.py,
          chunk by chunk: no full-vocabulary logits of either model). The teacher runs
          under no_grad in the same process on the same shard (context parallelism: the
          teacher gets the same cp handle; its KL sum is token-local, the count global).
          Logged: `kl`, `teacher_loss`, `lm_loss`; `loss` is the objective.

The stage of a step is a function of the step alone, so a resumed run continues the
schedule exactly (the teacher is fixed and takes no RNG). The teacher is replicated on
every rank under ddp and deepspeed ZeRO 0-2; under fsdp it is sharded as the student is
(shard_teacher: FSDP2 per block, then the root), under ZeRO-3 partitioned as the student
is (deepspeed_engine.partition_frozen: DeepSpeed's parameter-only engine, the run's
zero_optimization section). The head weights, used outside any module by the KL and the
teacher's loss, are made whole for those calls: the student's through a ZeRO-3 head call
(`head_calls`, gathered again in backward), the teacher's by a gathered context.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import torch.distributed as tdist

from loom.kernels.loss import linear_cross_entropy
from loom.models import HybridLM
from loom.models.config import ConfigError
from loom.models.mixers import SeqContext
from loom.models.model import softcap
from loom.trainer.data.schedule import resolve_stages
from loom.trainer.distill.config import stage_at
from loom.trainer.distill.kl import chunked_kl
from loom.trainer.distill.teacher import _in_replaced_mixer, init_student, load_teacher
from loom.trainer.distributed import dist
from loom.trainer.distributed.precision import forward_autocast
from loom.trainer.train import Trainer, build_model, train

__all__ = ["DistillTrainer", "train_distill", "capture_mixers", "align_losses"]


def train_distill(cfg) -> int:
    """`loom train` of a recipe with distill.teacher."""
    return train(cfg, DistillTrainer)


def capture_mixers(teacher: HybridLM, layers: list[int], input_ids, position_ids=None, seq_ids=None, cp=None):
    """Teacher forward under no_grad keeping each listed layer's mixer input and output.
    Returns (ModelOutput, {i: (input (B, T, D), output (B, T, D))}, the SeqContext the mixers saw)."""
    pairs, seen = {}, {}

    def hook(i):
        def keep(module, args, output):
            pairs[i] = (args[0], output[0])
            seen["ctx"] = args[1]
        return keep

    handles = [teacher.blocks[i].mixer.register_forward_hook(hook(i)) for i in layers]
    try:
        with torch.no_grad():
            out = teacher(input_ids, position_ids=position_ids, seq_ids=seq_ids, cp=cp)
    finally:
        for h in handles:
            h.remove()
    return out, pairs, seen.get("ctx")


def align_losses(student: HybridLM, pairs: dict, ctx: SeqContext) -> dict[int, torch.Tensor]:
    """Per replaced layer i: mean squared error of student mixer i on the teacher's input
    against the teacher's mixer output (gradients reach that mixer only)."""
    out = {}
    for i, (x, y) in pairs.items():
        c = SeqContext(position_ids=ctx.position_ids, seq_ids=ctx.seq_ids, want_state=False, cp=ctx.cp)
        y_s, _ = student.blocks[i].mixer(x, c, None)
        out[i] = (y_s.float() - y.float()).pow(2).mean()
    return out


def shard_teacher(teacher: HybridLM, parallel, env) -> None:
    """FSDP2 `fully_shard` of the frozen teacher as the fsdp engine shards the student: each
    block its own unit (all-gathered when it runs, freed after), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from loom.trainer.distributed.precision import use_bf16

    mesh = init_device_mesh(env.device.type, (tdist.get_world_size(),), mesh_dim_names=("shard",))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if use_bf16(parallel, env.device) else MixedPrecisionPolicy()
    for block in teacher.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(teacher, mesh=mesh, mp_policy=mp)


def _full(w: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole tensor (an FSDP2-sharded DTensor is gathered)."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def student_kl(lm: HybridLM, h_s: torch.Tensor, *args) -> torch.Tensor:
    """chunked_kl with the student's own head weight (a ZeRO-3 head call: see DistillTrainer)."""
    return chunked_kl(h_s, lm.head_weight, *args)


def head_loss_sum(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, cap: float | None,
                  chunk: int) -> torch.Tensor:
    """Summed next-token loss of head weight `w` (no gradient wanted), soft-capped like HybridLM.loss."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if cap is None:
        return linear_cross_entropy(h, w, y, reduction="sum", chunk=chunk)
    return sum(F.cross_entropy(softcap(F.linear(h[a:a + chunk], w).float(), cap), y[a:a + chunk],
                               ignore_index=-100, reduction="sum") for a in range(0, h.shape[0], chunk))


class DistillTrainer(Trainer):
    """Trainer + teacher: forward_backward_step follows the stage of distill.stages."""

    def build_model(self) -> HybridLM:
        cfg = self.cfg
        student = build_model(cfg, self.tokenizer)
        student.head_calls = {"kl": student_kl}   # routed through a module under ZeRO-3 (deepspeed_engine)
        self.teacher, what = load_teacher(cfg.distill.teacher, student.cfg)
        self.init_report = report = init_student(student, self.teacher)
        self.replaced = report.replaced
        stages = cfg.distill.stages
        if any(s.kind == "align" for s in stages) and not self.replaced:
            raise ConfigError("distill.stages has an align stage but model.layers replaces no teacher layer")
        frozen = [n for n, p in student.named_parameters() if any(n.startswith(f) for f in cfg.distill.freeze)]
        for n, p in student.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        self.align_names = [n for n, _ in student.named_parameters() if _in_replaced_mixer(n, self.replaced)]
        align_frozen = [n for n, _ in student.named_parameters() if n not in self.align_names]
        seq_len = max(st.seq_len for st in resolve_stages(cfg.data, cfg.train.batch_size, cfg.parallel.cp))
        t_bytes, s_bytes = sum(self.teacher.state_bytes(seq_len).values()), sum(student.state_bytes(seq_len).values())
        t_kinds = self.teacher.cfg.layer_kinds()
        self._startup = [
            f"distill: teacher {cfg.distill.teacher} ({what}; {self.teacher.num_params() / 1e6:.2f}M parameters, "
            f"{', '.join(t_kinds)})",
            f"distill: replaced layers {', '.join(f'{i}: {t_kinds[i]} -> {student.cfg.layer_kinds()[i]}' for i in self.replaced) or 'none'}",
            *report.lines(align_frozen),
            f"distill: frozen in every stage (distill.freeze) {len(frozen)} tensors" + (f": {', '.join(frozen)}" if frozen else ""),
            f"distill: decoding state at {seq_len} tokens: teacher {t_bytes / 2**20:.2f} MiB, student "
            f"{s_bytes / 2**20:.2f} MiB per sequence (bf16)",
            "distill: stages " + ", ".join(f"{s.kind} x{s.steps}" + (f" (T {s.temperature:g}, kl_weight {s.kl_weight:g})"
                                                              if s.kind == "kl" else "") for s in stages or [])]
        self.stage_index = None
        self._extras: list[dict] = []
        return student

    def __init__(self, cfg, env, manager, latest):
        super().__init__(cfg, env, manager, latest)
        self.teacher.to(env.device)
        engine = getattr(self.engine, "name", None)
        self._teacher_zero3 = engine == "deepspeed" and self.engine.stage == 3
        if engine == "fsdp":
            shard_teacher(self.teacher, cfg.parallel, env)
            self._startup.append(f"distill: teacher sharded like the student (fsdp: {len(self.teacher.blocks)} "
                                 f"blocks and the root over {env.world} rank(s))")
        elif self._teacher_zero3:
            from loom.trainer.distributed.deepspeed_engine import partition_frozen
            held, total = partition_frozen(self.teacher, self.engine)
            self._startup.append(f"distill: teacher partitioned like the student (ZeRO-3 over {env.world} rank(s)): "
                                 f"{held} of {total} elements on rank {env.rank}")
        routed = getattr(self.model, "kl", None)   # the ZeRO-3 head call, else the plain function
        self._student_kl = routed if isinstance(routed, torch.nn.Module) else functools.partial(student_kl, self.model)
        if env.is_main:
            for line in self._startup:
                dist.log(line)

    # ------------------------------------------------------------------ steps

    def train_step(self):
        self._extras = []
        return super().train_step()

    def forward_backward_step(self, batch: dict, last: bool, count: torch.Tensor | None = None):
        """As Trainer.forward_backward_step: returns this micro-batch's share of the step's loss
        (the shares add up to it), the LM and KL terms as shares of the mean over the labelled
        tokens of the whole step (`count`, env.count_labels), align's MSE as 1/grad_accum of it."""
        index, stage = stage_at(self.cfg.distill, self.step)
        if index != self.stage_index:
            if self.stage_index is not None or self.step > 0:
                self.say(f"distill: step {self.step + 1}: stage {index} ({stage.kind})")
            self.stage_index = index
        if stage.kind == "align":
            return self._align(batch, last)
        return self._kl(batch, last, stage, count)

    def _global_mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """A token sum over this rank -> the rank's share of the global mean (as env.reduce_loss)."""
        env = self.env
        if env.world == 1:
            return total / count.clamp_min(1)
        count = count.float().clone()
        tdist.all_reduce(count)
        return total / count.clamp_min(1) * env.world

    @contextlib.contextmanager
    def _teacher_head(self):
        """The teacher's head weight, whole (gathered when fsdp shards or ZeRO-3 partitions it)."""
        w = self.teacher.head_weight
        with self.engine.gathered([w]) if self._teacher_zero3 else contextlib.nullcontext():
            yield _full(w)

    def _teacher_loss(self, hidden: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The teacher's next-token loss (no_grad) with its whole head weight `w`, this rank's
        share of the global mean."""
        total = head_loss_sum(hidden, w, labels, self.teacher.cfg.logit_softcap, self.cfg.train.loss_chunk)
        return self._global_mean(total, (labels != -100).sum())

    def _align(self, batch: dict, last: bool):
        cfg, env = self.cfg, self.env
        with forward_autocast(cfg.parallel, env.device):
            out, pairs, ctx = capture_mixers(self.teacher, self.replaced, batch["input_ids"], batch["position_ids"],
                                             batch["seq_ids"], env.cp)
            with torch.no_grad(), self._teacher_head() as w_t:
                teacher_loss = self._teacher_loss(out.hidden, batch["labels"], w_t)
            per_layer = align_losses(self.model, pairs, ctx)
            mse = torch.stack(list(per_layer.values())).mean()
        share = mse / cfg.train.grad_accum
        share.backward()
        if last and env.world > 1:   # the mixers ran outside the engine's wrapper: average their gradients here
            for n, p in self.model.named_parameters():
                if n in self.align_names and p.grad is not None:
                    tdist.all_reduce(p.grad)
                    p.grad.div_(env.world)
        self._extras.append({"align_mse": mse.detach(), "teacher_loss": teacher_loss.detach(),
                             **{f"align_mse/{i}": v.detach() for i, v in per_layer.items()}})
        return share.detach(), torch.zeros(())

    def _share(self, total: torch.Tensor, mask_count: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
        """A token sum over this rank -> its share of the step's mean over `count` labelled tokens
        (as env.reduce_loss with a count), or of this micro-batch's mean when count is None."""
        if count is None:
            return self._global_mean(total, mask_count) / self.cfg.train.grad_accum
        return total / count.clamp_min(1) * self.env.world

    def _kl(self, batch: dict, last: bool, stage, count: torch.Tensor | None = None):
        cfg, env, engine = self.cfg, self.env, self.engine
        labels = batch["labels"]
        with engine.accumulating(last):
            with forward_autocast(cfg.parallel, env.device):
                out = engine.module(batch["input_ids"], position_ids=batch["position_ids"],
                                    seq_ids=batch["seq_ids"], cp=env.cp)
                with torch.no_grad():
                    t_out = self.teacher(batch["input_ids"], position_ids=batch["position_ids"],
                                         seq_ids=batch["seq_ids"], cp=env.cp)
                lm = env.reduce_loss(self.model, out.hidden, labels, cfg.train.loss_chunk, count)
                if count is None:
                    lm = lm / cfg.train.grad_accum
                mask = (labels != -100).reshape(-1)
                D = out.hidden.shape[-1]
                with self._teacher_head() as w_t:
                    with torch.no_grad():
                        teacher_loss = self._teacher_loss(t_out.hidden, labels, w_t)
                    kl_sum = self._student_kl(out.hidden.reshape(-1, D), t_out.hidden.reshape(-1, D), w_t, mask,
                                              stage.temperature, cfg.train.loss_chunk, self.model.cfg.logit_softcap,
                                              self.teacher.cfg.logit_softcap)
                kl = self._share(kl_sum, mask.sum(), count)
                w, T = stage.kl_weight, stage.temperature
                loss = w * T * T * kl + (1 - w) * lm
            engine.backward(loss + out.aux_loss / cfg.train.grad_accum)
        # logged per micro-batch as global means, averaged over the step by extra_metrics (lm_loss:
        # its share scaled back, exact when the micro-batches hold equal numbers of labelled tokens)
        with torch.no_grad():
            self._extras.append({"kl": self._global_mean(kl_sum.detach(), mask.sum()), "teacher_loss":
                                 teacher_loss.detach(), "lm_loss": lm.detach() * cfg.train.grad_accum})
        return loss.detach(), out.aux_loss.detach()

    def extra_metrics(self) -> dict:
        index, stage = stage_at(self.cfg.distill, self.step - 1)
        rec = {"distill_stage": index, "kl": None, "teacher_loss": None}
        keys = dict.fromkeys(k for e in self._extras for k in e)
        for k in sorted(keys, key=lambda k: (k.startswith("align_mse/"), k)):
            rec[k] = self.env.mean(torch.stack([e[k] for e in self._extras]).mean())
        return rec
