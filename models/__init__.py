"""Loom models: HybridLM and its mixers. Single-device code; no torch.distributed."""
from models.config import ConfigError
from models.model import HybridLM, ModelConfig, ModelOutput, expand_layers

__all__ = ["ConfigError", "HybridLM", "ModelConfig", "ModelOutput", "expand_layers"]
