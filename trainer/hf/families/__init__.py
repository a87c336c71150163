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
    qwen3_5.py  Qwen3_5ForCausalLM     gdn + gated attention (per-head q/gate packing), partial
                                       rotary, zero-centred norms; the text tower of
                                       Qwen3_5ForConditionalGeneration on import
    olmo_hybrid.py OlmoHybridForCausalLM  gdn (beta in (0, 2)) pre-norm + OLMo 3 post-norm attention
    nemotron_h.py  NemotronHForCausalLM   mamba2 / attention (no RoPE) / relu2 mlp layer list; moe refused
    bamba.py    BambaForCausalLM       mamba2 + attention (half rotary), SwiGLU in every layer
    hybrid.py   what the hybrid families share (conv tap order, GDN / Mamba-2 tensor names,
                the export check by round trip)
"""
from __future__ import annotations

from loom.trainer.hf.families.bamba import Bamba
from loom.trainer.hf.families.base import Family
from loom.trainer.hf.families.gemma3 import Gemma3
from loom.trainer.hf.families.mistral import Mistral
from loom.trainer.hf.families.nemotron_h import NemotronH
from loom.trainer.hf.families.olmo3 import Olmo3
from loom.trainer.hf.families.olmo_hybrid import OlmoHybrid
from loom.trainer.hf.families.qwen3 import Qwen3
from loom.trainer.hf.families.qwen3_5 import Qwen3_5

_ALL: list[Family] = [Qwen3(), Mistral(), Olmo3(), Gemma3(), Qwen3_5(), OlmoHybrid(), NemotronH(), Bamba()]
FAMILIES: dict[str, Family] = {t: fam for fam in _ALL for t in fam.model_types}
TARGETS: dict[str, Family] = {fam.target: fam for fam in _ALL}


def family_of(hf: dict) -> Family | None:
    """The adapter for a config.json, or None (Llama, Qwen2 and unsupported types)."""
    return FAMILIES.get(hf.get("model_type"))


__all__ = ["FAMILIES", "TARGETS", "Bamba", "Family", "Gemma3", "Mistral", "NemotronH", "Olmo3", "OlmoHybrid", "Qwen3",
           "Qwen3_5", "family_of"]
