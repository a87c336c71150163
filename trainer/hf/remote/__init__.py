"""Modeling code that `loom convert to-hf --target remote` copies into an exported
folder, for `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`.

The files are also importable from here (tests use them directly). They wrap
`loom.models.HybridLM`, so Loom must be installed where the folder is loaded.
"""
