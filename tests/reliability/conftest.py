"""Shared fixtures of the reliability tests: the tiny recipe in a temporary folder, a tiny run stopped
at step 4, an uninterrupted reference run, and a helper that runs the CLI in-process and returns
(exit code, stdout, stderr)."""

import pytest

from loom.trainer.cli import main

from loomtest import TINY


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.read_text())
    return p


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """(recipe, run folder) of a tiny run stopped at step 4, with checkpoints at 2 and 4."""
    d = tmp_path_factory.mktemp("stopped")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY.read_text())
    assert main(["train", str(recipe), f"output_dir={d / 'run'}", "train.stop_after_steps=4"]) == 0
    return recipe, d / "run"


@pytest.fixture
def run_cli(capsys):
    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Run folder of one uninterrupted run of the tiny recipe (8 steps, checkpoints every 2)."""
    from loom.trainer.observe.metrics import train_losses

    d = tmp_path_factory.mktemp("reference")
    p = d / "tiny.yaml"
    p.write_text(TINY.read_text())
    assert main(["train", str(p), f"output_dir={d / 'run'}"]) == 0
    return train_losses(d / "run")


@pytest.fixture
def same_losses(reference):
    """Asserts that a run folder logged every train step once, each loss equal to the uninterrupted run's."""
    from loom.trainer.observe.metrics import read_metrics, train_losses

    def check(run_dir):
        steps = [r["step"] for r in read_metrics(run_dir) if "split" not in r and "event" not in r]
        assert steps == sorted(set(steps)) == sorted(reference), steps
        got = train_losses(run_dir)
        for step, loss in reference.items():
            assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    return check
