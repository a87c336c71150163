"""train.tile_mlp (trainer/distributed/tiling.py): the MLP run on pieces of the sequence,
each recomputed in backward, gives the loss and gradients of the untiled model
(float64, a tile that does not divide T, alone and with full checkpointing);
evaluation is unchanged; the tiled MLP keeps fewer saved activations than the
whole-row MLP (counted with saved-tensor hooks)."""
import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.trainer.distributed.parallelize import apply_activation_checkpointing
from loom.trainer.distributed.tiling import apply_tile_mlp


def _model() -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=["swa", "rat"],
                      mixers={"swa": {"window": 8}, "rat": {"chunk": 4}})
    return HybridLM(cfg).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 40), generator=g)
    pos = torch.cat([torch.arange(17), torch.arange(23)]).expand(2, -1)
    return ids, pos


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_tiled_mlp_is_exact(checkpointing, loss_and_grads):
    ids, pos = _batch()
    ref_loss, ref_grads = loss_and_grads(_model(), ids, pos)
    model = _model()
    apply_activation_checkpointing(model, checkpointing)
    apply_tile_mlp(model, 7)
    loss, grads = loss_and_grads(model, ids, pos)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos).hidden, _model()(ids, position_ids=pos).hidden,
                                   rtol=1e-12, atol=1e-12)


def _saved_elements(model, ids, pos) -> int:
    count = [0]

    def pack(t):
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, position_ids=pos)
        model.loss(out.hidden, ids.roll(-1, 1))
    return count[0]


def test_tiled_mlp_saves_less():
    ids, pos = _batch()
    plain = _model()
    tiled = _model()
    apply_tile_mlp(tiled, 8)
    assert _saved_elements(tiled, ids, pos) < _saved_elements(plain, ids, pos)
