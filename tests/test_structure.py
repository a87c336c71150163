"""The package's shape: one `loom` namespace, layers that import one way, no
import cycles anywhere in loom.*, no context-parallel branches in the mixers.

- pyproject.toml lists every subpackage of trainer/, models/, kernels/ (as
  loom.*), and a built wheel holds exactly their modules under loom/ and no
  other top-level name (~15 s: one `pip wheel`);
- imports (module level and inside functions, read from the source): no cycle
  among the modules of loom.kernels, loom.models and loom.trainer (the checker
  itself is shown a cycle it must report, written to disk); models/ and kernels/
  never import the trainer; models/ never imports torch.distributed;
  loom.trainer.distributed.dist imports only torch; kernels/context_parallel imports no op
  (only itself and the kernels-wide helpers): the ops own their sharded forms;
- models/mixers never import kernels.context_parallel nor test `ctx.cp`:
  they pass it to their op, which decides;
- no function or method in trainer/ is longer than 100 lines, its docstring
  excluded (a loop that reads as its steps), with a negative control.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("trainer", "models", "kernels")


def _modules(root: Path = REPO) -> dict[str, Path]:
    """loom.* module name -> source file, for every .py file of the three folders under `root`."""
    out = {}
    for top in FOLDERS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["loom." + ".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports anywhere in its source, absolute, as written."""
    found = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _graph(root: Path = REPO) -> dict[str, set[str]]:
    """loom.* module -> the loom.* modules it imports (module level or in a function)."""
    mods = _modules(root)
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in _imports(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among `nodes`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v] & nodes):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(nodes):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"loom." + ".".join(p.parent.relative_to(REPO).parts)
               for top in FOLDERS for p in (REPO / top).rglob("__init__.py")}
    assert listed == folders, f"missing from pyproject: {folders - listed}; not folders: {listed - folders}"


def test_wheel_holds_only_loom(tmp_path):
    # built from a copy of what the wheel is made of: setuptools' build/ folder in the checkout would
    # otherwise keep modules that were moved or deleted since an earlier build
    src = tmp_path / "src"
    for name in FOLDERS:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("loom_lm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"loom"}, tops
    modules = {n for n in names if n.endswith(".py")}
    expected = {"loom/" + str(p.relative_to(REPO)) for p in _modules().values()}
    assert modules == expected, f"missing: {sorted(expected - modules)}; extra: {sorted(modules - expected)}"
    assert "loom/__init__.py" not in names  # a namespace: nothing of its own


def test_no_import_cycle():
    graph = _graph()
    assert {m.split(".")[1] for m in graph} == set(FOLDERS)  # every loom package is read
    assert _cycle(graph, set(graph)) is None


def test_cycle_finder_finds_cycles(tmp_path):
    """Negative control for the test above: two modules written to disk that import each
    other, one at module level and one inside a function, are reported by the same reader."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    (tmp_path / "kernels" / "op").mkdir(parents=True)
    for top in ("models", "trainer"):
        (tmp_path / top).mkdir()
    (tmp_path / "kernels" / "op" / "__init__.py").write_text("def f():\n    from loom.kernels.op.cp import g\n")
    (tmp_path / "kernels" / "op" / "cp.py").write_text("from loom.kernels.op import f\n")
    (tmp_path / "kernels" / "leaf.py").write_text("import torch\n")
    graph = _graph(tmp_path)
    assert _cycle(graph, set(graph)) == ["loom.kernels.op", "loom.kernels.op.cp", "loom.kernels.op"]
    (tmp_path / "kernels" / "op" / "cp.py").write_text("from loom.kernels.leaf import torch\n")
    assert _cycle(_graph(tmp_path), set(graph)) is None


def test_context_parallel_imports_no_op():
    """kernels/context_parallel holds building blocks only: it imports itself, the
    kernels-wide helpers and nothing of any op (attention, rat, memory, linear, s2, swa, ...)."""
    allowed = ("loom.kernels.context_parallel", "loom.kernels.dispatch", "loom.kernels.backends")
    ops = {"loom.kernels." + p.name for p in (REPO / "kernels").iterdir() if (p / "__init__.py").exists()}
    ops.discard("loom.kernels.context_parallel")
    assert {"loom.kernels.attention", "loom.kernels.rat", "loom.kernels.memory"} <= ops
    for name, path in _modules().items():
        if name.startswith("loom.kernels.context_parallel"):
            loom_imports = {i for i in _imports(name, path) if i.startswith("loom.")}
            assert all(i.startswith(allowed) for i in loom_imports), f"{name} imports {sorted(loom_imports)}"
            assert not any(i == op or i.startswith(op + ".") for i in loom_imports for op in ops), name


MAX_FUNCTION_LINES = 100


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Source lines of a function's body, from its first statement after the docstring to its
    last line (nested functions count towards the function that holds them)."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def _long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, line, body lines) of every function in `source` whose body exceeds `limit` lines."""
    return [(n.name, n.lineno, _body_lines(n)) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(n) > limit]


def test_no_trainer_function_over_100_lines():
    long = [f"{path.relative_to(REPO)}:{line} {name} ({n} lines)" for path in sorted((REPO / "trainer").rglob("*.py"))
            for name, line, n in _long_functions(path.read_text())]
    assert not long, long


def test_long_function_finder_finds_long_functions():
    """Negative control for the test above: the docstring does not count, the body does."""
    doc = '    """' + "\n" * 50 + '    """\n'
    short = "def f():\n" + doc + "    x = 1\n" * 100
    assert _long_functions(short) == []
    assert _long_functions(short + "    x = 1\n") == [("f", 1, 101)]
    nested = "class C:\n    def m(self):\n" + "        y = 2\n" * 101
    assert _long_functions(nested) == [("m", 2, 101)]


def test_layers_import_one_way():
    mods = _modules()
    for name, path in mods.items():
        imported = _imports(name, path)
        if not name.startswith("loom.trainer"):
            assert not any(i.startswith("loom.trainer") for i in imported), f"{name} imports the trainer"
        if name.startswith("loom.models"):
            assert not any(i.startswith(("torch.distributed", "loom.kernels.context_parallel")) for i in imported), \
                f"{name} imports torch.distributed or the context-parallel ops"
        if name == "loom.trainer.distributed.dist":
            assert {i.split(".")[0] for i in imported} <= {"torch", "sys", "dataclasses", "typing", "__future__"}, \
                imported


def test_mixers_have_no_context_parallel_branch():
    for path in sorted((REPO / "models" / "mixers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.If, ast.IfExp)):
                tested = {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
                assert not {"cp", "sharding"} & tested, f"{path.name}:{node.lineno} branches on ctx.cp"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_bare_top_level_imports(folder):
    """Code imports `loom.trainer`, never `trainer` (which would need the repo on sys.path)."""
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in FOLDERS for n in names), f"{path}:{node.lineno} imports {names}"
