"""Loom models: HybridLM and its mixers. Single-device code; no torch.distributed."""
from loom.models.config import ConfigError
from loom.models.model import HybridLM, ModelConfig, ModelOutput, expand_layers, seq_ids_from_position_ids

__all__ = ["ConfigError", "HybridLM", "ModelConfig", "ModelOutput", "expand_layers", "seq_ids_from_position_ids"]
