"""LoomConfig: the transformers config of an exported Loom HybridLM.

`loom_model` is the recipe's `model:` section (as `loom convert hf` writes it
to model.yaml); everything the model computes is in it. The other fields
(vocab_size, hidden_size, num_hidden_layers, special token ids) are copies
for tools that read config.json without running the model.
"""
from transformers import PretrainedConfig


class LoomConfig(PretrainedConfig):
    model_type = "loom"

    def __init__(self, loom_model: dict | None = None, **kwargs):
        self.loom_model = dict(loom_model or {})
        super().__init__(**kwargs)
