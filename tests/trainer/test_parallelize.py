"""trainer/distributed/parallelize.py: activation checkpointing and compile applied to a built
model from outside.

- full (per block) and selective (the MLP) checkpointing give the same loss and
  gradients as none, in float64, for a hybrid model; parameter names and the
  state dict are unchanged; evaluation and decoding are unaffected;
- selective checkpointing keeps fewer saved activations than none, and full fewer
  than selective (counted with saved-tensor hooks);
- the start-up log names the policy; an unknown mode or engine fails naming the key;
- compile per block equals eager (slow tier: inductor compiles for tens of seconds).
"""
import pytest
import torch

from loom.models import ConfigError, HybridLM, ModelConfig
from loom.trainer.config import load_config
from loom.trainer.distributed.dist import Env
from loom.trainer.distributed.parallelize import apply_activation_checkpointing, apply_compile, build_engine, parallelize

LAYERS = ["attn", "swa", "rat", "linear", "memory"]


def _model(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=LAYERS,
                      mixers={"swa": {"window": 8}, "rat": {"chunk": 4}, "memory": {"chunk_size": 4}})
    return HybridLM(cfg).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)  # two documents per row
    return ids, pos


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_is_exact(mode, loss_and_grads):
    ids, pos = _batch()
    ref_loss, ref_grads = loss_and_grads(_model(), ids, pos)
    model = _model()
    names = list(model.state_dict())
    apply_activation_checkpointing(model, mode)
    loss, grads = loss_and_grads(model, ids, pos)
    assert list(model.state_dict()) == names
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():  # decoding runs the plain forward
        full = model(ids).hidden
        out = model(ids[:, :20], want_state=True)
        step = model(ids[:, 20:], state=out.state).hidden
    torch.testing.assert_close(step, full[:, 20:], rtol=1e-10, atol=1e-10)


def _saved_elements(model, ids, pos) -> int:
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, position_ids=pos)
        model.loss(out.hidden, ids.roll(-1, 1))
    return sum(saved)


def test_checkpointing_saves_less():
    ids, pos = _batch()
    counts = {}
    for mode in ("none", "selective", "full"):
        model = _model()
        apply_activation_checkpointing(model, mode)
        counts[mode] = _saved_elements(model, ids, pos)
    assert counts["full"] < counts["selective"] < counts["none"], counts


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(_model(), "ful")
    with pytest.raises(ConfigError, match="parallel.engine.*fsdp"):
        build_engine("fsdpp", None, None, 1, env=Env())


def test_parallelize_reports_its_policy(capsys, tmp_path):
    tiny = tmp_path / "r.yaml"
    tiny.write_text("model: {d_model: 32, n_heads: 2, layers: [attn]}\n"
                    "train: {activation_checkpointing: selective}\n")
    cfg = load_config(str(tiny), [])
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=["attn"]))
    engine = parallelize(model, cfg, Env())
    assert engine.model is model
    assert "activation checkpointing: selective; compile: off (auto on cpu)" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_per_block_equals_eager(loss_and_grads):
    ids, pos = _batch()
    ref_loss, ref_grads = loss_and_grads(_model().float(), ids, pos)
    model = _model().float()
    apply_compile(model)
    loss, grads = loss_and_grads(model, ids, pos)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
