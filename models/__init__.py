"""Loom models: HybridLM and its mixers. Single-device code; no torch.distributed."""
from loom.models.config import ConfigError
from loom.models.model import HybridLM, ModelConfig, ModelOutput, expand_layers

__all__ = ["ConfigError", "HybridLM", "ModelConfig", "ModelOutput", "expand_layers"]
