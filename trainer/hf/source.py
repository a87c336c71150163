"""A trained Loom model as one object: config, weights, tokenizer, context length.

`load_source(PATH)` is what `loom convert to-hf` and the lm-eval-harness
model start from. PATH may be

    a run folder            config.yaml + checkpoints/ (the latest valid checkpoint)
    a checkpoint folder     <run>/checkpoints/step-NNNNNNNN (its run's config.yaml)
    a converted folder      model.yaml + model.safetensors (+ tokenizer.json), from `loom convert hf`

Checkpoints are verified against their manifest first (CheckpointError, one
line, when one is corrupt; from a run folder, corrupt newer checkpoints are
skipped with a warning on stderr, as `loom eval` does). The vocabulary size is read from the weights (the
trainer rounds the tokenizer's up), so the recipe's `model:` section is enough.

Example:
    src = load_source("runs/quickstart")
    model = src.build()                      # HybridLM in eval mode, weights loaded
    ids = src.tokenizer.encode("hello")
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from loom.models import HybridLM, ModelConfig
from loom.trainer.checkpoint.manager import CheckpointError, CheckpointManager, MANIFEST_FILE, MODEL_FILE
from loom.trainer.hf.convert import ConvertError, converted_config, read_safetensors
from loom.trainer.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@dataclass
class LoomSource:
    cfg: ModelConfig  # resolved, vocab_size from the weights
    state: dict[str, torch.Tensor]  # HybridLM state dict on CPU
    tokenizer: ByteTokenizer | HFTokenizer | None  # None: a converted folder without tokenizer.json
    max_len: int | None  # training length (data.seq_len) or the imported model's max_position_embeddings
    origin: str  # what was loaded, for messages: a checkpoint folder or a converted folder

    def build(self) -> HybridLM:
        """HybridLM with these weights, in eval mode (strict load: every tensor must fit)."""
        model = HybridLM(self.cfg)
        model.load_state_dict(self.state)
        return model.eval()


def load_source(path: str | Path) -> LoomSource:
    """The Loom model stored at `path` (see the module docstring for the accepted folders)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected a run folder, a checkpoint folder or a "
                                f"`loom convert hf` folder)")
    if (path / "model.yaml").is_file():
        return _from_converted(path)
    if (path / MANIFEST_FILE).is_file() and path.parent.name == "checkpoints":
        run = path.parent.parent
        CheckpointManager(run).verify(path)
        return _from_checkpoint(run, path)
    if (path / "config.yaml").is_file():
        latest = CheckpointManager(path).latest_valid(log=lambda m: print(m, file=sys.stderr))
        if latest is None:
            raise CheckpointError(f"{path}: no valid checkpoint under {path / 'checkpoints'}; train first "
                                  f"with `loom train`")
        return _from_checkpoint(path, latest)
    raise FileNotFoundError(f"{path}: not a run folder (config.yaml + checkpoints/), a checkpoint folder "
                            f"(checkpoints/step-N with manifest.json) or a `loom convert hf` folder (model.yaml)")


def _from_checkpoint(run: Path, ckpt: Path) -> LoomSource:
    from loom.trainer.config import config_from_dict  # the recipe schema lives in the trainer

    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{ckpt}: its run folder {run} has no config.yaml (the resolved recipe)")
    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ValueError(f"{config_file}: not a readable resolved recipe (damaged?); restore it from the "
                         "recipe the run was started with") from None
    run_cfg = config_from_dict(data)
    state = read_safetensors(ckpt / MODEL_FILE)
    cfg = _with_vocab(run_cfg.model, state, ckpt)
    tokenizer = load_tokenizer(run_cfg.data.tokenizer)
    return LoomSource(cfg, state, tokenizer, run_cfg.data.seq_len, str(ckpt))


def _from_converted(path: Path) -> LoomSource:
    cfg = converted_config(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (expected a folder written by `loom convert hf`)")
    state = read_safetensors(path / "model.safetensors")
    tokenizer = HFTokenizer(str(path / "tokenizer.json")) if (path / "tokenizer.json").is_file() else None
    # convert_hf writes the source's max_position_embeddings into model.yaml's header
    found = re.search(r"max_position_embeddings (\d+)", (path / "model.yaml").read_text())
    return LoomSource(_with_vocab(cfg, state, path), state, tokenizer, int(found.group(1)) if found else None,
                      str(path))


def _with_vocab(cfg: ModelConfig, state: dict[str, torch.Tensor], where: Path) -> ModelConfig:
    if "embed.weight" not in state:
        raise ConvertError(f"{where}: the weights have no embed.weight (not a HybridLM checkpoint)")
    vocab = int(state["embed.weight"].shape[0])
    return dataclasses.replace(cfg, vocab_size=vocab).resolved()
