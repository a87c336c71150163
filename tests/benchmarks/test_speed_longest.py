"""benchmarks/speed.py's arithmetic for the `recipes` and `longest` sections: the memory line
fit and its residual, T_max rounded down to 2^k or 3 x 2^k x 1024 tokens, the time
extrapolation that skips expensive cells, and the recipes' layer patterns at 4 layers with
long-context windows. Fast tier (< 1 s, no model is run).
"""
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

speed = SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py")))


def test_linear_fit_recovers_a_line_and_reports_the_residual():
    a, b, resid = speed.linear_fit([4096, 8192, 16384], [1.0 + 2e-5 * T for T in (4096, 8192, 16384)])
    assert a == pytest.approx(1.0) and b == pytest.approx(2e-5) and resid == pytest.approx(0, abs=1e-12)
    a, b, resid = speed.linear_fit([1, 2, 3], [0.0, 1.0, 1.0])  # -1/3 + x/2: residuals -1/6, 1/3, -1/6
    assert (a, b) == pytest.approx((-1 / 3, 0.5)) and resid == pytest.approx(1 / 3)


def test_long_slope_extrapolates_from_the_verified_step():
    row = {"fit": [{"tokens": 16384, "peak_rss_gib": 2.0}], "verify": {"T": 65536, "peak_rss_gib": 5.0}}
    speed.long_slope(row, 24)  # 3 GiB over 48K tokens = 64 KiB / token; 19 GiB more = 311,296 tokens
    assert row["b_long_kib_per_token"] == 64 and row["T_max_long_slope"] == speed.round_down_tokens(65536 + 311296)
    failed = {"fit": [{"tokens": 16384, "peak_rss_gib": 2.0}], "verify": {"T": 65536, "failed": "exit code -9"}}
    speed.long_slope(failed, 24)
    assert "T_max_long_slope" not in failed


@pytest.mark.parametrize("T, expected", [(0, 0), (1023, 0), (1024, 1024), (2047.9, 1024), (3071, 2048),
                                         (3072, 3072), (4095, 3072), (1_200_000, 1_048_576),
                                         (1_572_864, 1_572_864), (2_097_151, 1_572_864)])
def test_round_down_tokens(T, expected):
    assert speed.round_down_tokens(T) == expected


def test_extrapolate_seconds_follows_the_measured_exponent_clamped():
    assert speed.extrapolate_seconds([(4096, 2.0), (16384, 8.0)], 65536) == pytest.approx(32.0)  # linear
    assert speed.extrapolate_seconds([(4096, 2.0), (8192, 2.0)], 16384) == pytest.approx(4.0)  # at least linear
    assert speed.extrapolate_seconds([(4096, 1.0), (8192, 8.0)], 16384) == pytest.approx(32.0)  # at most quadratic


def test_recipe_model_repeats_or_trims_to_four_layers_with_long_windows():
    assert speed.recipe_model("gated-attn") == (["attn"] * 4, {"attn": {"gate": "elementwise", "conv_size": 4}})
    layers, mixers = speed.recipe_model("hybrid-all")
    assert layers == ["attn", "swa", "rat", "s2"] and set(mixers) == set(layers)
    assert mixers["swa"]["window"] == 512 and mixers["rat"]["moh"] is True
    layers, mixers = speed.recipe_model("titans-mal")
    assert layers == ["memory", "swa"] * 2 and mixers["memory"] == {"chunk_size": 64, "depth": 2, "expansion": 2}
