"""The range table: every numeric recipe key declares its range next to its type and default
(loom.models.config.ranged), and a value outside it, nan or inf is refused at load time in one
line naming the key.

The fields are discovered, not listed: every dataclass reachable from RunConfig and every
registered mixer's Config is walked, so a new numeric field without a declared range fails
`test_every_numeric_field_declares_a_range`, and one whose range is not enforced fails
`test_out_of_range_value_is_refused`."""
import dataclasses
import math
import types
import typing

import pytest

from loom.models.config import ConfigError, build, check_ranges, field_range
from loom.models.mixers import MIXERS
from loom.trainer.config import RunConfig, deep_merge, read_recipe, validate

from .conftest import TINY

_NUMERIC = (int, float)


def _unwrap(tp):
    """(scalar type, list depth, dataclass or None) of a field's annotation."""
    depth = 0
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return None, depth, None
            tp = rest[0]
        elif origin in (list, tuple):
            depth += 1
            tp = args[0] if args else typing.Any
        else:
            break
    if dataclasses.is_dataclass(tp):
        return None, depth, tp
    return (tp if tp in _NUMERIC else None), depth, None


def _walk(cls, path, seen=()):
    """Yields (path parts, field, scalar type, list depth) for every numeric field under `cls`.
    A path part is a key, or (key,) for a list of dataclasses (the walk enters its first item)."""
    if cls in seen:
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        scalar, depth, sub = _unwrap(hints[f.name])
        if sub is not None:
            part = (f.name,) if depth else f.name
            yield from _walk(sub, path + [part], seen + (cls,))
        elif scalar is not None:
            yield path + [f.name], f, scalar, depth


def _fields():
    out = list(_walk(RunConfig, []))
    for kind, mixer in sorted(MIXERS.items()):
        out += _walk(mixer.Config, ["model", "mixers", kind])
    return out


FIELDS = _fields()


def _key(parts) -> str:
    s = ""
    for p in parts:
        s += (f".{p[0]}[0]" if isinstance(p, tuple) else f".{p}")
    return s[1:]


def _nest(parts, value):
    for p in reversed(parts):
        value = [value] if isinstance(p, tuple) else value
        value = {p[0] if isinstance(p, tuple) else p: value}
    return value


def _bad_values(rng, scalar):
    out = []
    if rng.ge is not None:
        out.append(rng.ge - 1)
    if rng.gt is not None:
        out.append(rng.gt)
    if rng.le is not None:
        out.append(rng.le + 1)
    if rng.lt is not None:
        out.append(rng.lt)
    if scalar is float:
        out += [math.nan] + ([math.inf, -math.inf] if rng.finite else [])
    return [scalar(v) if scalar is int else v for v in out]


def _cases():
    for parts, f, scalar, depth in FIELDS:
        rng = field_range(f)
        if rng is None:
            continue
        for v in _bad_values(rng, scalar):
            # a list field gets the bad value in every entry (the pair fields want two)
            value = v
            for _ in range(depth):
                value = [value, value]
            yield pytest.param(parts, value, id=f"{_key(parts)}={v}")


def test_discovery_reaches_every_config():
    keys = {_key(p) for p, *_ in FIELDS}
    for needle in ("optim.lr", "train.spike_skip", "eval.passkey_depths", "parallel.zero", "seed",
                   "data.sources[0].weight", "data.seq_len_schedule[0].seq_len", "model.rope.factor",
                   "model.mixers.attn.moh_topk", "model.mixers.attn.rope_config.beta_fast",
                   "model.mixers.titans_mac.segment", "model.mixers.mamba2.dt_limit"):
        assert needle in keys, needle
    assert len(keys) > 100


def test_every_numeric_field_declares_a_range():
    missing = [_key(p) for p, f, *_ in FIELDS if field_range(f) is None]
    assert not missing, f"numeric keys without a declared range (use loom.models.config.ranged): {missing}"


@pytest.fixture(scope="module")
def base():
    return read_recipe(TINY)


def test_defaults_and_tiny_recipe_are_in_range(base):
    validate(build(RunConfig, base))
    check_ranges(RunConfig())
    for mixer in MIXERS.values():
        check_ranges(mixer.Config())


@pytest.mark.parametrize("parts,value", list(_cases()))
def test_out_of_range_value_is_refused(base, parts, value):
    data = deep_merge(base, _nest(parts, value))
    with pytest.raises(ConfigError) as e:
        validate(build(RunConfig, data))
    msg = str(e.value)
    assert "\n" not in msg
    key = _key(parts)
    # a list of dataclasses is named with the entry's index; a list of numbers by its key
    assert msg.startswith(key + " must be "), (key, msg)


def test_code_built_config_is_checked_too():
    cfg = RunConfig()
    cfg.optim.lr = math.nan
    with pytest.raises(ConfigError, match=r"^optim\.lr must be a finite number"):
        validate(cfg)
    cfg = RunConfig()
    cfg.data.sources[0].val_fraction = 1.0
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.val_fraction must be > 0 and < 1, got 1.0"):
        validate(cfg)


def test_cli_names_the_key(recipe, run_cli, tmp_path):
    rc, _, err = run_cli("train", recipe, f"output_dir={tmp_path / 'run'}", "model.mixers.rat.chunk=0")
    assert rc != 0 and err.strip().splitlines() == ["error: model.mixers.rat.chunk must be >= 1, got 0"], err
    assert not (tmp_path / "run").exists()
