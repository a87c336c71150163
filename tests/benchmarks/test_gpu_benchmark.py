"""benchmarks/gpu.py's plumbing on CPU: without CUDA the command says it needs CUDA and runs
its dry-run (toy sizes), which times each requested mixer at every length with the backends
it announced, measures a recipe's tokens/s and MFU and searches the longest context, and
writes a JSON and a markdown table that agree. Fast tier (~20 s: two mixers, one recipe).
"""
import importlib.util
import json
from pathlib import Path

GPU_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("loom_gpu_benchmark", GPU_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_json_and_markdown(tmp_path, capsys):
    import torch

    gpu = _load()
    cuda = torch.cuda.is_available()  # there, ask for the dry-run explicitly
    gpu.main(["--out", str(tmp_path), "--kinds", "attn", "rat", "--recipes", "rat-swa-125m"] + ["--dry-run"] * cuda)
    printed = capsys.readouterr().out
    assert cuda or "needs CUDA" in printed and "dry-run" in printed
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["mode"] == "dry-run" and res["device"] == "cpu"
    assert [(r["kind"], r["T"]) for r in res["mixers"]] == [(k, T) for k in ("attn", "rat") for T in gpu.DRY["lengths"]]
    for r in res["mixers"]:
        assert isinstance(r["seconds"], float) and r["seconds"] > 0
    assert res["mixers"][0]["backends"] == {"attention": ["sdpa"]}
    assert res["mixers"][-1]["backends"]["rat"] == ["chunked"]
    (model,) = res["models"]
    assert model["recipe"] == "rat-swa-125m" and model["tokens_per_s"] > 0 and 0 < model["mfu"] < 1
    assert res["context"] == [{"recipe": "rat-swa-125m", "longest_T": gpu.DRY["context_max"],
                               "searched_up_to": gpu.DRY["context_max"]}]
    md = (tmp_path / "gpu.md").read_text()
    assert md == gpu.markdown(res)
    assert "| rat |" in md and "| rat-swa-125m | 128 |" in md
