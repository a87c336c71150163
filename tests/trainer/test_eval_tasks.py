"""Synthetic-task evaluation: MQAR held-out examples and scores (exact match per
query, teacher-forced), the passkey key length used at evaluation, the copy task,
and their config errors. Fast CPU tier (seconds)."""
import numpy as np
import pytest
import torch

import loom.trainer.eval.validation as evaluate
from loom.models.config import ConfigError
from loom.trainer.cli import main
from loom.trainer.config import load_config, mqar_shape, passkey_key_digits
from loom.trainer.data import (DataConfig, SourceConfig, build_dataset, load_tokenizer, mqar_examples,
                          passkey_examples)
from loom.trainer.data.synthetic import CopyTask
from loom.trainer.observe.metrics import read_metrics

BYTE = load_tokenizer("byte")


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- MQAR examples

def test_mqar_examples_are_held_out_and_seeded():
    batches = mqar_examples(BYTE, 128, n=5, seed=0, n_pairs=5, n_queries=3, batch_size=4)
    assert [b["input_ids"].shape for b in batches] == [(4, 128), (1, 128)]
    b = batches[0]
    for row in range(4):
        mask = b["answer_mask"][row]
        values = BYTE.decode(b["labels"][row][mask])
        assert len(values) == 9 and values.isdigit()                      # 3 queries x 3 digits
        text = BYTE.decode(b["input_ids"][row])
        for q in range(3):
            assert values[3 * q:3 * q + 3] in text[:40]                    # each value shown in a pair
    again = mqar_examples(BYTE, 128, n=5, seed=0, n_pairs=5, n_queries=3, batch_size=4)[0]
    other = mqar_examples(BYTE, 128, n=5, seed=1, n_pairs=5, n_queries=3, batch_size=4)[0]
    assert torch.equal(again["input_ids"], b["input_ids"])
    assert not torch.equal(other["input_ids"], b["input_ids"])
    cfg = DataConfig(seq_len=128, sources=[SourceConfig(kind="mqar", n_pairs=5, n_queries=3)])
    train = [build_dataset(cfg, BYTE, split, seed=0)[i]["input_ids"] for split in ("train", "val") for i in range(64)]
    assert not any(torch.equal(t, row) for t in train for row in b["input_ids"])


# ----------------------------------------------------------------------------- scores

def _fake_model(monkeypatch, correct, losses):
    monkeypatch.setattr(evaluate, "forward_hidden", lambda model, batch: None)
    monkeypatch.setattr(evaluate, "token_losses", lambda model, hidden, labels: (losses, correct))
    return torch.nn.Linear(1, 1)


def test_answer_scores_count_queries_rows_and_tokens(monkeypatch):
    labels = torch.arange(12).view(2, 6)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)  # 3 answers
    correct = torch.ones(2, 6, dtype=torch.bool)
    correct[0, 4] = False                           # breaks row 0's second answer
    correct[1, 0] = False                           # outside any answer: no effect
    losses = torch.where(mask, 2.0, 9.0)
    model = _fake_model(monkeypatch, correct, losses)
    s = evaluate.answer_scores(model, [{"labels": labels, "answer_mask": mask}])
    assert s["answers"] == 3
    assert s["exact"] == pytest.approx(2 / 3)       # per answer
    assert s["rows"] == pytest.approx(1 / 2)        # rows with every answer right
    assert s["tokens"] == pytest.approx(6 / 7)
    assert s["loss"] == pytest.approx(2.0)          # answer tokens only
    assert model.training                           # mode restored


# ----------------------------------------------------------------------------- copy task

def test_copy_task_repeats_a_random_string():
    task = CopyTask(BYTE, 100, (0, 2, 2, 0), min_period=10, max_period=20)
    ex = task.example(3)
    assert len(ex["tokens"]) == 101 and 10 <= ex["period"] <= 20
    body = ex["tokens"][1:]
    p = ex["period"]
    assert BYTE.decode(body[:p]) == ex["text"]
    assert np.array_equal(body[p:], np.resize(body[:p], len(body) - p))
    assert not ex["answer"][:1 + p].any() and ex["answer"][1 + p:].all()
    assert CopyTask(BYTE, 100, (0, 2, 2, 0), 10, 20).example(3)["text"] == ex["text"]
    assert CopyTask(BYTE, 100, (1, 2, 2, 0), 10, 20).example(3)["text"] != ex["text"]
    with pytest.raises(ValueError, match="seq_len"):
        CopyTask(BYTE, 30, (0,), min_period=20, max_period=20).window(0)
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.min_period"):
        build_dataset(DataConfig(sources=[SourceConfig(kind="copy", min_period=9, max_period=8)]), BYTE, "train", 0)


# ----------------------------------------------------------------------------- config and trainer

def test_eval_task_shapes_follow_the_sources(tmp_path):
    r = write(tmp_path, "data: {seq_len: 128, sources: [{kind: passkey, key_digits: 7}, "
                        "{kind: mqar, n_pairs: 6, n_queries: 2}]}\n")
    cfg = load_config(r)
    assert passkey_key_digits(cfg) == 7 and mqar_shape(cfg) == (6, 2)
    cfg = load_config(r, ["eval.passkey_key_digits=3", "eval.mqar_pairs=8", "eval.mqar_queries=8"])
    assert passkey_key_digits(cfg) == 3 and mqar_shape(cfg) == (8, 8)
    assert mqar_shape(load_config(write(tmp_path, "seed: 0\n", "plain.yaml"))) == (16, 4)
    for override, needle in [("eval.mqar_n=-1", "eval.mqar_n must be >= 0"),
                             ("eval.mqar_lengths=[0]", "eval.mqar_lengths must be >= 1"),
                             ("eval.passkey_key_digits=0", "eval.passkey_key_digits must be >= 1")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(r, [override])
    with pytest.raises(ConfigError, match="eval.mqar_queries"):
        load_config(r, ["eval.mqar_n=4", "eval.mqar_queries=7"])


TASKS = """\
model: {d_model: 32, n_heads: 2, layers: [attn, x2]}
data:
  seq_len: 96
  sources:
    - {kind: passkey, weight: 1.0, key_digits: 3}
    - {kind: mqar, weight: 1.0, n_pairs: 4, n_queries: 2}
  val_windows: 2
optim: {lr: 3.0e-3, warmup_steps: 2}
train: {steps: 2, batch_size: 2, log_every: 1, eval_every: 2, save_every: 2}
eval: {passkey_n: 2, passkey_depths: [0.5], mqar_n: 3, mqar_lengths: [96, 160]}
"""


def test_trainer_reports_mqar_accuracy(tmp_path, capsys):
    r = write(tmp_path, TASKS)
    assert main(["train", str(r), f"output_dir={tmp_path / 'run'}"]) == 0
    ev = [m for m in read_metrics(tmp_path / "run") if m.get("split") == "val"][-1]
    for key in ("passkey@96", "mqar@96", "mqar@160"):
        assert 0.0 <= ev[key] <= 1.0
    assert "mqar@160" in capsys.readouterr().out
    assert main(["train", str(r), f"output_dir={tmp_path / 'bad'}", "eval.mqar_lengths=[40]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: eval.mqar_lengths:") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_passkey_eval_uses_the_sources_key_length():
    batch = passkey_examples(BYTE, 96, 0.5, n=1, seed=0, key_digits=3)[0]
    assert int(batch["answer_mask"].sum()) == 3
