"""Export a Loom model to a Hugging Face folder: `loom convert to-hf SRC OUT`.

SRC is a run folder (latest valid checkpoint), a checkpoint folder or a
`loom convert hf` folder (see loom.trainer.hf.source). Targets:

  llama / qwen2   attention-only models (every layer `attn`, no gate, no MoH,
                  no qk_norm, the Llama block layout, RoPE none/linear/yarn/llama3)
                  become a LlamaForCausalLM (no biases, or q/k/v/o biases) or
                  Qwen2ForCausalLM (q/k/v biases) folder that plain transformers
                  loads; the inverse of `loom convert hf`, so import -> export ->
                  import is the identity.
  qwen3 / mistral / olmo3 / gemma3
                  attn/swa models with the layout and options of one of those
                  families (trainer/hf/families/: each adapter's native_problem says
                  what its class can express) become its *ForCausalLM folder.
  qwen3_5 / olmo_hybrid / nemotron_h / bamba
                  gdn / mamba2 hybrids with a family's layout (expressible when
                  importing the config.json written for them gives the model back:
                  families/hybrid.py roundtrip_problem) become that class's folder.
  remote          any HybridLM: config.json with `auto_map` plus
                  configuration_loom.py / modeling_loom.py (copied from
                  loom.trainer.hf.remote), loaded with
                  AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).
                  The modeling code wraps the installed `loom` package, which
                  must be importable where the folder is loaded.
                  The model is first rewritten exactly into the class's conventions
                  (families/transforms.py: zero-centred norms as w - 1, norm eps by
                  rescaling, gate packing, an untied head copy, NoPE heads widened),
                  so Loom's gdn-hybrid recipes become Qwen3.5 and mamba2-hybrid Bamba.
`--target auto` (default) picks the first native class that fits (llama, mistral,
qwen2, qwen3, olmo3, gemma3, qwen3_5, olmo_hybrid, nemotron_h, bamba), else remote.
An explicit target the model does not fit is refused in one line naming the
first layer or option it cannot express.

OUT receives config.json, model.safetensors, generation_config.json, README.md
and the tokenizer (tokenizer.json + tokenizer_config.json +
special_tokens_map.json): the run's HF tokenizer.json as it is, or, for Loom's
byte tokenizer, an equivalent tokenizer.json (ids 0..255 are the bytes, then
<s>, </s>, <pad> = 256, 257, 258; the post-processor prepends <s>, as the
packer starts every document with bos). tokenizer_config.json carries the chat
template Loom's SFT renders with (data/chat.py: the run tokenizer folder's, with
the special tokens it names; BYTE_CHAT_TEMPLATE for the byte tokenizer), so
AutoTokenizer.from_pretrained(OUT).apply_chat_template gives the same text.
transformers is not needed to export.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from loom.models import ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.common import rope_to_hf as rope_params_to_hf
from loom.trainer.hf.convert import ConvertError, model_yaml_dict
from loom.trainer.hf.families import TARGETS as FAMILY_TARGETS
from loom.trainer.data.chat import BYTE_CHAT_TEMPLATE, tokenizer_chat_config
from loom.trainer.data.tokenizer import ByteTokenizer
from loom.trainer.hf.source import LoomSource, load_source

TARGETS = ("auto", "llama", "qwen2", *FAMILY_TARGETS, "remote")
ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
        **{t: (f.architecture, f.model_types[0]) for t, f in FAMILY_TARGETS.items()}}
# Model fields a Llama / Qwen2 export needs at their defaults (the families' layouts are other classes).
_LLAMA_LAYOUT = {"norm_placement": "pre", "norm_zero_centred": False, "norm_weight_fp32": False,
                 "mlp_kind": "swiglu", "mlp_bias": False, "block_mlp": True, "embed_scale": 1.0,
                 "logit_softcap": None}
REMOTE_FILES = ("configuration_loom.py", "modeling_loom.py")


# ----- which target can express the model -----

def native_problem(cfg: ModelConfig, target: str) -> str | None:
    """Why `cfg` cannot become a native `target` model (llama, qwen2 or a family of
    trainer/hf/families), or None if it can."""
    if target in FAMILY_TARGETS:
        return FAMILY_TARGETS[target].native_problem(cfg)
    name = ARCH[target][0]
    kinds = cfg.layer_kinds()
    allowed = ("attn",) if target == "llama" else ("attn", "swa")  # Qwen2: layer_types sliding windows
    other = [(i, k) for i, k in enumerate(kinds) if k not in allowed]
    if other:
        i, kind = other[0]
        return (f"layer {i} is {kind!r} ({len(other)} of {len(kinds)} layers are not {' or '.join(allowed)}); "
                f"{name} has {'softmax attention' if target == 'llama' else 'attention and sliding-window'} "
                f"layers only")
    for key, want in _LLAMA_LAYOUT.items():
        if getattr(cfg, key) != want and not (key == "mlp_bias" and target == "llama"):  # Llama's mlp_bias
            return f"model.{key} is {getattr(cfg, key)!r}; {name} needs {want!r}"
    every = mixer_options(cfg)
    present = [k for k in allowed if k in kinds]
    for kind in present:
        opts = every[kind]
        where = f"model.mixers.{kind}"
        if opts.gate != "none":
            return f"{where}.gate is {opts.gate!r}; {name} has no attention output gate"
        if opts.moh:
            return f"{where}.moh is true; {name} has no mixture-of-head routing"
        if opts.qk_norm:
            return f"{where}.qk_norm is true; {name} has no query/key norm"
        if opts.conv_size > 1:
            return f"{where}.conv_size is {opts.conv_size}; {name} has no short conv on q, k, v"
        if not opts.rope:
            return f"{where}.rope is false; {name} always applies RoPE"
        if opts.scale is not None or opts.rope_fraction != 1.0 or opts.rope_config not in (None, cfg.rope):
            return (f"{where} sets scale, rope_fraction or rope_config; {name} scales by head_dim^-1/2 "
                    f"and rotates whole heads with model.rope")
        if target == "llama" and opts.qkv_bias != opts.out_bias:
            return (f"{where}.qkv_bias and out_bias differ; LlamaForCausalLM biases q, k, v and o together "
                    "(qwen2: q, k, v only)")
        if target == "qwen2" and opts.out_bias:
            return f"{where}.out_bias is true; Qwen2ForCausalLM has no o_proj bias"
    if len(present) == 2 and every["attn"].qkv_bias != every["swa"].qkv_bias:
        return f"model.mixers.attn.qkv_bias and model.mixers.swa.qkv_bias differ; {name} has one value for both"
    if cfg.rope.scaling == "ntk":
        return ("model.rope.scaling is 'ntk' (static); transformers' NTK scaling ('dynamic') changes with "
                "the sequence length")
    return None


def choose_target(cfg: ModelConfig, target: str) -> str:
    if target not in TARGETS:
        raise ConvertError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if target == "auto":
        # Mistral before Qwen2: a bias-free all-swa model is Mistral's; Qwen2 (zero biases if
        # the model has none) takes mixed attn/swa layer patterns
        for candidate in ("llama", "mistral", "qwen2", *[t for t in FAMILY_TARGETS if t != "mistral"]):
            if native_problem(cfg, candidate) is None:
                return candidate
        return "remote"
    if target != "remote":
        problem = native_problem(cfg, target)
        if problem is not None:
            raise ConvertError(f"cannot export as {ARCH[target][0]}: {problem}; use --target remote "
                               f"(trust_remote_code) for this model")
    return target


# ----- config.json -----

def rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers' rope_parameters (v5) for cfg.rope; rope_theta included."""
    return rope_params_to_hf(cfg.rope)


def _max_positions(src: LoomSource) -> int:
    """config.json's max_position_embeddings: the trained length, or the scaled RoPE's extended one.
    For yarn it is the pretrained length, as in Qwen2.5's configs: transformers 4.x takes
    yarn's original length from this field (5.x reads rope_parameters and accepts it)."""
    r = src.cfg.rope
    if r.scaling == "yarn":
        return r.original_max_len
    scaled = int(r.original_max_len * r.factor) if r.scaling == "llama3" else 0
    return max(src.max_len or 0, scaled) or 4096


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def native_config(src: LoomSource, target: str, cfg: ModelConfig | None = None) -> dict:
    """config.json of a native target; cfg: the model written (export_form's), default src.cfg."""
    cfg = cfg or src.cfg
    arch, model_type = ARCH[target]
    if target in FAMILY_TARGETS:
        return {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
                "num_hidden_layers": len(cfg.layer_kinds()), "num_attention_heads": cfg.n_heads,
                "max_position_embeddings": _max_positions(src), "initializer_range": cfg.init_std,
                "use_cache": True, "torch_dtype": _dtype_name(src.state),
                **FAMILY_TARGETS[target].hf_config(cfg), **_special_ids(src.tokenizer)}
    rope = rope_to_hf(cfg)
    n = len(cfg.layer_kinds())
    out = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": n, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": _max_positions(src),
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": _dtype_name(src.state),
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling (5.x also accepts them)
        "rope_parameters": rope, "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items()
                                                                      if k != "rope_theta"},
        **_special_ids(src.tokenizer),
    }
    if target == "llama":
        out |= {"attention_bias": _first_attention(cfg).qkv_bias, "mlp_bias": cfg.mlp_bias, "pretraining_tp": 1}
    else:
        opts = mixer_options(cfg)
        window = opts["swa"].window + 1 if "swa" in opts else None  # transformers counts the query itself
        out |= {"use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": n,
                "layer_types": ["sliding_attention" if k == "swa" else "full_attention" for k in cfg.layer_kinds()]}
    return out


def remote_config(src: LoomSource) -> dict:
    cfg = src.cfg
    return {
        "architectures": ["LoomForCausalLM"], "model_type": "loom",
        "auto_map": {"AutoConfig": "configuration_loom.LoomConfig",
                     "AutoModelForCausalLM": "modeling_loom.LoomForCausalLM"},
        "loom_requires": "the Loom package (`import loom.models`) installed where this folder is loaded: "
                         "pip install -e <Loom checkout>",
        "loom_model": model_yaml_dict(cfg) | {"init_std": cfg.init_std},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": len(cfg.layer_kinds()),
        "num_attention_heads": cfg.n_heads, "max_position_embeddings": _max_positions(src),
        # HybridLM ties internally (no lm_head tensor); transformers must not tie anything itself
        "tie_word_embeddings": False, "use_cache": True, "torch_dtype": _dtype_name(src.state),
        **_special_ids(src.tokenizer),
    }


# ----- weights -----

# HybridLM name -> transformers name (the inverse of convert._RENAMES), layer i as \1.
_EXPORT_RENAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.mixer_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.mixer\.([qkvo]_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", r"model.layers.\1.mlp.\2.\3"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def native_state(state: dict[str, torch.Tensor], cfg: ModelConfig, target: str) -> dict[str, torch.Tensor]:
    """HybridLM state dict -> the transformers one (Qwen2: zero q/k/v biases when the model has none)."""
    if target in FAMILY_TARGETS:
        fam = FAMILY_TARGETS[target]
        return {k: t.contiguous() for k, t in fam.tensors_to_hf({fam.to_hf(n): t for n, t in state.items()}).items()}
    out = {}
    for name, t in state.items():
        new = next((re.sub(pat, repl, name) for pat, repl in _EXPORT_RENAMES if re.fullmatch(pat, name)), None)
        if new is None:
            raise ConvertError(f"tensor {name!r} has no {ARCH[target][0]} equivalent")
        out[new] = t.contiguous()
    if target == "qwen2" and not _first_attention(cfg).qkv_bias:  # Qwen2 always has q/k/v biases
        for i in range(len(cfg.layer_kinds())):
            for p in "qkv":
                w = out[f"model.layers.{i}.self_attn.{p}_proj.weight"]
                out[f"model.layers.{i}.self_attn.{p}_proj.bias"] = w.new_zeros(w.shape[0])
    return out


def _first_attention(cfg: ModelConfig):
    opts = mixer_options(cfg)
    return opts.get("attn") or opts["swa"]


# ----- tokenizer -----

def byte_tokenizer_json() -> str:
    """A `tokenizers` file equivalent to ByteTokenizer: byte b -> id b (through the
    GPT-2 byte-to-character table, one BPE token per byte, no merges), then the
    specials <s>, </s>, <pad> at 256, 257, 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", ByteTokenizer.bos_id)])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer(tokenizer, out: Path) -> list[str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json; returns the names written."""
    if tokenizer is None:
        return []
    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    else:
        # to_str() also holds an eos HFTokenizer may have added to a file that lacked one
        (out / "tokenizer.json").write_text(tokenizer._tok.to_str())
        names = {role: tokenizer._tok.id_to_token(tid) for role, tid in
                 (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))
                 if tid is not None}
    # the chat template Loom's SFT renders with (data/chat.py), with the special tokens it may name
    chat = ({"chat_template": BYTE_CHAT_TEMPLATE} if isinstance(tokenizer, ByteTokenizer) else
            tokenizer_chat_config(os.path.dirname(os.path.abspath(tokenizer.path))))
    names |= {k: v for k, v in chat.items() if k != "chat_template"}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_max_length": 1 << 30, "model_input_names": ["input_ids", "attention_mask"], **names,
         **({"chat_template": chat["chat_template"]} if chat else {})}, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ----- the folder -----

def _readme(src: LoomSource, target: str, tokenizer_files: list[str]) -> str:
    kinds = src.cfg.layer_kinds()
    lines = ["# Loom model exported by `loom convert to-hf`", "",
             f"Source: `{src.origin}`; {len(kinds)} layers ({', '.join(dict.fromkeys(kinds))}); "
             f"trained context {src.max_len or 'unknown'} tokens.", ""]
    if target == "remote":
        lines += ["Hybrid model: the modeling code (`modeling_loom.py`) wraps Loom's `HybridLM`, so **the Loom "
                  "package must be installed** (`pip install -e <Loom checkout>`) where you load it:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "tok = AutoTokenizer.from_pretrained(PATH)",
                  "out = model.generate(**tok(['The pass key is'], return_tensors='pt'), max_new_tokens=8)",
                  "```", "",
                  "Decoding carries each layer's Loom state (KV cache, recurrent state); greedy search and sampling "
                  "are supported, beam search is not. Batches may be left-padded (the padding becomes a separate "
                  "document, which no mixer attends across)."]
    else:
        lines += [f"Native `{ARCH[target][0]}`: plain transformers loads it, no Loom needed:", "",
                  "```python", "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)", "```"]
    if not tokenizer_files:
        lines += ["", "No tokenizer: the source folder had none."]
    return "\n".join(lines) + "\n"


def _reads_from(src_path: str | Path, out: Path) -> Path | None:
    """The folder `out` lies inside (or is) that the export reads: the source folder, or the run folder of a
    checkpoint folder (checkpoints/step-N); None when `out` is outside both."""
    src = Path(src_path).resolve()
    folders = [src] + ([src.parent.parent] if src.parent.name == "checkpoints" else [])
    target = out.resolve()
    return next((f for f in folders if target == f or f in target.parents), None)


def export_hf(src_path: str | Path, out: str | Path, target: str = "auto") -> tuple[Path, str]:
    """Write the Hugging Face folder `out` for the Loom model at `src_path`.

    Returns (out, target used). Atomic: written into a temporary sibling and
    renamed; an `out` that exists and is not empty is refused (FileExistsError).
    ConvertError (one line) for a target the model cannot be expressed in.

    Example:
        export_hf("runs/quickstart", "out/quickstart-hf")      # LlamaForCausalLM
        AutoModelForCausalLM.from_pretrained("out/quickstart-hf")
    """
    out = Path(out)
    inside = _reads_from(src_path, out)
    if inside is not None:
        raise ConvertError(f"{out}: inside {inside}, which this export reads; choose an output folder outside it "
                           "(a run folder holds only what `loom train` writes)")
    src = load_source(src_path)
    target = choose_target(src.cfg, target)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; remove it or choose another output folder")
    if target == "remote":
        config, state = remote_config(src), {f"model.{k}": v.contiguous() for k, v in src.state.items()}
    else:
        cfg, state = src.cfg, src.state
        if target in FAMILY_TARGETS:  # an equivalent model in the class's conventions (families/transforms.py)
            fam = FAMILY_TARGETS[target]
            cfg = fam.export_form(src.cfg)
            state = fam.export_state(src.cfg, cfg, src.state)
        config, state = native_config(src, target, cfg), native_state(state, cfg, target)
    generation = {"do_sample": False, **_special_ids(src.tokenizer)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if target == "remote":
            here = Path(__file__).resolve().parent / "remote"
            for name in REMOTE_FILES:
                shutil.copyfile(here / name, tmp / name)
        written = write_tokenizer(src.tokenizer, tmp)
        (tmp / "README.md").write_text(_readme(src, target, written))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, target


def main_to_hf(argv: list[str]) -> int:
    """`loom convert to-hf SRC OUT [--target T]`: one line on success; `error: ...` and 2 otherwise."""
    parser = argparse.ArgumentParser(prog="loom convert to-hf",
                                     description="Export a run, checkpoint or converted folder to Hugging Face.")
    parser.add_argument("src", help="run folder, checkpoint folder or `loom convert hf` folder")
    parser.add_argument("out", help="output folder (must not exist, or be empty)")
    parser.add_argument("--target", default="auto",
                        help="llama/qwen2 (native, attention-only models), remote (trust_remote_code), "
                             "auto (native when possible; default)")
    args = parser.parse_args(argv)
    from loom.trainer.checkpoint.manager import CheckpointError

    try:
        out, target = export_hf(args.src, args.out, args.target)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    how = "trust_remote_code=True, needs Loom installed" if target == "remote" else "plain transformers"
    print(f"exported {args.src} -> {out} ({target}: AutoModelForCausalLM.from_pretrained({str(out)!r}) with {how})")
    return 0
