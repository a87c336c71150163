"""The teacher of a distillation run, and the student's start from its weights.

load_teacher(path) reads a `loom convert hf` folder (model.yaml + model.safetensors),
a run folder (config.yaml + its latest valid checkpoint) or one checkpoint folder
(step-XXXXXXXX inside a run folder) into a frozen HybridLM.

init_student(student, teacher) copies into the student every tensor whose name and
shape match the teacher's (embeddings, norms, MLPs, layers of the same kind) and, for
a layer whose attention the student replaces, the projections the new mixer shares with
attention (SHARED below): q/k/v/o, GQA-aware (a kv head is repeated for the query heads
that read it; fewer heads than the teacher's average the heads of a group). It returns
the names copied (and from where) and the names left new.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from loom.models import HybridLM
from loom.models.config import ConfigError
from loom.models.model import ModelConfig

__all__ = ["InitReport", "SHARED", "check_compatible", "init_student", "load_teacher"]

# teacher attention parts: q, k, v, o. Per student mixer kind: its parameter (under
# blocks.i.mixer.) -> the parts it is built from, concatenated along the output rows.
SHARED: dict[str, dict[str, tuple[str, ...]]] = {
    "swa": {"q_proj.weight": ("q",), "k_proj.weight": ("k",), "v_proj.weight": ("v",), "o_proj.weight": ("o",)},
    "linear": {"q_proj.weight": ("q",), "k_proj.weight": ("k",), "v_proj.weight": ("v",), "o_proj.weight": ("o",)},
    "rat": {"q_proj.weight": ("q",), "k_proj.weight": ("k",), "v_proj.weight": ("v",), "o_proj.weight": ("o",)},
    "memory": {"memory.q_proj.weight": ("q",), "memory.k_proj.weight": ("k",), "memory.v_proj.weight": ("v",),
               "o_proj.weight": ("o",)},
    "gdn": {"in_proj_qkv.weight": ("q", "k", "v"), "out_proj.weight": ("o",)},
    # mamba2: in_proj packs [z, x, B, C, dt] over an expanded inner width; nothing lines up with
    # attention's heads at the same shapes, so its mixer starts new (see the start-up log).
}
ATTENTION = ("attn",)


@dataclass
class InitReport:
    copied: dict[str, str] = field(default_factory=dict)  # student name -> how (teacher name or mapping)
    new: list[str] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)  # layers whose mixer kind differs from the teacher's

    def lines(self, frozen: list[str]) -> list[str]:
        def short(names) -> str:
            names = list(names)
            return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        mapped = {k: v for k, v in self.copied.items() if _in_replaced_mixer(k, self.replaced)}
        return [f"distill: copied {len(self.copied)} tensors from the teacher "
                f"({len(self.copied) - len(mapped)} by name and shape, {len(mapped)} into replaced mixers from attention)",
                *[f"distill:   {k} <- {v}" for k, v in mapped.items()],
                f"distill: new {len(self.new)} tensors: {short(self.new) or '-'}",
                f"distill: frozen in align stages {len(frozen)} tensors: {short(frozen) or '-'}"]


def _run_config_model(run_dir: Path, weights: dict) -> ModelConfig:
    from loom.trainer.config import config_from_dict

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).model
    if cfg.vocab_size is None and "embed.weight" in weights:
        cfg.vocab_size = weights["embed.weight"].shape[0]
    return cfg


def read_teacher(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(ModelConfig, state dict, what the folder is) of a teacher folder; ConfigError naming distill.teacher."""
    from loom.trainer.checkpoint.manager import CheckpointManager

    path = Path(path)
    where = f"distill.teacher {path}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder (give a `loom convert hf` folder, a run folder or a checkpoint)")
    try:
        if (path / "model.yaml").is_file():
            from loom.trainer.hf.convert import load_converted

            cfg, weights = load_converted(path)
            return cfg, weights, "converted folder"
        if (path / "config.yaml").is_file():
            latest = CheckpointManager(path).latest_valid(log=lambda m: None)
            if latest is None:
                raise ConfigError(f"{where}: a run folder without a valid checkpoint; train it first")
            weights, _, _ = CheckpointManager(path).load(latest)
            return _run_config_model(path, weights), weights, f"run folder, {Path(latest).name}"
        run = path.parent.parent   # <run>/checkpoints/step-XXXXXXXX
        if (run / "config.yaml").is_file() and path.name.startswith("step-"):
            weights, _, _ = CheckpointManager(run).load(path)
            return _run_config_model(run, weights), weights, "checkpoint folder"
    except ConfigError:
        raise
    except Exception as e:  # a damaged folder: one line
        raise ConfigError(f"{where}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise ConfigError(f"{where}: neither a `loom convert hf` folder (model.yaml), a run folder (config.yaml) "
                      "nor a checkpoint folder (<run>/checkpoints/step-*)")


def check_compatible(student: ModelConfig, teacher: ModelConfig) -> None:
    """Same width, depth and vocabulary (ConfigError naming both values)."""
    s, t = student.resolved(), teacher.resolved()
    for key in ("d_model", "vocab_size"):
        if getattr(s, key) != getattr(t, key):
            raise ConfigError(f"distill: model.{key} of the student ({getattr(s, key)}) differs from the "
                              f"teacher's ({getattr(t, key)}); a student keeps the teacher's {key}")
    ns, nt = len(s.layer_kinds()), len(t.layer_kinds())
    if ns != nt:
        raise ConfigError(f"distill: model.layers of the student has {ns} layers, the teacher {nt}; "
                          "replace layers one for one (same depth)")


def load_teacher(path: str | Path, student_cfg: ModelConfig) -> tuple[HybridLM, str]:
    """The teacher as a frozen HybridLM in eval mode (CPU), checked against the student's config."""
    cfg, weights, what = read_teacher(path)
    check_compatible(student_cfg, cfg)
    with torch.random.fork_rng():   # building the teacher must not move the run's RNG stream
        teacher = HybridLM(cfg)
    try:
        teacher.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"distill.teacher {path}: the weights do not fit its own model config "
                          f"({str(e).splitlines()[-1].strip()})") from None
    teacher.eval().requires_grad_(False)
    return teacher, what


def _heads(w: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor | None:
    """Teacher rows (h_t * head_dim, D) refitted to `rows` = h_s * head_dim: repeated per head
    (GQA: kv head j serves query heads j*r .. j*r + r - 1) or averaged over groups; None if no fit."""
    if w.shape[0] == rows:
        return w
    if rows % head_dim or w.shape[0] % head_dim:
        return None
    h_s, h_t = rows // head_dim, w.shape[0] // head_dim
    per = w.view(h_t, head_dim, -1)
    if h_s % h_t == 0:
        return per.repeat_interleave(h_s // h_t, dim=0).reshape(rows, -1)
    if h_t % h_s == 0:
        return per.view(h_s, h_t // h_s, head_dim, -1).mean(1).reshape(rows, -1)
    return None


@torch.no_grad()
def init_student(student: HybridLM, teacher: HybridLM) -> InitReport:
    """Copy the teacher's weights into the student (module docstring); returns what was done."""
    report = InitReport()
    t_state = teacher.state_dict()
    s_kinds, t_kinds = student.cfg.layer_kinds(), teacher.cfg.layer_kinds()
    head_dim = teacher.cfg.resolved().head_dim
    report.replaced = [i for i, (a, b) in enumerate(zip(s_kinds, t_kinds)) if a != b]
    for name, p in student.state_dict().items():
        src = t_state.get(name)
        if src is not None and src.shape == p.shape and not _in_replaced_mixer(name, report.replaced):
            p.copy_(src)
            report.copied[name] = name
            continue
        mapped = _from_attention(name, p, t_state, s_kinds, t_kinds, head_dim)
        if mapped is not None:
            p.copy_(mapped[0])
            report.copied[name] = mapped[1]
        else:
            report.new.append(name)
    return report


def _in_replaced_mixer(name: str, replaced: list[int]) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blocks" and int(parts[1]) in replaced and parts[2] == "mixer"


def _from_attention(name, p, t_state, s_kinds, t_kinds, head_dim) -> tuple[torch.Tensor, str] | None:
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "blocks" or parts[2] != "mixer":
        return None
    i = int(parts[1])
    if t_kinds[i] not in ATTENTION or s_kinds[i] == t_kinds[i]:
        return None
    spec = SHARED.get(s_kinds[i], {}).get(".".join(parts[3:]))
    if spec is None:
        return None
    prefix = f"blocks.{i}.mixer."
    if spec == ("o",):   # output projection: (D, H * head_dim) columns
        w = t_state[prefix + "o_proj.weight"]
        return (w, f"{prefix}o_proj.weight") if w.shape == p.shape else None
    # the parts share the rows equally when a mixer concatenates them (gdn: q, k, v)
    pieces, names = [], []
    rows = [p.shape[0] // len(spec)] * len(spec)
    if len(spec) == 3 and p.shape[0] % 3:
        return None
    for part, r in zip(spec, rows):
        fitted = _heads(t_state[f"{prefix}{part}_proj.weight"], r, head_dim)
        if fitted is None or fitted.shape[1] != p.shape[1]:
            return None
        pieces.append(fitted)
        names.append(f"{prefix}{part}_proj.weight")
    return torch.cat(pieces, 0), " + ".join(names) + (" (heads refitted)" if any(
        t_state[n].shape[0] != r for n, r in zip(names, rows)) else "")
