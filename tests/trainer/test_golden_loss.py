"""Golden loss curves of the debug models (torchtitan's tests/assets/losses habit).

The first 50 per-step training losses of the tiny recipe (tests/tiny.yaml: attn x2) and of a
hybrid of it (rat, swa, linear, memory, titans_mag) at seed 0 must equal the checked-in curves in
tests/assets/losses/tiny.json. A change that should not alter the maths (a refactor, a new engine
path, a moved module) keeps them; one that does alter it fails here loudly and must regenerate the
file on purpose:

    .venv/bin/python tests/trainer/test_golden_loss.py --write

The data are the synthetic `copy` and `passkey` sources only: the tiny recipe's `stdlib` source
reads this Python's own standard library, which differs between Python versions.

Tolerance: `atol` in the file, 10x the largest spread measured on 2026-12-07 between 1 to 4 threads,
repeated runs and the three ATen CPU code paths (ATEN_CPU_CAPABILITY=default, avx2, avx512,
which stand in for other CPU types): 9.5e-7 (tiny) and 2.6e-6 (hybrid) absolute; 0 between threads
and repeats on one code path. ~15 s for both curves.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loomtest import TINY

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny.json"
STEPS = 50
SOURCES = ("data:\n  sources:\n"
           "    - {kind: copy, weight: 1.0, min_period: 8, max_period: 24}\n"
           "    - {kind: passkey, weight: 1.0}\n")
MODELS = {"tiny": None, "hybrid": "[rat, swa, linear, memory, titans_mag]"}


def train_losses(name: str, out: Path) -> list[float]:
    """Train debug model `name` for STEPS steps in `out`; its per-step losses from metrics.jsonl."""
    from loom.trainer.cli import main

    recipe = out / f"{name}.yaml"
    layers = MODELS[name]
    recipe.write_text(f"base: {TINY}\n" + SOURCES
                      + (f"model: {{layers: {layers}}}\n" if layers else "")
                      + f"train: {{steps: {STEPS}, log_every: 1, eval_every: 100000, save_every: 100000}}\n")
    assert main(["train", str(recipe), f"output_dir={out / name}"]) == 0
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r and "event" not in r and "loss" in r]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_loss(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    want, atol = golden["losses"][name], golden["atol"]
    got = train_losses(name, tmp_path)
    assert len(got) == len(want) == STEPS
    worst = max(range(STEPS), key=lambda i: abs(got[i] - want[i]))
    assert abs(got[worst] - want[worst]) <= atol, (
        f"{name}: step {worst + 1} loss {got[worst]!r} != golden {want[worst]!r} (atol {atol}); "
        f"regenerate tests/assets/losses/tiny.json only if the maths changed on purpose")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        losses = {name: train_losses(name, Path(d)) for name in sorted(MODELS)}
    GOLDEN.write_text(json.dumps({"steps": STEPS, "seed": 0, "atol": 3e-5, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
