"""The long-context suite (loom.trainer.eval.longeval) and `loom eval`.

Checks:
- every task builds windows of exactly T + 1 tokens whose answer spans decode
  to the reference strings, the same examples at every length (pure in seed and
  index), and a clear ValueError when a length is too short for a task;
- scoring against oracles: a runner that predicts every token right scores 1.0
  teacher-forced and generated, one that predicts nothing right scores 0.0, and
  a runner right on every answer but the last digit scores exactly the share
  of answers it got right (so the span bookkeeping is exact);
- the teacher-forced scores of a real model equal a naive per-example argmax;
- `loom eval` on a trained tiny run writes results.json, heatmap.png and
  loss_by_position.png; a training run with eval.suite_tasks logs the suite's
  numbers to metrics.jsonl and writes the PNGs;
- bad input is one `error:` line: a checkpoint whose recipe does not match,
  an unknown task, a bad eval.suite_* key.
Cost: ~25 s on 2 shared cores (two tiny training runs).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.trainer.cli import main
from loom.trainer.data import load_tokenizer
from loom.trainer.eval.longeval.suite import LocalRunner, SuiteSpec, _batch, flat_metrics, generated, run_suite, \
    teacher_forced
from loom.trainer.eval.longeval.tasks import TASKS, SuiteTask

TOK = load_tokenizer("byte")
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")
TEXT = np.frombuffer(b"def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40, dtype=np.uint8).astype(np.int64)


def spans(ex) -> list[str]:
    a, out, cur = ex["answer"], [], []
    for tok, is_ans in zip(ex["tokens"], a):
        if is_ans:
            cur.append(int(tok))
        elif cur:
            out.append(TOK.decode(cur))
            cur = []
    return out + ([TOK.decode(cur)] if cur else [])


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("filler", ["repeat", "text"])
def test_task_windows(name, filler):
    for length in (512, 1024):
        task = SuiteTask(name, TOK, length, seed=3, filler=filler, text_tokens=TEXT)
        ex = task.example(2)
        assert len(ex["tokens"]) == len(ex["answer"]) == length + 1
        assert ex["tokens"][-1] == TOK.eos_id and ex["answer"].any()
        assert not ex["answer"][:ex["prompt_len"]].any() and ex["answer"][ex["prompt_len"]]
        got = spans(ex)
        if name in ("cwe", "fwe", "vt", "niah_multivalue", "niah_multiquery", "mqar"):
            assert got == ex["refs"], (got, ex["refs"])
        else:
            assert got == ex["refs"] and len(got) == 1
        assert SuiteTask(name, TOK, length, seed=3, filler=filler, text_tokens=TEXT).example(2)["refs"] == ex["refs"]
    if name not in ("cwe", "fwe"):   # same needles at every length
        assert SuiteTask(name, TOK, 512, 3, filler, TEXT).example(1)["refs"] == \
            SuiteTask(name, TOK, 1024, 3, filler, TEXT).example(1)["refs"]


def test_too_short_and_bad_filler():
    with pytest.raises(ValueError, match="niah_multiquery needs an evaluation length >= "):
        SuiteTask("niah_multiquery", TOK, 128, 0).example(0)
    with pytest.raises(ValueError, match="filler 'text' needs real-text"):
        SuiteTask("niah_single", TOK, 512, 0, filler="text")
    with pytest.raises(ValueError, match="unknown task"):
        SuiteTask("niah", TOK, 512, 0)


class Oracle:
    """Runner that knows the examples: right everywhere, or wrong on the last answer
    token of every `wrong_every`-th span (0: never wrong), or never right."""

    def __init__(self, examples, mode="right"):
        self.by_prompt = {tuple(ex["tokens"][:ex["prompt_len"]].tolist()): ex for ex in examples}
        self.mode = mode

    def token_scores(self, model, batch):
        labels, mask = batch["labels"], batch["answer_mask"]
        correct = torch.full(labels.shape, self.mode != "never")
        if self.mode == "last_digit_of_even_rows":
            for b in range(0, labels.shape[0], 2):
                correct[b, int(torch.nonzero(mask[b])[-1])] = False
        return torch.zeros(labels.shape), correct

    def generate(self, model, ids, max_new_tokens, eos_id):
        ex = self.by_prompt[tuple(ids[0].tolist())]
        rest = torch.as_tensor(ex["tokens"][ex["prompt_len"]:], dtype=torch.int64)[None]
        if self.mode == "never":
            rest = torch.full_like(rest, ord("#"))
        return torch.cat([ids, rest], dim=1)[:, :ids.shape[1] + max_new_tokens]


def test_scores_against_oracles():
    ex = [SuiteTask("passkey", TOK, 256, 0, depth=0.5).example(i) for i in range(6)]
    assert teacher_forced(None, ex, Oracle(ex), 4) == 1.0
    assert generated(None, ex, TOK, Oracle(ex)) == 1.0
    assert teacher_forced(None, ex, Oracle(ex, "never"), 4) == 0.0
    assert generated(None, ex, TOK, Oracle(ex, "never")) == 0.0
    # batches of 4 then 2: rows 0, 2 of the first and 0 of the second are wrong -> 3 of 6
    assert teacher_forced(None, ex, Oracle(ex, "last_digit_of_even_rows"), 4) == 0.5
    multi = [SuiteTask("niah_multiquery", TOK, 512, 0).example(i) for i in range(2)]
    # one of the 4 answers of row 0 is wrong: 7 of 8 spans right
    assert teacher_forced(None, multi, Oracle(multi, "last_digit_of_even_rows"), 2) == 7 / 8


def test_teacher_forced_equals_naive_argmax():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=320, d_model=32, n_heads=2, layers=["attn", "x2"])).eval()
    ex = [SuiteTask("niah_multivalue", TOK, 384, 1).example(i) for i in range(3)]
    naive = []
    with torch.no_grad():
        for e in ex:
            pred = model.logits(model(torch.as_tensor(e["tokens"][None, :-1])).hidden).argmax(-1)[0]
            target, ans = e["tokens"][1:], e["answer"][1:]
            runs = np.split(np.arange(len(ans)), np.nonzero(np.diff(ans.astype(int)))[0] + 1)
            naive += [bool((pred[r].numpy() == target[r]).all()) for r in runs if ans[r[0]]]
    assert teacher_forced(model, ex, LocalRunner(), 2) == pytest.approx(sum(naive) / len(naive))
    spec = SuiteSpec(tasks=["passkey", "niah_single", "cwe"], lengths=[256, 512], n=2, depths=[0.0, 1.0],
                     fillers=["repeat"], generate=True, batch_size=2)
    res = run_suite(model, TOK, spec, 256, LocalRunner())
    flat = flat_metrics(res)
    assert set(res["grids"]) == {"passkey", "niah_single"}
    assert len(res["grids"]["passkey"]["teacher_forced"]) == 2 and "passkey@512/gen" in flat
    assert "skipped" in res["tasks"]["cwe"]["repeat"]["256"] or "cwe@256" in flat


def tiny_args(run, *extra):
    return [f"output_dir={run}", "model.d_model=32", "model.n_heads=2", "data.seq_len=128", "train.steps=6",
            "train.batch_size=2", "train.eval_every=6", "train.save_every=6", "eval.passkey_n=2",
            "data.val_windows=2", "optim.warmup_steps=2", "eval.suite_n=2", "eval.suite_depths=[0.5]",
            "eval.suite_val_windows=2", *extra]


def test_loom_eval_writes_results_and_pngs(tmp_path, capsys):
    recipe = RECIPE
    run = tmp_path / "run"
    # training with the suite on: its numbers reach metrics.jsonl, its PNGs the run folder
    assert main(["train", recipe, *tiny_args(run, "eval.suite_tasks=[passkey, niah_single]",
                                             "eval.suite_lengths=[128, 256]", "eval.suite_generate=false")]) == 0
    assert "suite: wrote" in capsys.readouterr().out
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"split"' in x][-1]
    assert {"passkey@256", "niah_single.text@128", "passkey_grid@256/depth0.5", "val_loss@256"} <= set(ev)
    assert (run / "eval" / "step-00000006" / "heatmap.png").stat().st_size > 1000
    # loom eval: the whole suite at 1x and 2x
    assert main(["eval", recipe, *tiny_args(run, "eval.suite_generate=true"), "--lengths", "128,256", "--examples", "1",
                 "--tasks", "passkey,niah_single,vt,mqar"]) == 0
    out = capsys.readouterr().out
    assert "eval step 6:" in out and "wrote" in out
    folder = run / "eval" / "step-00000006"
    res = json.loads((folder / "results.json").read_text())
    assert res["step"] == 6 and res["lengths"] == [128, 256] and res["train_length"] == 128
    assert "generated" in res["tasks"]["vt"]["repeat"]["256"]
    assert set(res["loss_by_position"]) == {"128", "256"}
    for png in ("heatmap.png", "loss_by_position.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line(tmp_path, capsys):
    recipe = RECIPE
    run = tmp_path / "run"
    assert main(["train", recipe, *tiny_args(run)]) == 0
    capsys.readouterr()
    cases = [
        (["eval", recipe, *tiny_args(run, "model.d_model=64")], "checkpoint's recipe does not match: model.d_model"),
        (["eval", recipe, *tiny_args(run, "model.layers=[swa, x2]")], "checkpoint's recipe does not match: model.layers"),
        (["eval", recipe, *tiny_args(run), "--tasks", "passkey,niahh"], "unknown suite task 'niahh'"),
        (["eval", recipe, *tiny_args(run, "eval.suite_fillers=[essay]")], "eval.suite_fillers: unknown filler"),
        (["eval", recipe, *tiny_args(run), "--checkpoint", str(tmp_path / "nope")], "no checkpoint at"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err
