"""Import Hugging Face checkpoints into HybridLM: Llama, Qwen2 here, and the families
with an adapter in trainer/hf/families/ (Qwen3, Mistral, Gemma 3, OLMo 3, and the hybrids
Qwen3.5, OLMo-hybrid, Nemotron-H, Bamba, whose adapters also rewrite tensors: conv tap
order, q/k/v merges).

    loom convert hf PATH OUT

PATH is a local folder holding `config.json` and the weights as safetensors:
`model.safetensors`, or shards listed by `model.safetensors.index.json`.
transformers is not needed: the config is plain JSON and the tensors are read
with `safetensors`. OUT receives

    model.safetensors   the HybridLM state dict (dtype of the source kept)
    model.yaml          `model: {...}`, the model section for a recipe
    tokenizer.json      copied from PATH when present (an HF `tokenizers` file)
    tokenizer_config.json  with it, when PATH has a chat template: `chat_template` (from
                        tokenizer_config.json or chat_template.jinja) and the special tokens
                        it may name, so a `kind: chat` SFT source reads it (data/chat.py)

and a run starts from it with the recipe key `init_from: OUT`, which calls
`load_converted(OUT)`.

Qwen2's sliding-window layers become swa (window sliding_window - 1: transformers
counts the query itself); Llama's attention_bias biases q, k, v and o (out_bias), its
mlp_bias gate, up and down (model.mlp_bias).
Only settings that HybridLM computes exactly as transformers does are mapped.
Anything else (dynamic NTK, LongRoPE, partial rotary, biases HybridLM has no
place for, other activations) is refused with a
one-line ValueError naming the config field, rather than imported into a
model that would silently compute something else.

Weight names (layer i):
    model.embed_tokens.weight                    -> embed.weight
    model.layers.i.input_layernorm.weight        -> blocks.i.mixer_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.*    -> blocks.i.mixer.{q,k,v,o}_proj.*
    model.layers.i.post_attention_layernorm.weight -> blocks.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight  -> blocks.i.mlp.{gate,up,down}_proj.weight
    model.norm.weight                            -> norm.weight
    lm_head.weight                               -> lm_head.weight (dropped when tied)
Both use rotate-half RoPE on the same head layout, so no permutation is needed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loom.models import HybridLM, ModelConfig
from loom.models.config import build, check_ranges
from loom.models.rope import RopeConfig
from loom.trainer.data.chat import tokenizer_chat_config
from loom.trainer.hf.common import ConvertError, require as _require, rope_from_params
from loom.trainer.hf.families import FAMILIES, family_of
from loom.trainer.hf.families.base import compact_layers

# model_type -> the one architecture class accepted for it.
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Values transformers assumes when a key is absent from config.json (LlamaConfig / Qwen2Config).
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
               "attention_bias": False, "mlp_bias": False, "use_sliding_window": False, "max_window_layers": 28}

_RENAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.mixer_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.mixer.\2.\3"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# Non-persistent RoPE buffers that some old checkpoints contain; recomputed by HybridLM.
_SKIP = re.compile(r".*rotary_emb\.inv_freq")


# ----- config -----

def read_hf_config(src: str | Path) -> dict:
    """config.json of a Hugging Face model folder, with a clear error when absent."""
    src = Path(src)
    path = src / "config.json"
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder (expected a Hugging Face model folder with config.json)")
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face model folder with "
                                f"config.json and *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ConvertError(f"{path}: not UTF-8 text (a damaged or binary file)") from None


def check_architecture(hf: dict) -> str:
    """The architecture name, or ConvertError naming what was found."""
    family = family_of(hf)
    if family is not None:
        return family.check_architecture(hf)
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    expected = SUPPORTED.get(model_type)
    if expected is None or (archs and archs != [expected]):
        found = ", ".join(archs) if archs else "no architectures"
        raise ConvertError(f"unsupported architecture {found} (model_type {model_type!r}); "
                           f"loom convert hf supports {', '.join(supported_architectures())}")
    return expected


def supported_architectures() -> list[str]:
    return list(SUPPORTED.values()) + list(dict.fromkeys(f.architecture for f in FAMILIES.values())) + \
        ["Gemma3ForConditionalGeneration (its language model)", "Qwen3_5ForConditionalGeneration (its language model)"]


def _get(hf: dict, key: str):
    return hf[key] if hf.get(key) is not None else HF_DEFAULTS.get(key)


def rope_from_hf(hf: dict) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers >= 5) or `rope_theta` +
    `rope_scaling` (transformers 4), mapped only when HybridLM's RoPE is the same
    function of the position."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConvertError(f"config.json: rope parameters per layer type ({', '.join(params)}) are not supported")
    rope, partial = rope_from_params(params, hf, float(_get(hf, "rope_theta")))
    if partial != 1.0:
        raise ConvertError(f"config.json: partial_rotary_factor {partial} is not supported "
                           f"(HybridLM rotates the whole head)")
    return rope


HF_SIZES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
            "intermediate_size", "vocab_size", "head_dim")


def check_hf_sizes(hf: dict, where: str = "config.json") -> None:
    """Every size field of config.json (and of its text_config) a positive integer: a zero or
    negative head or layer count is refused naming the field, before anything divides by it."""
    for key in HF_SIZES:
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvertError(f"{where}: {key} must be a positive integer, got {value!r}")
    if isinstance(hf.get("text_config"), dict):
        check_hf_sizes(hf["text_config"], f"{where} text_config")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A Loom ModelConfig computing the same function as the transformers model."""
    check_hf_sizes(hf)
    arch = check_architecture(hf)
    family = family_of(hf)
    if family is not None:
        return family.config_from_hf(family.text_config(hf)[0])
    act = _get(hf, "hidden_act")
    if act not in ("silu", "swish"):
        raise ConvertError(f"config.json: hidden_act {act!r} is not supported (HybridLM's MLP is SwiGLU)")
    if _get(hf, "mlp_bias") and arch != "LlamaForCausalLM":
        raise ConvertError(f"config.json: mlp_bias: true is not a {arch} setting")
    n_layers = int(_require(hf, "num_hidden_layers"))
    kinds, window = ["attn"] * n_layers, None
    if arch == "Qwen2ForCausalLM":  # sliding windows on the layers Qwen2Config makes sliding
        sliding = set(_sliding_layers(hf, n_layers))
        kinds = ["swa" if i in sliding else "attn" for i in range(n_layers)]
        window = int(hf["sliding_window"]) - 1 if sliding else None  # transformers counts the query itself
    attn = {"qkv_bias": True} if arch == "Qwen2ForCausalLM" else \
        {"qkv_bias": True, "out_bias": True} if _get(hf, "attention_bias") else {}
    mixers = {**({"attn": attn} if attn and "attn" in kinds else {}),
              **({"swa": {**attn, "window": window}} if window is not None else {})}
    d_model = int(_require(hf, "hidden_size"))
    n_heads = int(_require(hf, "num_attention_heads"))
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        mlp_hidden=int(_require(hf, "intermediate_size")),
        layers=compact_layers(kinds),
        mixers=mixers,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings")),
        norm_eps=float(_get(hf, "rms_norm_eps")),
        rope=rope_from_hf(hf),
        mlp_bias=bool(_get(hf, "mlp_bias")),
    )


def _sliding_layers(hf: dict, n_layers: int) -> list[int]:
    """Layers that transformers' Qwen2 runs with a sliding window."""
    if not _get(hf, "use_sliding_window") or hf.get("sliding_window") is None:
        return []
    types = hf.get("layer_types")
    if types:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    return list(range(int(_get(hf, "max_window_layers")), n_layers))


def model_yaml_dict(cfg: ModelConfig) -> dict:
    """The architecture fields of `cfg` as a recipe's `model:` mapping (training
    choices such as init_std are left to the recipe)."""
    rope = {"base": cfg.rope.base, "scaling": cfg.rope.scaling}
    used = {"linear": ["factor"], "ntk": ["factor"],
            "yarn": ["factor", "original_max_len", "beta_fast", "beta_slow"],
            "llama3": ["factor", "original_max_len", "low_freq_factor", "high_freq_factor"]}
    rope.update({k: getattr(cfg.rope, k) for k in used.get(cfg.rope.scaling, [])})
    keys = ["vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden", "layers", "mixers",
            "tie_embeddings", "norm_eps"]
    # block and norm layout fields, written only when they differ from the (Llama) defaults
    layout = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name in LAYOUT_FIELDS
              and getattr(cfg, f.name) != (f.default_factory() if f.default is dataclasses.MISSING else f.default)}
    return {**{k: getattr(cfg, k) for k in keys}, "rope": rope, **layout}


LAYOUT_FIELDS = ("norm_placement", "norm_placements", "norm_zero_centred", "norm_weight_fp32", "mlp_kind", "mlp_bias", "block_mlp",
                 "embed_scale", "logit_softcap")


# ----- weights -----

def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by the index, or model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConvertError(f"{index}: not a safetensors index (expected a 'weight_map' mapping)") from None
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{src}: shard {missing[0]} named in {index.name} is missing"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return files
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    found = sorted(src.glob("*.safetensors"))
    if found:
        return found
    other = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f"; found {other[0]}, re-save it with safetensors (save_pretrained(..., safe_serialization=True))" \
        if other else ""
    raise FileNotFoundError(f"{src}: no *.safetensors weights{hint}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_safetensors(path: Path):
    """safe_open(path), or ConvertError naming the file when it is truncated or
    not a safetensors file (the header is checked against the file size here)."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ConvertError(f"{path}: not a readable safetensors file, truncated or corrupt "
                           f"({_first_line(e)})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file on CPU, with the errors of open_safetensors."""
    with open_safetensors(path) as f:
        try:
            return {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def loom_name(hf_name: str) -> str | None:
    """HybridLM parameter name for a transformers one; None for ignorable buffers."""
    if _SKIP.fullmatch(hf_name):
        return None
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise ConvertError(f"unexpected tensor {hf_name!r} in the checkpoint (no HybridLM equivalent)")


def convert_state_dict(files: list[Path], cfg: ModelConfig, rename=loom_name, transform=None) -> dict[str, torch.Tensor]:
    """Read, rename (`rename`: checkpoint name -> HybridLM name or None to skip) and check
    every tensor against HybridLM(cfg)'s names and shapes. `transform` (a family's
    tensors_from_hf) rewrites the checkpoint-named tensors first (splits, merges, conv taps)."""
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in HybridLM(cfg).state_dict().items()}
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        with open_safetensors(path) as f:
            for hf_name in f.keys():
                if not _wanted(rename, hf_name, cfg):
                    continue
                if hf_name in raw:
                    raise ConvertError(f"tensor {hf_name!r} appears in more than one file ({path.name})")
                try:
                    raw[hf_name] = t = f.get_tensor(hf_name)
                except SafetensorError as e:
                    raise ConvertError(f"{path}: cannot read tensor {hf_name!r} ({_first_line(e)})") from None
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ConvertError(f"{path}: tensor {hf_name!r} holds NaN or inf values; the source weights "
                                       "are damaged (re-download them)")
    if transform is not None:
        raw = transform(raw)
    out: dict[str, torch.Tensor] = {}
    for hf_name, t in raw.items():
        name = rename(hf_name)
        if name is None or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if name not in expected:
            raise ConvertError(f"tensor {hf_name!r} does not fit the configured model (layer count "
                               f"{len(cfg.layer_kinds())}, tie_word_embeddings {cfg.tie_embeddings})")
        if tuple(t.shape) != expected[name]:
            raise ConvertError(f"tensor {hf_name!r} has shape {tuple(t.shape)}; config.json implies "
                               f"{expected[name]}")
        out[name] = t.contiguous()
    missing = [k for k in expected if k not in out]
    if missing:
        raise ConvertError(f"checkpoint lacks {len(missing)} tensor(s) HybridLM needs, e.g. {missing[0]!r}")
    return out


def _wanted(rename, hf_name: str, cfg: ModelConfig) -> bool:
    """Whether to read a tensor: not a skipped buffer or tower, not a tied head. A name the
    rename refuses is read, so that a family's transform may merge it (or rename refuses it later)."""
    try:
        name = rename(hf_name)
    except ConvertError:
        return True
    return name is not None and not (name == "lm_head.weight" and cfg.tie_embeddings)


# ----- public API -----

def convert_hf(src: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face Llama/Qwen2 folder into a Loom model folder.

    Writes `out/model.safetensors`, `out/model.yaml` and, when the source has
    one, `out/tokenizer.json`, atomically (a temporary sibling folder renamed
    into place); an `out` that exists and is not empty is refused. Returns `out`. Raises FileNotFoundError for missing files and
    ConvertError (a ValueError) for anything that cannot be converted exactly.

    Example:
        convert_hf("Llama-3.2-1B", "runs/init/llama-1b")
        cfg, state = load_converted("runs/init/llama-1b")
    """
    src, out = Path(src), Path(out)
    hf = read_hf_config(src)
    cfg = model_config_from_hf(hf)
    check_ranges(cfg, "model")  # the sizes and constants config.json gave, as a recipe's are checked
    cfg.resolved()
    files = weight_files(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; remove it or choose another output folder")
    family = family_of(hf)
    state = (convert_state_dict(files, cfg) if family is None else
             convert_state_dict(files, cfg, family.from_hf, family.tensors_from_hf))

    arch = check_architecture(hf)
    note = None if family is None else family.text_config(hf)[1]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    text_hf = hf if family is None else family.text_config(hf)[0]
    header = (f"# Converted by `loom convert hf` from {src.resolve()} ({arch}, {', '.join(dtypes)}).\n"
              + (f"# {note}.\n" if note else "")
              + f"# Pretrained context: max_position_embeddings {text_hf.get('max_position_embeddings')}.\n"
              f"# Use this model section in a recipe and set `init_from: {out}` to start from these weights.\n")
    text = header + yaml.safe_dump({"model": model_yaml_dict(cfg)}, sort_keys=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": arch})
        (tmp / "model.yaml").write_text(text)
        if (src / "tokenizer.json").is_file():
            shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
            chat = tokenizer_chat_config(str(src))  # the chat template (and the tokens it names) goes along
            if chat:
                (tmp / "tokenizer_config.json").write_text(json.dumps(chat, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_converted(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, HybridLM state dict on CPU) from a folder written by convert_hf.

    Example:
        cfg, state = load_converted(out)
        model = HybridLM(cfg)
        model.load_state_dict(state)
    """
    path = Path(path)
    cfg = converted_config(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (expected a folder written by `loom convert hf`)")
    return cfg, read_safetensors(path / "model.safetensors")


def converted_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a converted folder, from its model.yaml (no weights read)."""
    path = Path(path) / "model.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no model.yaml (expected a folder written by `loom convert hf`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConvertError(f"{path}: not UTF-8 text (a damaged or binary file)") from None
    except yaml.YAMLError as e:
        raise ConvertError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConvertError(f"{path}: expected a `model:` mapping")
    return build(ModelConfig, data["model"], "model")


def main_convert(argv: list[str]) -> int:
    """`loom convert hf SRC OUT`; argv is [SRC, OUT], what follows `convert hf`.
    Prints one line; errors print `error: ...` on stderr and return 2 (the
    exit code of every other `loom` user error)."""
    parser = argparse.ArgumentParser(prog="loom convert hf",
                                     description="Import a local Hugging Face folder (config.json + *.safetensors) of "
                                                 "Llama, Qwen2, Qwen3, Mistral, Gemma 3 or OLMo 3.")
    parser.add_argument("src", help="Hugging Face model folder")
    parser.add_argument("out", help="output folder (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        out = convert_hf(args.src, args.out)
        cfg = converted_config(out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        n_params = HybridLM(cfg).num_params()
    kinds = cfg.layer_kinds()
    layers = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    family = family_of(read_hf_config(args.src))
    note = family.text_config(read_hf_config(args.src))[1] if family is not None else None
    note = f"{note}; " if note else ""
    print(f"converted {args.src} -> {out} ({note}{len(kinds)} layers: {layers}; {n_params / 1e6:.1f}M params); "
          f"start a run with `model:` from {out / 'model.yaml'} and `init_from: {out}` in the recipe")
    return 0
