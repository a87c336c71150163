"""Hugging Face interop: weights and configs in and out.

- convert.py: import checkpoints (`loom convert hf`): Llama and Qwen2 itself, the
  other families through their adapters;
- families/: one adapter per family (Qwen3, Mistral, OLMo 3, Gemma 3), config and
  weights in both directions (torchtitan's state_dict_adapter habit);
- common.py: ConvertError and RoPE parameters in both directions, shared by both;
- source.py: a trained Loom model as one object (config, weights, tokenizer),
  what export and lm-eval start from;
- export.py: `loom convert to-hf`, a native Llama / Qwen2 / family folder or one
  with remote code;
- remote/: configuration_loom.py and modeling_loom.py, copied into exported
  folders for `trust_remote_code=True`.
"""
