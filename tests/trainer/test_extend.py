"""Context extension recipes end to end: a tiny random transformers Llama / Qwen3 built here
(never downloaded), converted with `loom convert hf`, then recipes/extend-llama.yaml /
extend-qwen3.yaml run through the real CLI, overridden to tiny sizes on CPU: init_from the
converted folder (its logits at step 0 are the imported model's), the recipe's RoPE scaling
(llama3 / yarn) with original_max_len at the tiny model's context, a two-stage
seq_len_schedule, length_upsample on a real-text source, and the long-context suite at
1x-8x the original length, evaluated during training and by `loom eval`.
Checks: training loss falls, the suite's results.json holds every length, and the recipe's
own keys (scaling, schedule, upsample, cp, suite at 1x-8x) are what the comments say.
Cost: about 30 s per family on one core.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from loom.trainer.cli import main  # noqa: E402
from loom.trainer.config import load_config  # noqa: E402
from loom.trainer.observe.metrics import read_metrics, train_losses  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ORIGINAL = 128   # the tiny model's pretrained context (max_position_embeddings)


def tiny_hf(family: str, folder: Path) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16,
                                                                      tie_word_embeddings=True))
    model.save_pretrained(folder)
    return folder


def flat(prefix: str, node) -> list[str]:
    if isinstance(node, dict) and node:
        return [o for k, v in node.items() for o in flat(f"{prefix}.{k}", v)]
    return [f"{prefix}={json.dumps(node)}"]


@pytest.mark.parametrize("family, scaling", [("llama", "llama3"), ("qwen3", "yarn")])
def test_extension_recipe_end_to_end(tmp_path, family, scaling, capsys):
    recipe = RECIPES / f"extend-{family}.yaml"
    cfg = load_config(recipe)
    r = cfg.model.rope
    assert cfg.init_from and r.scaling == scaling and r.factor > 1 and cfg.parallel.cp > 1
    assert len(cfg.data.seq_len_schedule) >= 2 and any(s.length_upsample for s in cfg.data.sources)
    assert cfg.eval.suite_lengths == [r.original_max_len * m for m in (1, 2, 4, 8)]

    conv = tmp_path / "conv"
    assert main(["convert", "hf", str(tiny_hf(family, tmp_path / "hf")), str(conv)]) == 0
    imported = yaml.safe_load((conv / "model.yaml").read_text())["model"]
    rope = imported.pop("rope")
    overrides = [o for k, v in imported.items() for o in flat(f"model.{k}", v)] + [
        f"model.rope.base={rope['base']}", f"model.rope.original_max_len={ORIGINAL}",
        f"init_from={conv}", f"output_dir={tmp_path / 'run'}", "data.tokenizer=byte",
        f"data.cache_dir={tmp_path / 'cache'}", f"data.seq_len={ORIGINAL}",
        f"data.seq_len_schedule=[{{step: 0, seq_len: {ORIGINAL}}}, {{step: 8, seq_len: {2 * ORIGINAL}}}]",
        "data.sources=[{kind: stdlib, max_bytes: 200000, length_upsample: [[512, 3.0]]}, "
        "{kind: passkey, weight: 0.2}]",
        "data.val_windows=2", "optim.lr=3.0e-3", "optim.warmup_steps=2", "train.steps=16", "train.batch_size=4",
        "train.grad_accum=1", "train.log_every=1", "train.eval_every=16", "train.save_every=16",
        "parallel.engine=single", "parallel.cp=1", "eval.passkey_n=1", "eval.suite_n=2",
        f"eval.suite_lengths={[ORIGINAL * m for m in (1, 2, 4, 8)]}",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.5, (first, last)
    evals = [m for m in read_metrics(tmp_path / "run") if m.get("split")]
    assert evals and evals[-1]["step"] == 16
    out = tmp_path / "eval"
    assert main(["eval", str(recipe), *overrides, "--out", str(out), "--no-generate", "--n", "2"]) == 0
    text = (out / "results.json").read_text()
    for length in (ORIGINAL, 2 * ORIGINAL, 4 * ORIGINAL, 8 * ORIGINAL):
        assert f"{length}" in text
