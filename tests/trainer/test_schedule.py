"""Sequence-length schedule (trainer/data/schedule.py): stage batch sizes and their errors;
each stage continues the source streams where the previous one stopped; batches
resumed from the data state on either side of a stage change equal an uninterrupted
run's; and the trainer resumes exactly (same losses) across a stage change, with
evaluation at each stage's length (loss by context-length bucket).
"""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from loom.models.config import ConfigError, build
from loom.trainer.cli import main
from loom.trainer.data import DataConfig, StagedBatches, build_dataset, load_tokenizer
from loom.trainer.data.schedule import resolve_stages
from loom.trainer.observe.metrics import read_metrics, train_losses

BYTE = load_tokenizer("byte")
from loomtest import TINY


def _cfg(schedule, sources=None):
    return build(DataConfig, {"seq_len": 64, "seq_len_schedule": schedule,
                              "sources": sources or [{"kind": "stdlib", "max_bytes": 300000}]}, "data")


def test_stage_batch_sizes_and_errors():
    st = resolve_stages(_cfg([{"step": 0, "seq_len": 32}, {"step": 5, "seq_len": 128},
                              {"step": 9, "seq_len": 256, "batch_size": 1}]), batch_size=4)
    assert [(s.step, s.seq_len, s.batch_size) for s in st] == [(0, 32, 8), (5, 128, 2), (9, 256, 1)]
    assert [(s.seq_len, s.batch_size) for s in resolve_stages(_cfg([]), 4)] == [(64, 4)]
    bad = [([{"step": 1, "seq_len": 32}], r"seq_len_schedule\[0\]\.step"),
           ([{"step": 0, "seq_len": 32}, {"step": 0, "seq_len": 64}], r"\[1\]\.step: .*increasing"),
           ([{"step": 0, "seq_len": 48}], r"\[0\]\.batch_size: .*256 tokens"),
           ([{"step": 0, "seq_len": 512}], r"\[0\]\.batch_size")]
    for sched, match in bad:
        with pytest.raises(ConfigError, match=match):
            resolve_stages(_cfg(sched), 4)
    with pytest.raises(ConfigError, match=r"\[1\]\.seq_len \(38\) must be divisible by 2 \* parallel.cp"):
        resolve_stages(_cfg([{"step": 0, "seq_len": 32}, {"step": 3, "seq_len": 38, "batch_size": 1}]), 4, cp_size=2)


def _run(data, steps):
    return [data.next(s) for s in range(steps)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_stage_continues_the_stream_and_resumes_exactly():
    cfg = _cfg([{"step": 0, "seq_len": 32}, {"step": 3, "seq_len": 64}])   # batch 4 then 2, one source
    full = _run(StagedBatches(cfg, 2, BYTE, seed=0), 7)
    assert [b["input_ids"].shape for b in full] == [(4, 32)] * 3 + [(2, 64)] * 4
    # stage 1 starts where stage 0 stopped: after 12 windows of 32 tokens
    one = build_dataset(dataclasses.replace(cfg, seq_len=32, seq_len_schedule=[]), BYTE, "train", 0)
    stream = torch.cat([one[k]["input_ids"] for k in range(12, 16)])
    assert torch.equal(full[3]["input_ids"][0], stream[:64]) and torch.equal(full[3]["input_ids"][1], stream[64:])
    for stop in (2, 3, 4):                                                   # before, at and after the change
        a = StagedBatches(cfg, 2, BYTE, seed=0)
        _run(a, stop)
        b = StagedBatches(cfg, 2, BYTE, seed=0)
        b.load_state_dict(a.state_dict())
        assert _same([b.next(s) for s in range(stop, 7)], full[stop:])


def test_synthetic_and_mixed_sources_continue_across_stages():
    cfg = _cfg([{"step": 0, "seq_len": 32}, {"step": 2, "seq_len": 64}],
               [{"kind": "stdlib", "max_bytes": 300000, "weight": 1.0}, {"kind": "copy", "weight": 1.0,
                                                                          "min_period": 4, "max_period": 8}])
    full = _run(StagedBatches(cfg, 2, BYTE, seed=1), 4)
    a = StagedBatches(cfg, 2, BYTE, seed=1)
    _run(a, 2)
    b = StagedBatches(cfg, 2, BYTE, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["stage"] == 0 and _same([b.next(2), b.next(3)], full[2:])
    assert b.state_dict()["stage_windows"] == [8]


def test_trainer_resumes_exactly_across_a_stage_change(tmp_path, capsys):
    sched = ["data.seq_len_schedule=[{step: 0, seq_len: 96}, {step: 4, seq_len: 192}]", "train.eval_every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(TINY), f"output_dir={a}", *sched]) == 0
    for stop in ("train.stop_after_steps=3", "train.stop_after_steps=2"):    # stops at steps 3 and 5
        assert main(["train", str(TINY), f"output_dir={b}", *sched, stop]) == 0
    assert main(["train", str(TINY), f"output_dir={b}", *sched]) == 0
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert all(abs(la[s] - lb[s]) <= 1e-6 for s in la), (la, lb)
    evals = [r for r in read_metrics(a) if r.get("split") == "val"]
    assert [(e["step"], e["seq_len"], e["stage"]) for e in evals] == [(2, 96, 0), (4, 96, 0), (6, 192, 1),
                                                                      (8, 192, 1)]
    assert all(list(e["loss_by_length"]) == ["0-" + str(e["seq_len"])] for e in evals)
    tokens = [r["tokens"] for r in read_metrics(a) if "split" not in r]
    assert np.all(np.diff(tokens) == 2 * 96)
    bad = ["data.seq_len_schedule=[{step: 0, seq_len: 96}, {step: 4, seq_len: 48, batch_size: 4}]"]
    assert main(["train", str(TINY), f"output_dir={tmp_path / 'c'}", *bad]) == 2       # passkey too long for 48
    assert "passkey needs seq_len >= 80" in capsys.readouterr().err and not (tmp_path / "c" / "checkpoints").exists()                                  # constant tokens per step


def test_every_stage_is_checked_with_the_model():
    from loom.trainer.config import load_config
    from loom.trainer.data.schedule import check_stages_with_model

    cfg = load_config(TINY, ["data.seq_len_schedule=[{step: 0, seq_len: 96}, {step: 4, seq_len: 192}]"])
    seen = []

    def check(seq_len):                     # stands in for check_cp_support: rejects one length
        seen.append(seq_len)
        if seq_len == 192:
            raise ConfigError("data.seq_len=192 does not fit model.layers[0]")

    with pytest.raises(ConfigError, match=r"seq_len_schedule\[1\] \(seq_len 192\): data.seq_len=192"):
        check_stages_with_model(check, cfg.data, cfg.train.batch_size, cfg.parallel.cp)
    assert seen == [96, 192]
