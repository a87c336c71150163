"""A Python started in the checkout's root can use transformers (which imports Hugging Face's
`kernels` package) and loom side by side: the root's kernels/ folder, imported under the bare
name `kernels`, hands the import over to the installed package (kernels/__init__.py).

Each case is a subprocess whose working directory is the repository root with the root first on
sys.path, as `python -c` there has it (~10 s: transformers' import).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_transformers_and_loom_side_by_side_in_the_root():
    pytest.importorskip("kernels", reason="needs Hugging Face's kernels package (the dev extra)")
    code = """
import sys, torch
assert sys.path[0] == '', sys.path[:2]
from transformers import AutoModelForCausalLM, LlamaConfig
m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
import kernels, loom.kernels
assert kernels.CUDAProperties  # the name transformers failed on when the folder shadowed the package
from loom.kernels.attention import attention
print(kernels.__file__)
print(loom.kernels.__file__)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    hf_file, loom_file = r.stdout.split()
    assert Path(loom_file).resolve() == REPO / "kernels" / "__init__.py"
    assert not Path(hf_file).resolve().is_relative_to(REPO / "kernels")


def test_bare_kernels_without_the_package_is_missing_not_the_folder():
    # -S: no site-packages, so no Hugging Face package to hand over to: the bare name is missing,
    # and the folder is not left half-imported in sys.modules
    r = _run("import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
             "    print(e.name, 'kernels' in sys.modules)\n", "-S")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["kernels", "False"]
