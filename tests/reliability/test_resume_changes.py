"""The recipe given now wins on resume: each changeable setting (lr, schedule, steps, grad clip, cadence,
batch size, betas) takes effect with a one-line notice of what changed, checked against the values the
new setting implies; each impossible change (model shape, tokenizer by hash, seq_len, data sources) is
refused in one line naming the key, before the model is built."""
import shutil
from types import SimpleNamespace

import pytest
import torch

import loom.trainer.train as train_mod
from loom.models.config import ConfigError
from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.config import load_config
from loom.trainer.observe.metrics import read_metrics
from loom.trainer.optim import lr_multiplier
from loom.trainer.checkpoint.resume_policy import check_resume, recipe_record

from loomtest import TINY


@pytest.fixture
def resume(stopped, tmp_path, run_cli):
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)

    def go(*overrides):
        rc, out, err = run_cli("train", recipe, f"output_dir={run}", *overrides)
        return rc, out, err, run
    return go


def _train_lines(run):
    return {r["step"]: r for r in read_metrics(run) if "split" not in r and "event" not in r}


@pytest.mark.parametrize("overrides, notice", [
    (["optim.lr=0.001"], "optim.lr 0.003 -> 0.001"),
    (["optim.schedule=constant"], "optim.schedule cosine -> constant"),
    (["optim.lr=0.001", "optim.schedule=wsd", "train.steps=10"],
     "optim.lr 0.003 -> 0.001, optim.schedule cosine -> wsd, train.steps 8 -> 10"),
])
def test_changed_schedule_takes_effect(resume, overrides, notice):
    rc, out, _, run = resume(*overrides)
    assert rc == 0
    [line] = [l for l in out.splitlines() if l.startswith("resume:")]
    assert line == f"resume: the recipe given now wins; changed since step 4: {notice}"
    cfg = load_config(TINY, overrides)
    lines = _train_lines(run)
    assert sorted(lines) == list(range(1, cfg.train.steps + 1))
    for step in range(4, cfg.train.steps + 1):  # the logged lr is the schedule's after `step` updates
        want = cfg.optim.lr * lr_multiplier(step, cfg.train.steps, cfg.optim)
        if step == 4:  # logged by the first run, before the change
            want = 3e-3 * lr_multiplier(4, 8, load_config(TINY).optim)
        assert lines[step]["lr"] == pytest.approx(want, rel=1e-9), step


def test_changed_grad_clip_takes_effect(resume, monkeypatch):
    clip, used = torch.nn.utils.clip_grad_norm_, []

    def recording_clip(params, max_norm, *args, **kwargs):
        used.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    rc, out, _, run = resume("optim.grad_clip=0.25")
    assert rc == 0 and "optim.grad_clip 1.0 -> 0.25" in out
    assert used == [0.25] * 4  # steps 5..8 clip at the new norm


def test_changed_cadence_and_batch_size_take_effect(resume):
    rc, out, err, run = resume("train.log_every=2", "train.save_every=3", "train.batch_size=4",
                               "optim.betas=[0.8, 0.9]")
    assert rc == 0
    assert ("optim.betas [0.9, 0.95] -> [0.8, 0.9], train.batch_size 2 -> 4, train.log_every 1 -> 2, "
            "train.save_every 2 -> 3") in out
    assert "the global batch changes from 2 to 4" in err
    lines = _train_lines(run)
    assert sorted(lines) == [1, 2, 3, 4, 6, 8]
    assert lines[8]["tokens"] - lines[4]["tokens"] == 4 * 4 * 96
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    manager = CheckpointManager(run)
    _, state, _ = manager.load(manager.latest_valid())
    assert [tuple(g["betas"]) for g in state["engine"]["optimizer"]["param_groups"]] == [(0.8, 0.9)] * 2


@pytest.mark.parametrize("override, key", [
    ("model.d_model=64", "model.d_model"),
    ("model.layers=[attn, x3]", "model.layers"),
    ("data.seq_len=128", "data.seq_len"),
    ("data.sources=[{kind: stdlib, max_bytes: 300000}]", "data.sources"),
])
def test_impossible_change_is_refused(resume, monkeypatch, override, key):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the change was refused")
    monkeypatch.setattr(train_mod, "build_model", never)
    rc, _, err, run = resume(override)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {key}: cannot change from ") and "when resuming" in err
    assert max(_train_lines(run)) == 4  # the run folder is untouched


def test_tokenizer_is_compared_by_hash_not_size():
    cfg = load_config(TINY)
    saved = recipe_record(cfg, SimpleNamespace(fingerprint="hf-aaaa-300"))
    meta = {"step": 4, **saved}
    assert check_resume(cfg, SimpleNamespace(fingerprint="hf-aaaa-300"), meta) is None
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .* tokenizer hf-aaaa-300, the recipe now gives "
                                          r"hf-bbbb-300"):
        check_resume(cfg, SimpleNamespace(fingerprint="hf-bbbb-300"), meta)
