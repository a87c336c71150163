"""The lm-eval-harness model `loom`, run offline on local tasks.

tests/trainer/lm_eval_tasks/ holds three task YAMLs over local jsonl files: a
multiple-choice task (loglikelihood requests), a generation task
(generate_until, stopping at "\\n" or ".") and a perplexity task
(loglikelihood_rolling). lm_eval.simple_evaluate runs them on fabricated runs
(random weights, no training) and every per-sample result is compared with a
direct computation from HybridLM: the sum of log-softmax scores of the
continuation's tokens after [bos] + context, greedy decoding cut at the first
stop string, and the whole text scored after bos. Batching (right padding)
must not change a score, for attention and for every recurrent mixer. The
exported folders (Llama, and a hybrid through trust_remote_code) under
lm_eval's own `hf` model score the same.
The command-line tests (python -m loom.trainer.eval.lm_eval_model: a local run, and
a bad checkpoint as one `error:` line) are marked slow.
Cost: ~25 s on one CPU core, most of it importing lm_eval.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from loom.trainer.data import ByteTokenizer  # noqa: E402
from loom.trainer.eval.lm_eval_model import LoomLM  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
ATTN = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "layers": ["attn", "x2"]}
BYTE = ByteTokenizer()


def local_tasks(tmp_path: Path) -> TaskManager:
    """The shipped task YAMLs with absolute data paths and a datasets cache under tmp_path."""
    folder = tmp_path / "tasks"
    folder.mkdir(parents=True)
    for name in ("loom_mc", "loom_gen", "loom_ppl"):
        task = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        files = task["dataset_kwargs"]["data_files"]
        task["dataset_kwargs"] = {"data_files": {k: str(TASKS / v) for k, v in files.items()},
                                  "cache_dir": str(tmp_path / "hf-datasets")}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return TaskManager(include_path=str(folder), include_defaults=False)  # indexing lm_eval's own tasks takes ~15 s


def evaluate(lm, tmp_path, tasks=("loom_mc", "loom_gen", "loom_ppl")):
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=local_tasks(tmp_path),
                                   log_samples=True, verbosity="ERROR")


def args_of(sample) -> list[tuple]:
    """The request arguments of one logged sample, as tuples."""
    args = sample["arguments"]
    if isinstance(args, dict):  # serialised form {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
        return [tuple(a.values()) for a in args.values()]
    return [tuple(a) for a in args]


@torch.no_grad()
def direct_loglikelihood(model, context: str, continuation: str) -> float:
    ctx = [BYTE.bos_id] + BYTE.encode(context)
    ids = torch.tensor([ctx + BYTE.encode(continuation)])
    logp = F.log_softmax(model.logits(model(ids).hidden)[0, :-1], dim=-1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][len(ctx) - 1:].sum())


@torch.no_grad()
def direct_generation(model, context: str, until: list[str], max_new: int) -> str:
    ids = torch.tensor([[BYTE.bos_id] + BYTE.encode(context)])
    new = model.generate(ids, max_new, eos_id=BYTE.eos_id)[0, ids.shape[1]:].tolist()
    if BYTE.eos_id in new:
        new = new[:new.index(BYTE.eos_id)]
    text = BYTE.decode(new)
    for u in until:
        text = text.split(u)[0]
    return text


def check_against_direct(model, results):
    samples = results["samples"]
    n = 0
    for sample in samples["loom_mc"]:
        for (context, continuation), resp in zip(args_of(sample), sample["resps"]):
            got = float(resp[0][0])
            want = direct_loglikelihood(model, context, continuation)
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (context, continuation, got, want)
            n += 1
    assert n == 16  # 6 questions, 16 choices
    for sample in samples["loom_gen"]:
        (context, kwargs), = args_of(sample)
        assert sample["resps"][0][0] == direct_generation(model, context, kwargs["until"], kwargs["max_gen_toks"])
    for sample in samples["loom_ppl"]:
        (text,), = args_of(sample)
        got = float(sample["resps"][0][0])
        want = direct_loglikelihood(model, "", text)  # bos, then the whole text (shorter than max_length)
        assert abs(got - want) < 1e-4 * abs(want), (got, want)
    return samples


def test_local_tasks_match_direct_computation(tmp_path, make_run):
    model = make_run(tmp_path / "run", ATTN, seq_len=256)
    lm = LoomLM(checkpoint=str(tmp_path / "run"), batch_size=4)
    results = evaluate(lm, tmp_path)
    check_against_direct(model, results)
    # the reported metrics are computed from those scores
    mc = [max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0])) == s["doc"]["label"]
          for s in results["samples"]["loom_mc"]]
    assert results["results"]["loom_mc"]["acc,none"] == pytest.approx(sum(mc) / len(mc))
    # a sensitive comparison: another run's weights give other scores
    other = make_run(tmp_path / "other", ATTN, seq_len=256, seed=1)
    sample = results["samples"]["loom_mc"][0]
    context, continuation = args_of(sample)[0]
    assert abs(direct_loglikelihood(other, context, continuation) - float(sample["resps"][0][0][0])) > 1e-2


def test_hybrid_model_and_batching(tmp_path, make_run, hybrid_model):
    """Every mixer kind under right-padded batches scores as one request at a time.
    In float64 (both sides): in fp32 the random-weight Titans layers amplify the rounding
    difference between two sequence lengths (another matmul blocking) from ~1e-7 to
    1e-4..1e-3, which hides nothing but makes a tolerance a matter of luck; in fp64 a
    padded row computes exactly what the row alone does."""
    model = make_run(tmp_path / "run", hybrid_model, seq_len=256, std=0.02).double()
    lm = LoomLM(checkpoint=str(tmp_path / "run"), batch_size=5)
    lm.model.double()
    batched = evaluate(lm, tmp_path / "a", ("loom_mc", "loom_gen", "loom_ppl"))
    check_against_direct(model, batched)


def test_rolling_windows_cover_every_token_once(tmp_path, make_run):
    """With max_length below the text length the text is scored in disjoint windows:
    every token once, each window starting from its own context."""
    model = make_run(tmp_path / "run", ATTN, seq_len=256)
    text = json.loads((TASKS / "ppl.jsonl").read_text().splitlines()[0])["text"]
    whole = LoomLM(checkpoint=str(tmp_path / "run"))._loglikelihood_tokens(
        [(None, [BYTE.bos_id], BYTE.encode(text))])[0][0]
    assert whole == pytest.approx(direct_loglikelihood(model, "", text), rel=1e-5)
    lm = LoomLM(checkpoint=str(tmp_path / "run"), max_length=40)

    class Request:
        args = (text,)

    windowed = lm.loglikelihood_rolling([Request()], disable_tqdm=True)[0]
    ids = BYTE.encode(text)
    want, start = 0.0, 0
    with torch.no_grad():
        while start < len(ids):  # lm_eval's windows: predict 40 tokens from the 40 before them
            end = min(start + 40, len(ids))
            ctx = ([BYTE.bos_id] + ids)[max(0, end - 40):start + 1] if start else [BYTE.bos_id]
            inp = torch.tensor([(ctx + ids[start:end])[:-1]])
            logp = F.log_softmax(model.logits(model(inp).hidden)[0], dim=-1)
            tgt = torch.tensor(ids[start:end])
            want += float(logp[-len(tgt):].gather(-1, tgt[:, None]).sum())
            start = end
    assert windowed == pytest.approx(want, rel=1e-5)
    assert abs(windowed - whole) > 1e-3  # shorter contexts score differently


@pytest.mark.parametrize("kind", ["llama", "remote"])
def test_exported_folder_under_lm_eval_hf_model_scores_the_same(tmp_path, make_run, hybrid_model, kind):
    """lm_eval's own `hf` model on the exported folder (native Llama, or the hybrid through
    trust_remote_code) gives the loom model's scores."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from loom.trainer.hf.export import export_hf

    model = ATTN if kind == "llama" else hybrid_model
    make_run(tmp_path / "run", model, seq_len=256, std=0.02)
    out, target = export_hf(tmp_path / "run", tmp_path / f"hf-{kind}")
    assert target == kind
    loom = evaluate(LoomLM(checkpoint=str(tmp_path / "run"), batch_size=4), tmp_path / "a", ("loom_mc",))
    hf = evaluate(HFLM(pretrained=str(out), device="cpu", batch_size=4, add_bos_token=True,
                       trust_remote_code=kind == "remote"), tmp_path / "b", ("loom_mc",))
    for a, b in zip(loom["samples"]["loom_mc"], hf["samples"]["loom_mc"]):
        for ra, rb in zip(a["resps"], b["resps"]):
            assert float(ra[0][0]) == pytest.approx(float(rb[0][0]), abs=1e-4)


def test_sampling_is_refused(tmp_path, make_run):
    make_run(tmp_path / "run", ATTN)
    lm = LoomLM(checkpoint=str(tmp_path / "run"))

    class Request:
        args = ("hello", {"until": ["\n"], "do_sample": True, "temperature": 1.0})

    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Request()], disable_tqdm=True)


@pytest.mark.slow
def test_command_line_runs_local_tasks(tmp_path, make_run):
    """The documented command: lm_eval's CLI with the loom model registered (~30 s)."""
    make_run(tmp_path / "run", ATTN, seq_len=256)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c"),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "loom.trainer.eval.lm_eval_model", "--model", "loom", "--model_args",
                          f"checkpoint={tmp_path / 'run'}", "--tasks", "loom_mc,loom_gen,loom_ppl", "--include_path",
                          str(TASKS), "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                         cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    found = list((tmp_path / "out").rglob("results_*.json"))
    assert len(found) == 1
    results = json.loads(found[0].read_text())["results"]
    assert set(results) == {"loom_mc", "loom_gen", "loom_ppl"}
    assert 0.0 <= results["loom_mc"]["acc,none"] <= 1.0 and math.isfinite(results["loom_ppl"]["bits_per_byte,none"])


def test_bad_checkpoint_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LoomLM(checkpoint=str(tmp_path / "no"))


@pytest.mark.slow
def test_bad_checkpoint_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    """~40 s: lm_eval's command line indexes its own task library first."""
    from loom.trainer.eval.lm_eval_model import main

    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "loom", "--model_args", f"checkpoint={tmp_path / 'no'}",
                                      "--tasks", "loom_mc", "--include_path", str(TASKS)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "no such folder" in err[-1]
    assert not any("Traceback" in line for line in err)
