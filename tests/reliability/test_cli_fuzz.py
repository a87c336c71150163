"""A fuzz test over the CLI: for every subcommand (train, eval, generate, info, convert hf, convert to-hf,
data prepare / stats / verify), generated bad arguments (zero, negative, non-numeric counts; empty,
blank and non-UTF-8 text) and damaged files (random bytes, truncated, empty, a directory instead of a
file, missing, unreadable) each give a non-zero exit code, at most 3 lines on stderr, no traceback,
and leave every folder the command reads unchanged (nothing written, nothing deleted).

The CLI runs in-process (loom.trainer.cli.main) so the ~150 cases take seconds. Unreadable files
are emulated (we run as root): a directory where a file is expected, or open() raising EACCES
for that one path."""
import builtins
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loom.trainer.cli import main

from .conftest import TINY

NON_UTF8 = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")  # how Python passes undecodable argv bytes
BAD_COUNTS = ["0", "-1", "-99999999999999999999", "abc", "1.5", "", "nan", "1e3"]
BAD_TEXT = ["", "   ", NON_UTF8]


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hf_folder(folder: Path, **overrides) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
           "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32, "num_hidden_layers": 1,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
           "tie_word_embeddings": True, **overrides}
    D, F, K = 16, 32, 8
    shapes = {"model.embed_tokens.weight": (64, D), "model.norm.weight": (D,),
              "model.layers.0.input_layernorm.weight": (D,), "model.layers.0.post_attention_layernorm.weight": (D,),
              "model.layers.0.self_attn.q_proj.weight": (2 * K, D), "model.layers.0.self_attn.k_proj.weight": (K, D),
              "model.layers.0.self_attn.v_proj.weight": (K, D), "model.layers.0.self_attn.o_proj.weight": (D, 2 * K),
              "model.layers.0.mlp.gate_proj.weight": (F, D), "model.layers.0.mlp.up_proj.weight": (F, D),
              "model.layers.0.mlp.down_proj.weight": (D, F)}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained run (2 steps, one checkpoint), its recipe, a prepared data folder and a Hugging Face folder."""
    d = tmp_path_factory.mktemp("world")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY.read_text().replace("steps: 8", "steps: 2") + f"output_dir: {d / 'run'}\n")
    assert main(["train", str(recipe)]) == 0
    (d / "a.txt").write_text("hello world, a line of text\n" * 300)
    assert main(["data", "prepare", "--source", f"{{kind: files, path: {d / 'a.txt'}}}", "--out", str(d / "prep")]) == 0
    hf_folder(d / "hf")
    assert main(["convert", "hf", str(d / "hf"), str(d / "converted")]) == 0
    return d


# ---------------------------------------------------------------- damaged files

def _random(p: Path):
    p.write_bytes(random.Random(str(p)).randbytes(777))


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def _empty(p: Path):
    p.write_bytes(b"")


def _dir(p: Path):
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")


def _missing(p: Path):
    p.unlink()


FILE_DAMAGE = {"random": _random, "truncated": _truncate, "empty": _empty, "dir": _dir, "missing": _missing}


def _copy(world: Path, tmp: Path, name: str) -> Path:
    src = world / name
    dst = tmp / name
    shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    return dst


def _run_copy(world: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the run and a recipe naming it."""
    run = _copy(world, tmp, "run")
    recipe = tmp / "tiny.yaml"
    recipe.write_text((world / "tiny.yaml").read_text().replace(str(world / "run"), str(run)))
    return run, recipe


# ---------------------------------------------------------------- cases: (name, build(world, tmp) -> argv)

CASES = {}


def case(name):
    def add(fn):
        CASES[name] = fn
        return fn
    return add


for value in BAD_COUNTS:
    CASES[f"generate --max-new-tokens {value!r}"] = (
        lambda w, t, v=value: ["generate", w / "tiny.yaml", "--prompt", "def ", "--max-new-tokens", v])
    CASES[f"eval --examples {value!r}"] = lambda w, t, v=value: ["eval", w / "tiny.yaml", "--examples", v]
    CASES[f"eval --lengths {value!r}"] = lambda w, t, v=value: ["eval", w / "tiny.yaml", "--lengths", v]
    CASES[f"data prepare --workers {value!r}"] = (
        lambda w, t, v=value: ["data", "prepare", "--source", f"{{kind: files, path: {w / 'a.txt'}}}",
                               "--out", t / "out", "--workers", v])
    CASES[f"data prepare --procs {value!r}"] = (
        lambda w, t, v=value: ["data", "prepare", w / "tiny.yaml", "--procs", v])
for value in ["64,0", "-64", "a,b", ",", "64,,-1"]:
    CASES[f"eval --lengths {value!r}"] = lambda w, t, v=value: ["eval", w / "tiny.yaml", "--lengths", v]
for value in ["-1", "2"]:
    CASES[f"data prepare --worker {value!r}"] = (
        lambda w, t, v=value: ["data", "prepare", "--source", f"{{kind: files, path: {w / 'a.txt'}}}",
                               "--out", t / "out", "--worker", v, "--workers", "2"])
for value in BAD_TEXT:
    CASES[f"generate --prompt {value!r}"] = lambda w, t, v=value: ["generate", w / "tiny.yaml", "--prompt", v]
    CASES[f"eval --tasks {value!r}"] = lambda w, t, v=value: ["eval", w / "tiny.yaml", "--tasks", v]
    CASES[f"eval --checkpoint {value!r}"] = lambda w, t, v=value: ["eval", w / "tiny.yaml", "--checkpoint", v]
    CASES[f"data prepare --source {value!r}"] = (
        lambda w, t, v=value: ["data", "prepare", "--source", v, "--out", t / "out"])
CASES["eval --tasks ','"] = lambda w, t: ["eval", w / "tiny.yaml", "--tasks", ","]
CASES["eval --tasks unknown"] = lambda w, t: ["eval", w / "tiny.yaml", "--tasks", "no_such_task"]
for value in ["not: [valid", "[1, 2]", "{kind: files, path: /no/such/file.txt}", "{kind: nope}", "{weight: -1}"]:
    CASES[f"data prepare --source {value!r}"] = (
        lambda w, t, v=value: ["data", "prepare", "--source", v, "--out", t / "out"])
CASES["data prepare --dtype bogus"] = lambda w, t: ["data", "prepare", w / "tiny.yaml", "--dtype", "bogus"]

# bad recipe values, for every recipe-taking subcommand
OVERRIDES = ["model.layers=[attn, x0]", "model.n_heads=0", "model.d_model=-8", "data.seq_len=0", "optim.lr=.nan",
             "optim.lr=-1", "train.steps=0", "model.mixers.rat.chunk=0", "eval.suite_n=0", "data.sources=[]",
             "model.rope.factor=.inf", "no_such_key=1", "model.layers=[]"]
for sub in ("train", "eval", "generate", "info"):
    extra = ["--prompt", "x"] if sub == "generate" else []
    for ov in OVERRIDES:
        CASES[f"{sub} {ov}"] = lambda w, t, s=sub, o=ov, e=extra: [s, w / "tiny.yaml", o, *e]
    for kind, damage in FILE_DAMAGE.items():
        if kind == "truncated":
            continue  # the first third of a YAML mapping is a valid, shorter recipe
        def recipe_case(w, t, s=sub, d=damage, e=extra):
            p = t / "tiny.yaml"
            p.write_text((w / "tiny.yaml").read_text())
            d(p)
            return [s, p, *e]
        CASES[f"{sub} recipe {kind}"] = recipe_case


# damaged run folders for the subcommands that read checkpoints
def _damage_run(how):
    def build(w, t, sub, extra):
        run, recipe = _run_copy(w, t)
        how(run)
        return [sub, recipe, *extra]
    return build


def _all_checkpoints(fn):
    def how(run):
        for step in (run / "checkpoints").glob("step-*"):
            fn(step / "model.safetensors")
    return how


RUN_DAMAGE = {
    "latest is a directory": lambda run: _dir(run / "checkpoints" / "latest"),
    "weights random": _all_checkpoints(_random),
    "weights truncated": _all_checkpoints(_truncate),
    "weights a directory": _all_checkpoints(_dir),
    "no checkpoints": lambda run: shutil.rmtree(run / "checkpoints"),
    "manifest empty": lambda run: [_empty(s / "manifest.json") for s in (run / "checkpoints").glob("step-*")],
}
for sub in ("eval", "generate"):
    extra = ["--prompt", "x"] if sub == "generate" else []
    for name, how in RUN_DAMAGE.items():
        CASES[f"{sub} run {name}"] = lambda w, t, s=sub, e=extra, b=_damage_run(how): b(w, t, s, e)
CASES["eval --checkpoint missing"] = lambda w, t: ["eval", w / "tiny.yaml", "--checkpoint", t / "nope"]
CASES["eval --checkpoint a file"] = lambda w, t: ["eval", w / "tiny.yaml", "--checkpoint", w / "a.txt"]


# convert hf
def _hf_case(fn):
    def build(w, t):
        src = hf_folder(t / "hf") if fn is not None else t / "hf"
        if fn is not None:
            fn(src)
        return ["convert", "hf", src, t / "out"]
    return build


def _hf_config(**changes):
    def fn(src):
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **changes}))
    return fn


def _hf_weight(value):
    def fn(src):
        from safetensors.torch import load_file

        t = load_file(str(src / "model.safetensors"))
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = value
        save_file(t, str(src / "model.safetensors"))
    return fn


CASES["convert hf src missing"] = _hf_case(None)
for key in ("num_attention_heads", "num_hidden_layers", "num_key_value_heads", "hidden_size", "vocab_size",
            "intermediate_size"):
    for value in (0, -2, "4", 2.5):
        CASES[f"convert hf {key}={value!r}"] = _hf_case(_hf_config(**{key: value}))
CASES["convert hf rope_theta=0"] = _hf_case(_hf_config(rope_theta=0.0))
CASES["convert hf rms_norm_eps=-1"] = _hf_case(_hf_config(rms_norm_eps=-1.0))
for value in (float("nan"), float("inf"), float("-inf")):
    CASES[f"convert hf weight {value}"] = _hf_case(_hf_weight(value))
for kind, damage in FILE_DAMAGE.items():
    CASES[f"convert hf config.json {kind}"] = _hf_case(lambda src, d=damage: d(src / "config.json"))
    CASES[f"convert hf weights {kind}"] = _hf_case(lambda src, d=damage: d(src / "model.safetensors"))
CASES["convert hf out is a file"] = lambda w, t: (
    (t / "out").write_text("keep me"), ["convert", "hf", w / "hf", t / "out"])[1]


# convert to-hf
def _to_hf_inside(rel):
    def build(w, t):
        run, _ = _run_copy(w, t)
        step = sorted((run / "checkpoints").glob("step-*"))[-1]
        src = {"run": run, "ckpt": step}[rel[0]]
        return ["convert", "to-hf", src, (run if rel[1] == "run" else step) / rel[2]]
    return build


CASES["to-hf out inside the run"] = _to_hf_inside(("run", "run", "export"))
CASES["to-hf out inside checkpoints/"] = _to_hf_inside(("run", "run", "checkpoints/hf"))
CASES["to-hf out is the run"] = _to_hf_inside(("run", "run", "."))
CASES["to-hf ckpt out inside the checkpoint"] = _to_hf_inside(("ckpt", "ckpt", "hf"))
CASES["to-hf ckpt out inside its run"] = _to_hf_inside(("ckpt", "run", "hf"))
CASES["to-hf src missing"] = lambda w, t: ["convert", "to-hf", t / "nope", t / "out"]
CASES["to-hf src a file"] = lambda w, t: ["convert", "to-hf", w / "a.txt", t / "out"]
CASES["to-hf --target bogus"] = lambda w, t: ["convert", "to-hf", w / "run", t / "out", "--target", "bogus"]
for name, how in RUN_DAMAGE.items():
    def to_hf_damaged(w, t, h=how):
        run, _ = _run_copy(w, t)
        h(run)
        return ["convert", "to-hf", run, t / "out"]
    CASES[f"to-hf run {name}"] = to_hf_damaged
for kind, damage in FILE_DAMAGE.items():
    CASES[f"to-hf converted model.yaml {kind}"] = (
        lambda w, t, d=damage: (d(_copy(w, t, "converted") / "model.yaml"), ["convert", "to-hf", t / "converted", t / "out"])[1])


# data stats / verify
def _prep_case(sub, target, damage):
    def build(w, t):
        prep = _copy(w, t, "prep")
        if target == "dir":
            shutil.rmtree(prep)
            if damage == "file":
                prep.write_text("not a folder")
        else:
            path = next(prep.glob(target))
            FILE_DAMAGE[damage](path)
        extra = ["--png", t / "h.png"] if sub == "stats" else []
        return ["data", sub, prep, *extra]
    return build


for sub in ("stats", "verify"):
    CASES[f"data {sub} missing folder"] = _prep_case(sub, "dir", "missing")
    CASES[f"data {sub} a file"] = _prep_case(sub, "dir", "file")
    for target in ("manifest.json", "train/*.index", "train/*.tokens"):
        for kind in FILE_DAMAGE:
            if sub == "stats" and target.endswith(".tokens") and kind in ("random",):
                continue  # same size, other bytes: only a checksum sees it (`data verify` does)
            CASES[f"data {sub} {target} {kind}"] = _prep_case(sub, target, kind)
CASES["data stats --split bogus"] = lambda w, t: ["data", "stats", w / "prep", "--split", "bogus"]
CASES["data prepare tokenizer random"] = lambda w, t: (
    _random(t / "tok.json") if (t / "tok.json").touch() is None else None,
    ["data", "prepare", "--source", f"{{kind: files, path: {w / 'a.txt'}}}", "--tokenizer", t / "tok.json",
     "--out", t / "out"])[1]
CASES["data prepare tokenizer a directory"] = lambda w, t: (
    (t / "tok").mkdir(), ["data", "prepare", "--source", f"{{kind: files, path: {w / 'a.txt'}}}",
                          "--tokenizer", t / "tok", "--out", t / "out"])[1]
CASES["unknown subcommand"] = lambda w, t: ["nope"]
CASES["no arguments"] = lambda w, t: []


def _unreadable(path_of):
    """open() of one path raising EACCES, the way a file without read permission does for a normal user."""
    def wrap(world, tmp, monkeypatch):
        target = Path(path_of(world, tmp)).resolve()
        real = builtins.open

        def guarded(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == target:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, *a, **k)
        monkeypatch.setattr(builtins, "open", guarded)
        monkeypatch.setattr(io, "open", guarded)  # pathlib's read_text and read_bytes
    return wrap


UNREADABLE = {  # (argv, the file made unreadable)
    "info recipe unreadable": (lambda w, t: ["info", w / "tiny.yaml"], lambda w, t: w / "tiny.yaml"),
    "data stats manifest unreadable": (lambda w, t: ["data", "stats", w / "prep", "--png", t / "h.png"],
                                       lambda w, t: w / "prep" / "manifest.json"),
    "data verify manifest unreadable": (lambda w, t: ["data", "verify", w / "prep"],
                                        lambda w, t: w / "prep" / "manifest.json"),
    "convert hf config unreadable": (lambda w, t: ["convert", "hf", w / "hf", t / "out"],
                                     lambda w, t: w / "hf" / "config.json"),
    "to-hf converted model.yaml unreadable": (lambda w, t: ["convert", "to-hf", w / "converted", t / "out"],
                                              lambda w, t: w / "converted" / "model.yaml"),
    "generate checkpoint manifest unreadable": (
        lambda w, t: ["generate", w / "tiny.yaml", "--prompt", "x"],
        lambda w, t: next((w / "run" / "checkpoints").glob("step-*")) / "manifest.json"),
}


def _check(world, tmp_path, capsys, argv, damage=None):
    """Runs `loom argv` (with damage(monkeypatch) applied during the call only) and checks the outcome."""
    before, here = snapshot(world), snapshot(tmp_path)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        if damage is not None:
            damage(mp)
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # pragma: no cover - main returns, it should never exit
            pytest.fail(f"main raised SystemExit({e.code})")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc != 0, f"exit code 0 for {argv}"
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 3, err
    assert any(line.startswith("error: ") for line in lines), err
    assert snapshot(world) == before, "a folder the command reads changed"
    assert snapshot(tmp_path) == here, "the command wrote or deleted files"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a recipe without output_dir must not leave runs/ in the repository
    argv = CASES[name](world, tmp_path)
    _check(world, tmp_path, capsys, argv)


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_file_is_one_line(name, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, target = UNREADABLE[name]
    _check(world, tmp_path, capsys, argv(world, tmp_path),
           damage=lambda mp: _unreadable(target)(world, tmp_path, mp))


def test_fuzz_covers_every_subcommand():
    subs = {" ".join(n.split()[:2]) if n.startswith(("data", "convert")) else n.split()[0] for n in CASES}
    for sub in ("train", "eval", "generate", "info", "convert hf", "to-hf", "data prepare", "data stats",
                "data verify"):
        assert any(s.startswith(sub) for s in subs), sub
    assert len(CASES) > 150
