"""MFU and profiler traces (trainer/observe/perf.py): the logged mfu of a real run equals
tokens/s x the model's FLOPs per token / the peak given by train.peak_flops;
under data.seq_len_schedule the FLOPs per token are each stage's; the measured CPU
GEMM rate is the best timed GEMM; the CPU peak is cores x clock x FLOPs/cycle of the
ISA (raised to the GEMM rate when that is higher), so a real run's mfu is in (0, 1];
GPU names map to their bf16 peak and unknown ones say so; train.profile_steps writes a
TensorBoard-readable trace; bad values are one-line config errors."""
import json
from pathlib import Path

import pytest
import torch

from loom.models import HybridLM
from loom.trainer.cli import main
from loom.trainer.config import load_config
from loom.trainer.observe.metrics import read_metrics
from loom.trainer.observe.perf import cpu_theoretical_peak, device_peak, measure_cpu_peak, mfu
from loom.trainer.train import model_config_for
from loom.trainer.data import load_tokenizer

from loomtest import TINY


def test_mfu_in_metrics_and_trace_written(tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.steps=3", "train.log_every=1", "train.peak_flops=2e9",
            "train.profile_steps=[2]"]
    assert main(["train", str(TINY), *args]) == 0
    assert "perf: peak 0.002 TFLOP/s per device (train.peak_flops)" in capsys.readouterr().out
    cfg = load_config(str(TINY), args)
    fpt = HybridLM(model_config_for(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)).flops_per_token(
        cfg.data.seq_len)
    lines = [r for r in read_metrics(out) if "split" not in r]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 2e9, rel=1e-9)
    traces = list((out / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and "step2" in traces[0].name
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)


def test_mfu_counts_each_stages_sequence_length(tmp_path):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.steps=4", "train.log_every=1", "train.peak_flops=2e9",
            "data.seq_len_schedule=[{step: 0, seq_len: 96}, {step: 2, seq_len: 192}]"]
    assert main(["train", str(TINY), *args]) == 0
    cfg = load_config(str(TINY), args)
    model = HybridLM(model_config_for(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size))
    fpt = {T: model.flops_per_token(T) for T in (96, 192)}
    assert fpt[96] != fpt[192]   # the attention scores grow with the length
    lines = [r for r in read_metrics(out) if "split" not in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r, T in zip(lines, (96, 96, 192, 192)):
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt[T] / 2e9, rel=1e-9), (r["step"], T)


def test_measured_cpu_peak_is_the_best_gemm(monkeypatch):
    ticks = iter([0.0, 0.5, 1.0, 1.2, 2.0, 2.9])  # three timed GEMMs: 0.5 s, 0.2 s, 0.9 s
    monkeypatch.setattr("loom.trainer.observe.perf.time.perf_counter", lambda: next(ticks))
    assert measure_cpu_peak(n=64, repeats=3) == pytest.approx(2 * 64 ** 3 / 0.2)


def test_gpu_table_and_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert device_peak(torch.device("cuda", 0)) == (989e12, "bf16 peak of NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-40GB")
    assert device_peak(torch.device("cuda", 0))[0] == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Mystery GPU")
    peak, why = device_peak(torch.device("cuda", 0))
    assert peak is None and "train.peak_flops" in why
    assert device_peak(torch.device("cpu"), 5e12) == (5e12, "train.peak_flops")
    assert mfu(1000.0, 1e6, 4e9, 2) == pytest.approx(1000 * 1e6 / 2 / 4e9)
    assert mfu(1000.0, 1e6, None, 1) is None


@pytest.mark.parametrize("arg", ["train.peak_flops=0", "train.profile_steps=[0]", "train.tile_mlp=-1",
                                 "train.tile_blocks=-1"])
def test_bad_values_are_config_errors(arg, tmp_path, capsys):
    assert main(["train", str(TINY), f"output_dir={tmp_path / 'x'}", arg]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_cpu_theoretical_peak_from_isa_and_clock():
    avx512 = ({"fpu", "avx", "avx2", "fma", "avx512f"}, 2.3e9)
    assert cpu_theoretical_peak(1, avx512) == (2.3e9 * 64, "1 core x 2.3 GHz x 64 fp32 FLOPs/cycle (AVX-512 FMA)")
    assert cpu_theoretical_peak(1, ({"avx", "avx2", "fma"}, 3e9))[0] == 3e9 * 32
    assert cpu_theoretical_peak(1, ({"avx", "avx2"}, 3e9))[0] == 3e9 * 16  # AVX2 without FMA
    assert cpu_theoretical_peak(1, ({"fp", "asimd"}, 2e9))[0] == 2e9 * 16
    assert cpu_theoretical_peak(1, ({"avx512f"}, None)) is None
    assert cpu_theoretical_peak(1, ({"mystery"}, 2e9)) is None
    # cores: the threads used, at most the CPUs this process may run on
    import os
    n = len(os.sched_getaffinity(0))
    assert cpu_theoretical_peak(n + 7, avx512)[0] == n * 2.3e9 * 64


def test_cpu_peak_is_theoretical_and_names_the_gemm(monkeypatch):
    monkeypatch.setattr("loom.trainer.observe.perf.measure_cpu_peak", lambda: 1e9)
    monkeypatch.setattr("loom.trainer.observe.perf.cpu_theoretical_peak", lambda threads: (5e9, "how"))
    assert device_peak(torch.device("cpu")) == (5e9, f"how; measured fp32 GEMM 0.001 TFLOP/s on "
                                                     f"{torch.get_num_threads()} threads")
    # a GEMM faster than the estimate (a clock reported below the real one) raises the peak to it
    monkeypatch.setattr("loom.trainer.observe.perf.measure_cpu_peak", lambda: 9e9)
    peak, why = device_peak(torch.device("cpu"))
    assert peak == 9e9 and "faster than reported" in why
    monkeypatch.setattr("loom.trainer.observe.perf.cpu_theoretical_peak", lambda threads: None)
    peak, why = device_peak(torch.device("cpu"))
    assert peak == 9e9 and "set train.peak_flops" in why


def test_real_run_mfu_is_a_fraction(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(TINY), f"output_dir={out}", "train.steps=4", "train.log_every=1",
                 "train.save_every=100", "train.eval_every=100"]) == 0
    assert "fp32 FLOPs/cycle" in capsys.readouterr().out
    fractions = [r["mfu"] for r in read_metrics(out) if "split" not in r]
    assert len(fractions) == 4 and all(0 < f <= 1 for f in fractions), fractions
