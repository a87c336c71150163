"""benchmarks/mutations.py's list stays current: every mutation's snippets occur exactly once in
their file (a refactor that moves one makes this fail, so the list is updated with the code), each
mutation changes the file, and each has reference test files to run. The mutations themselves are
not run here (minutes; a developer runs the script before closing an issue)."""
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
mut = runpy.run_path(str(ROOT / "benchmarks" / "mutations.py"), run_name="mutations")


@pytest.mark.parametrize("m", mut["MUTATIONS"], ids=lambda m: m.name)
def test_mutation_applies_and_has_focus_tests(m):
    text = (ROOT / m.path).read_text()
    assert mut["apply"](m, text) != text
    assert m.focus and all((ROOT / f).is_file() for f in m.focus), m.focus


def test_names_are_unique_and_cover_the_issue_26_cases():
    names = [m.name for m in mut["MUTATIONS"]]
    assert len(names) == len(set(names))
    assert {"rat_rope_token_index", "rope_ntk_ignored", "memory_no_key_norm", "rat_swap_forget_output_gate",
            "memory_swap_momentum_forget"} <= set(names)


def test_stale_snippet_is_reported():
    m = mut["Mutation"]("x", "models/rope.py", (("no such text in the file", "y"),), "stale")
    with pytest.raises(LookupError, match="found 0 times"):
        mut["apply"](m, (ROOT / m.path).read_text())
