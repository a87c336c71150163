"""The engine- and world-size-independent optimizer state (trainer/checkpoint/optim_state.py):
name-keyed save/load round trip, the older index-keyed format, and a clear error
when the model does not fit. In-process, under a second."""
from __future__ import annotations

import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.trainer.config import OptimConfig
from loom.trainer.distributed.engine import SingleEngine
from loom.trainer.optim import build_optimizer
from loom.trainer.checkpoint.optim_state import is_named, load_named_state, named_state


def model(layers=("attn", "x2")) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=list(layers)))


def trained(m: HybridLM) -> torch.optim.Optimizer:
    opt = build_optimizer(m, OptimConfig())
    for _ in range(2):
        out = m(torch.randint(0, 64, (2, 12)))
        m.loss(out.hidden, torch.randint(0, 64, (2, 12))).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_round_trip_is_exact_and_keyed_by_name():
    m = model()
    opt = trained(m)
    sd = named_state(m, opt)
    assert is_named(sd) and set(sd["state"]) == {n for n, _ in m.named_parameters()}
    assert sd["param_groups"][1]["weight_decay"] == 0.0 and "embed.weight" in sd["param_groups"][0]["params"]
    fresh = build_optimizer(m, OptimConfig())
    load_named_state(m, fresh, sd)
    a, b = opt.state_dict(), fresh.state_dict()
    for i, s in a["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["state"][i][k])


def test_single_engine_reads_index_keyed_state_of_older_checkpoints():
    m = model()
    opt = trained(m)
    engine = SingleEngine(m, OptimConfig(), total_steps=10)
    tensors = {k: v.clone() for k, v in m.state_dict().items()}
    engine.load_checkpoint_state(tensors, {"optimizer": opt.state_dict(), "scheduler": engine.scheduler.state_dict()})
    assert torch.equal(engine.optimizer.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    _, state = engine.checkpoint_state()
    assert is_named(state["optimizer"])


def test_a_model_that_does_not_fit_is_named():
    m = model()
    sd = named_state(m, trained(m))
    other = model(("attn", "x3"))
    with pytest.raises(ValueError, match=r"parameter 'blocks.2.mixer.q_proj.weight' here, None in the checkpoint"):
        load_named_state(other, build_optimizer(other, OptimConfig()), sd)
