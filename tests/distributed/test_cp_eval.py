"""Evaluation and generation under context parallelism against one process.

Multi-process (gloo, CPU, fp64), cp = 2, zigzag layout. A HybridLM built
identically on every rank (attn, swa, linear, rat, memory: every state kind) is
run through loom.trainer.eval.longeval.cp.CPRunner and through the single-process
LocalRunner on the same inputs:
- token_scores: per-token loss and argmax-correct of passkey windows (T = 96)
  equal the single-process ones on every rank;
- prefill_state + decode: the state rebuilt from the gathered per-layer inputs
  gives the same next-token logits as a single-process prefill, and greedy
  generation of 12 tokens from a 53-token prompt (not a multiple of 2*cp) gives
  identical tokens to HybridLM.generate;
- the whole suite (run_suite) on two tasks gives the same results dict;
- check_lengths refuses a length that 2*cp does not divide and one whose
  pieces are not a multiple of rat's chunk, naming the layer.
Cost: one cp=2 group, ~15 s of CPU (default tier); the whole-suite case is `slow`.
"""
from __future__ import annotations


import pytest
import torch

from loom.kernels.context_parallel import CPContext
from loom.models import HybridLM, ModelConfig

import loomtest

VOCAB = 259


def build() -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, d_model=32, n_heads=4, layers=["attn", "swa", "linear", "rat", "memory"],
                      mixers={"swa": {"window": 6}, "linear": {"block": 4}, "rat": {"chunk": 4},
                              "memory": {"chunk_size": 4}})
    return HybridLM(cfg).double().eval()


def run_case(name: str, world: int) -> dict:
    from loom.trainer.data import load_tokenizer
    from loom.trainer.eval.longeval.cp import CPRunner, decode
    from loom.trainer.eval.longeval.suite import LocalRunner, SuiteSpec, _batch, run_suite
    from loom.trainer.eval.longeval.tasks import SuiteTask

    torch.set_default_dtype(torch.float64)
    model = build()
    cp = CPContext.from_group(None, impl="ring", layout="zigzag")
    runner, local = CPRunner(cp, rebuild_chunk=16), LocalRunner()
    tok = load_tokenizer("byte")
    if name == "scores":
        examples = [SuiteTask("passkey", tok, 96, seed=i, depth=0.3).example(0) for i in range(3)]
        batch = _batch(examples)
        with torch.no_grad():
            loss, correct = runner.token_scores(model, batch)
            ref_loss, ref_correct = local.token_scores(model, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
        assert torch.equal(correct, ref_correct)
        return {"mean_loss": float(loss.mean())}
    if name == "generate":
        torch.manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, 53))
        with torch.no_grad():
            state = runner.prefill_state(model, ids[:, :48])
            out = decode(model, ids, ids[:, 48:], state, 1, None)
            ref = model(ids, want_state=True)
            nxt_logits = model.logits(model(ids[:, 48:], state=state).hidden[:, -1])
            torch.testing.assert_close(nxt_logits, model.logits(ref.hidden[:, -1]), rtol=1e-9, atol=1e-9)
            gen = runner.generate(model, ids, 12, None)
            ref_gen = model.generate(ids, 12)
        assert torch.equal(gen, ref_gen), (gen[:, 53:], ref_gen[:, 53:])
        assert out.shape == (2, 54)
        return {"tokens": gen[0, 53:].tolist()}
    if name == "suite":
        spec = SuiteSpec(tasks=["passkey", "niah_single"], lengths=[128], n=2, depths=[0.5], fillers=["repeat"],
                         batch_size=2, position_buckets=4)
        res = run_suite(model, tok, spec, 64, runner, seed=0)
        ref = run_suite(model, tok, spec, 64, local, seed=0)
        res.pop("seconds"), ref.pop("seconds")
        assert res == ref, (res, ref)
        return {"tasks": res["tasks"]}
    if name == "bad_length":
        from loom.trainer.eval.longeval.command import check_lengths

        with pytest.raises(ValueError, match="not divisible by 2 \\* parallel.cp = 4"):
            check_lengths(model, [66], cp)
        with pytest.raises(ValueError, match=r"model.layers\[3\] \(rat\) keeps chunks of 4"):
            check_lengths(model, [40], cp)
        check_lengths(model, [64], cp)
        return {}
    raise ValueError(name)


@pytest.mark.distributed
def test_cp_eval_matches_one_process(tmp_path):
    names = ["scores", "generate", "bad_length"]
    res = loomtest.launch(__file__, 2, names, tmp_path)
    for name in names:
        loomtest.assert_no_errors(res[name])
    assert res["generate"][0]["tokens"] == res["generate"][1]["tokens"]
    assert res["scores"][0]["mean_loss"] == res["scores"][1]["mean_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_cp_suite_matches_one_process(tmp_path):
    res = loomtest.launch(__file__, 2, ["suite"], tmp_path)
    loomtest.assert_no_errors(res["suite"])


if __name__ == "__main__":
    loomtest.worker_main(run_case)
