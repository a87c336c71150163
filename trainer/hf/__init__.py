"""Hugging Face interop: weights and configs in and out.

- convert.py: import Llama- and Qwen2-family checkpoints (`loom convert hf`);
- source.py: a trained Loom model as one object (config, weights, tokenizer),
  what export and lm-eval start from;
- export.py: `loom convert to-hf`, a native Llama / Qwen2 folder or one with
  remote code;
- remote/: configuration_loom.py and modeling_loom.py, copied into exported
  folders for `trust_remote_code=True`.
"""
