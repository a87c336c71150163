"""Recipe loading: `base:` inheritance, dotted overrides, and errors that
name the offending key before any work starts."""
import pytest

from loom.models.config import ConfigError
from loom.trainer.config import load_config

REPO_RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_base_inheritance_merges_nested_sections(tmp_path):
    write(tmp_path, "base.yaml", "seed: 3\nmodel: {d_model: 64, n_heads: 2}\noptim: {lr: 0.1}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel: {n_heads: 4}\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.model.d_model, cfg.model.n_heads, cfg.optim.lr) == (3, 64, 4, 0.1)
    assert cfg.name == "child" and str(cfg.run_dir) == "runs/child"


def test_overrides_are_typed(tmp_path):
    r = write(tmp_path, "r.yaml", "model: {d_model: 64}\n")
    cfg = load_config(r, ["optim.lr=1e-4", "model.layers=[[attn, attn], x2]", "train.steps=7",
                          "model.mixers.attn.gate=headwise"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7
    assert cfg.model.layer_kinds() == ["attn"] * 4
    assert cfg.model.mixers["attn"]["gate"] == "headwise"


@pytest.mark.parametrize("override, needle", [
    ("model.nonexistent=3", "unknown key 'model.nonexistent'"),
    ("optim.lrr=3", "did you mean 'lr'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("parallel.engine=mpi", "parallel.engine: 'mpi' is not one of"),
    ("model.mixers.attn.gaet=headwise", "model.mixers.attn.gaet"),
    ("model.layers=[attn, rta]", "unknown mixer kind 'rta'"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, override, needle):
    r = write(tmp_path, "r.yaml", "seed: 0\n")
    with pytest.raises(ConfigError, match=None) as e:
        load_config(r, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_and_self_inheritance(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(loop)


def test_cp_must_divide_sequence(tmp_path):
    r = write(tmp_path, "r.yaml", "data: {seq_len: 100}\nparallel: {cp: 3}\n")
    with pytest.raises(ConfigError, match="divisible by 2 \\* parallel.cp"):
        load_config(r)


@pytest.mark.parametrize("recipe", sorted(p.name for p in REPO_RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(REPO_RECIPES / recipe)
    assert cfg.model.resolved().layer_kinds()
