"""`deepspeed`: DeepSpeed ZeRO stage 0-3, with optional CPU offload.

The DeepSpeed config comes from the recipe (`deepspeed_config` below) or from
`parallel.deepspeed_config` (a JSON such as recipes/deepspeed/zero3.json, whose
"auto" values are filled from the recipe). Loom keeps the maths of the single
engine: the optimiser is loom.trainer.optim's AdamW (passed to DeepSpeed as the
client optimiser, which ZeRO partitions), the schedule is Loom's LambdaLR on
it, clipping is DeepSpeed's (the same formula as torch's clip_grad_norm_),
and `step()` returns the global gradient norm before clipping.

Gradient accumulation: the loop's `accumulating(last)` sets DeepSpeed's
accumulation boundary, `backward` never rescales (the loop already divides the
loss by train.grad_accum), and `step()` runs once per optimiser step.

ZeRO-3 frees each parameter after its module runs; the loop's `model.loss`
and evaluation's `model.logits` use the tied head weight outside any module,
so under stage 3 both are routed through small parameter-free modules that
DeepSpeed hooks (`_head_calls_inside_modules`).

Checkpoints are world-size independent: full fp32 master weights by name
(safe_get_full_fp32_param, which all-gathers ZeRO-3 partitions) and the
name-keyed AdamW state of trainer/checkpoint/optim_state.py (safe_get_full_optimizer_state),
written by rank 0 and loaded into any partitioning with the matching
safe_set_* calls.

CPU: DeepSpeed needs DS_ACCELERATOR=cpu (set here before the import when no
GPU is present), and `torch._dynamo` must be imported before deepspeed or
ZeRO-3's parameter conversion fails on torch 2.13 with a signature mismatch.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from loom.models.config import ConfigError
from loom.trainer.distributed import dist
from loom.trainer.distributed.mesh import ensure_process_group
from loom.trainer.distributed.precision import use_bf16
from loom.trainer.optim import build_optimizer, build_scheduler, param_groups
from loom.trainer.checkpoint.optim_state import is_named, load_named_state, named_state


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("torch._dynamo")  # before deepspeed: see the module docstring
    # DeepSpeed's collectives call torch names deprecated in 2.13, once per call
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed

    deepspeed.utils.logger.addFilter(_quiet_model_output_warning)
    return deepspeed


def _quiet_model_output_warning(record) -> bool:
    """Drop ZeRO-3's warning that it cannot see the tensors inside HybridLM's
    ModelOutput: the hooks it would attach there fetch the root module's own
    parameters, and HybridLM's root owns none (the parity tests cover ZeRO-3)."""
    return "ModelOutput" not in record.getMessage()


def deepspeed_config(p, batch_size: int, grad_accum: int, grad_clip: float, device: torch.device) -> dict:
    """The DeepSpeed JSON for this run: generated from the recipe, or
    parallel.deepspeed_config with its "auto" values filled in.

    p: parallel.* (zero, offloads, deepspeed_config, dtype); batch_size,
    grad_accum: train.batch_size, train.grad_accum; grad_clip: optim.grad_clip.

    Raises ConfigError when the JSON contradicts the recipe (a batch size,
    clipping or ZeRO stage that differs, an "optimizer"/"scheduler" section:
    Loom builds those from optim.*).
    """
    bf16 = use_bf16(p, device)
    recipe = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": grad_clip}
    if p.deepspeed_config is None:
        zero: dict = {"stage": p.zero}
        if p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        ds = {**recipe, "zero_optimization": zero, "bf16": {"enabled": bf16}}
        where = "parallel"
    else:
        path = Path(p.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config: file not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON ({e})") from None
        where = str(path)
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(f"{path}: remove the {key!r} section; Loom builds the optimizer and the lr "
                                  "schedule from optim.* so that every engine does the same maths")
        if ds.get("fp16", {}).get("enabled") not in (None, False):
            raise ConfigError(f"{path}: fp16 is not supported; use bf16 (parallel.dtype)")
        for key, value in recipe.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
            elif ds[key] != value:
                raise ConfigError(f"{path}: {key}={ds[key]} but the recipe gives {value}; set it to \"auto\"")
        bf16_json = ds.get("bf16", {}).get("enabled", "auto")
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16 if bf16_json == "auto" else bool(bf16_json)}
        if ds["bf16"]["enabled"] and device.type != "cuda":
            raise ConfigError(f"{path}: bf16 needs CUDA; set bf16.enabled to \"auto\" or false")
        zero = ds.setdefault("zero_optimization", {})
        if zero.get("stage", "auto") == "auto":
            zero["stage"] = p.zero
        elif p.zero not in (0, zero["stage"]):
            raise ConfigError(f"parallel.zero={p.zero} but {path} sets zero_optimization.stage={zero['stage']}")
        for flag, key in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
            if getattr(p, flag) and key not in zero:
                zero[key] = {"device": "cpu"}
    zero = ds["zero_optimization"]
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: ZeRO stage must be 0-3, got {stage}")
    if "offload_param" in zero and stage != 3:
        raise ConfigError(f"{where}: parameter offload needs ZeRO stage 3 (parallel.zero=3), not {stage}")
    if "offload_optimizer" in zero and stage == 0:
        raise ConfigError(f"{where}: optimizer offload needs ZeRO stage 1-3 (parallel.zero>=1)")
    ds = copy.deepcopy(ds)
    ds.setdefault("steps_per_print", 2**31 - 1)  # Loom logs; DeepSpeed stays quiet
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW as the client optimiser
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # keep torch AdamW under optimizer offload too
    return ds


class _HeadCall(torch.nn.Module):
    """Runs `fn(lm, ...)`, a function that uses the (tied) head weight (HybridLM.loss or
    .logits, or one of `lm.head_calls`), as the forward of a module, so that ZeRO-3 gathers
    that weight for it in forward and again in backward (where the chunked cross-entropy
    recomputes its logits). It owns no parameters; the head weight is an external parameter."""

    def __init__(self, lm, fn):
        super().__init__()
        object.__setattr__(self, "lm", lm)  # a reference, not a submodule: no second copy of lm's parameters
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(self.lm, *args, **kwargs)


def _head_calls_inside_modules(model, deepspeed) -> None:
    """ZeRO-3 frees a parameter once the module owning it has run, but the loop
    calls `model.loss(hidden, labels)` and evaluation `model.logits(hidden)`
    after the forward, with the head weight outside any module. Route both, and
    any `model.head_calls` {name: fn(model, ...)} a trainer adds (distillation's
    KL), through _HeadCall children (they add nothing to the state dict), which
    DeepSpeed hooks like any other module; `model.<name>(...)` then calls them."""
    calls = {"loss": type(model).loss, "logits": type(model).logits, **getattr(model, "head_calls", {})}
    for name, fn in calls.items():
        call = _HeadCall(model, fn)
        deepspeed.zero.register_external_parameter(call, model.head_weight)
        model.add_module(f"zero3_{name}", call)
        object.__setattr__(model, name, call)  # the instance attribute shadows HybridLM.<name>


def partition_frozen(module: torch.nn.Module, engine: "DeepSpeedEngine") -> tuple[int, int]:
    """ZeRO-3 partitioning of a frozen module beside the trained one (distillation's teacher):
    DeepSpeed's parameter-only engine (no optimiser: ZeRO-Inference) with the run's
    zero_optimization section, so its parameters are split over the ranks as the student's
    are and gathered module by module when it runs. Returns (elements held by this rank,
    elements in all). Outside a forward, `engine.gathered([...])` makes a parameter whole."""
    deepspeed = import_deepspeed()
    zero = {k: v for k, v in engine.config["zero_optimization"].items() if k != "offload_optimizer"}
    config = {k: engine.config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                             "bf16", "steps_per_print", "wall_clock_breakdown")}
    deepspeed.initialize(model=module, config={**config, "zero_optimization": zero}, dist_init_required=False)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    return held, total


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, optim_cfg, total_steps: int, env, parallel, batch_size: int, grad_accum: int):
        """parallel: parallel.*; batch_size, grad_accum: train.batch_size, train.grad_accum."""
        deepspeed = import_deepspeed()
        self._ds_utils = deepspeed.utils
        self._gathered = deepspeed.zero.GatheredParameters
        ensure_process_group(env)
        config = deepspeed_config(parallel, batch_size, grad_accum, optim_cfg.grad_clip, env.device)
        self.config, self.stage = config, config["zero_optimization"]["stage"]
        self.model = model
        self._names = [[n for n, p in model.named_parameters() if any(p is q for q in g["params"])]
                       for g in param_groups(model, optim_cfg.weight_decay)]
        if self.stage == 3:
            _head_calls_inside_modules(model, deepspeed)
        self.optimizer = build_optimizer(model, optim_cfg)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config,
                                                dist_init_required=False)
        self.module = self.ds
        # LambdaLR on the client optimiser: ZeRO steps that optimiser's own param_groups, so the lr lands.
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self._partitioned = self.stage > 0 or config["bf16"]["enabled"]  # fp32 masters live in DeepSpeed
        offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
                   if k in config["zero_optimization"]]
        dist.log(f"deepspeed: ZeRO stage {self.stage}, {'bf16' if config['bf16']['enabled'] else 'fp32'}, "
                 f"offload to CPU: {', '.join(offload) or 'none'}")

    # ---------------------------------------------------------------- loop interface

    def accumulating(self, last_micro_batch: bool):
        self.ds.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def gathered(self, params: list[torch.Tensor]):
        """A context in which ZeRO-3-partitioned `params` are whole (read-only); no-op below stage 3."""
        return self._gathered(params, enabled=self.stage == 3)

    def step(self) -> float:
        norm = None
        if not self._partitioned:  # stage 0 fp32: DeepSpeed clips but does not report the norm
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            if not math.isfinite(norm):  # all-reduced gradients: every rank skips together
                self.skip_step()
                return norm
        self.ds.step()
        self.scheduler.step()
        return norm if norm is not None else float(self.ds.get_global_grad_norm())

    def skip_step(self) -> None:
        """Drop this step's gradients; the schedule still advances.

        ZeRO 1-3 find the gradients of a non-finite loss non-finite and skip the
        update in `step` (clearing their buffers); stage 0 clears them here.
        """
        if self._partitioned:
            self.ds.step()
            if self.ds.was_step_applied():
                dist.warn("warning: deepspeed applied an update although the loss was not finite")
        else:
            self.ds.zero_grad()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grads(self) -> dict[str, torch.Tensor]:
        """Full averaged gradients by name, between the last backward and step (a collective)."""
        out = {}
        for n, p in self.model.named_parameters():
            g = self._ds_utils.safe_get_full_grad(p)
            if g is not None:
                out[n] = g.detach().float().cpu().clone()
        return out

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """A collective: full fp32 weights and name-keyed AdamW state (the same on every rank)."""
        if not self._partitioned:
            tensors = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
            return tensors, {"optimizer": named_state(self.model, self.optimizer),
                             "scheduler": self.scheduler.state_dict()}
        u = self._ds_utils
        step = self._adam_step()
        if step is not None:
            self._link_adam_state()
        tensors, state = {}, {}
        for n, p in self.model.named_parameters():
            tensors[n] = u.safe_get_full_fp32_param(p).detach().cpu().clone()
            if step is not None:
                state[n] = {"step": torch.tensor(step),
                            **{k: u.safe_get_full_optimizer_state(p, k).detach().cpu().clone()
                               for k in ("exp_avg", "exp_avg_sq")}}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.optimizer.param_groups, self._names)]
        return tensors, {"optimizer": {"state": state, "param_groups": groups},
                         "scheduler": self.scheduler.state_dict()}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        osd = state["optimizer"]
        if not self._partitioned:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(tensors[n])
            load_named_state(self.model, self.optimizer, osd)
            self.scheduler.load_state_dict(state["scheduler"])
            return
        if not is_named(osd):
            raise ConfigError("this checkpoint's optimizer state is index-keyed (an older single-engine run); "
                              "resume it once with parallel.engine=single, then switch engines")
        u = self._ds_utils
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            # the low-precision / partitioned module copy, then the fp32 master
            with self._gathered(list(params.values()), modifier_rank=0, enabled=self.stage == 3):
                for n, p in params.items():
                    p.copy_(tensors[n].to(p.dtype))
            for n, p in params.items():
                u.safe_set_full_fp32_param(p, tensors[n].to(p.device))
        for saved, group in zip(osd["param_groups"], self.optimizer.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if osd["state"]:
            step = float(next(iter(osd["state"].values()))["step"])
            self._init_adam_state(step)
            for n, p in params.items():
                for k in ("exp_avg", "exp_avg_sq"):
                    u.safe_set_full_optimizer_state(p, osd["state"][n][k].to(p.device), k)
        self.scheduler.load_state_dict(state["scheduler"])

    def _flat_masters(self) -> list[torch.Tensor]:
        """The fp32 partitions the ZeRO / bf16 optimiser steps (keys of the AdamW state)."""
        zo = self.ds.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                     "fp32_groups_flat_partition"):  # stage 3, stage 1/2, bf16 stage 0
            if hasattr(zo, attr):
                return list(getattr(zo, attr))
        raise RuntimeError(f"unknown DeepSpeed optimizer {type(zo).__name__}")

    def _adam_step(self) -> float | None:
        """AdamW's step count (the same for every partition), None before the first step."""
        for flat in self._flat_masters():
            if flat in self.optimizer.state and "step" in self.optimizer.state[flat]:
                return float(self.optimizer.state[flat]["step"])
        return None

    def _init_adam_state(self, step: float) -> None:
        """Create the AdamW state of every fp32 partition (torch creates it lazily at the
        first step) so that safe_set_full_optimizer_state has somewhere to write."""
        for flat in self._flat_masters():
            self.optimizer.state[flat] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        self._link_adam_state()

    def _link_adam_state(self) -> None:
        """Point every parameter's fragment at the AdamW state of its partition (stage 1/2, bf16).

        DeepSpeed links them once, right after the first parameter group's first
        update, so the fragments of the other groups never see their state; linking
        again once all of it exists fixes that."""
        zo = self.ds.optimizer
        if hasattr(zo, "_lazy_init_hp_params_optimizer_state"):
            zo._hp_optimizer_states_linked = False
            zo._lazy_init_hp_params_optimizer_state()
