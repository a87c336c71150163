"""The package's shape: one `loom` namespace, layers that import one way, no
import cycles in the trainer, no context-parallel branches in the mixers.

- pyproject.toml lists every subpackage of trainer/, models/, kernels/ (as
  loom.*), and a built wheel holds exactly their modules under loom/ and no
  other top-level name (~15 s: one `pip wheel`);
- imports (module level and inside functions, read from the source): no cycle
  among loom.trainer modules; models/ and kernels/ never import the trainer;
  models/ never imports torch.distributed; loom.trainer.distributed.dist imports only torch;
- models/mixers never import kernels.context_parallel nor test `ctx.sharding`:
  they pass it to their op, which decides.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("trainer", "models", "kernels")


def _modules() -> dict[str, Path]:
    """loom.* module name -> source file, for every .py file of the three folders."""
    out = {}
    for top in FOLDERS:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
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


def _graph() -> dict[str, set[str]]:
    mods = _modules()
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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("loom_lm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"loom"}, tops
    modules = {n for n in names if n.endswith(".py")}
    expected = {"loom/" + str(p.relative_to(REPO)) for p in _modules().values()}
    assert modules == expected, f"missing: {sorted(expected - modules)}; extra: {sorted(modules - expected)}"
    assert "loom/__init__.py" not in names  # a namespace: nothing of its own


def test_trainer_has_no_import_cycle():
    graph = _graph()
    assert _cycle(graph, {m for m in graph if m.startswith("loom.trainer")}) is None


def test_cycle_finder_finds_cycles():
    """Negative control for the test above."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph, set(graph)) == ["a", "b", "c", "a"]


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
                assert "sharding" not in tested, f"{path.name}:{node.lineno} branches on ctx.sharding"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_bare_top_level_imports(folder):
    """Code imports `loom.trainer`, never `trainer` (which would need the repo on sys.path)."""
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in FOLDERS for n in names), f"{path}:{node.lineno} imports {names}"
