"""One adapter per transformers model family (config and weights, both directions).

FAMILIES maps config.json's model_type to its adapter; TARGETS maps the
`loom convert to-hf --target` names to theirs. Llama and Qwen2 are handled by
trainer/hf/convert.py and export.py themselves.

    qwen3.py    Qwen3ForCausalLM       per-head q/k norm, layer_types sliding windows
    mistral.py  MistralForCausalLM     one sliding window on every layer
    olmo3.py    Olmo3ForCausalLM       post-norm, full-width q/k norm, 3:1 local/global
    gemma3.py   Gemma3ForCausalLM      sandwich zero-centred norms, GeGLU, 5:1 local/global,
                                       logit scale, embedding scale; the text tower of
                                       Gemma3ForConditionalGeneration on import
"""
from __future__ import annotations

from loom.trainer.hf.families.base import Family
from loom.trainer.hf.families.gemma3 import Gemma3
from loom.trainer.hf.families.mistral import Mistral
from loom.trainer.hf.families.olmo3 import Olmo3
from loom.trainer.hf.families.qwen3 import Qwen3

_ALL: list[Family] = [Qwen3(), Mistral(), Olmo3(), Gemma3()]
FAMILIES: dict[str, Family] = {t: fam for fam in _ALL for t in fam.model_types}
TARGETS: dict[str, Family] = {fam.target: fam for fam in _ALL}


def family_of(hf: dict) -> Family | None:
    """The adapter for a config.json, or None (Llama, Qwen2 and unsupported types)."""
    return FAMILIES.get(hf.get("model_type"))


__all__ = ["FAMILIES", "TARGETS", "Family", "family_of"]
