"""train.tile_blocks (trainer/parallelize.py): swa blocks run on sequence tiles with
a halo of `window` tokens, each tile recomputed in backward, give the loss and
gradients of the untiled model (float64; packed documents; tiles that do not
divide T; a hybrid whose rat layer stays whole; with full checkpointing and MLP
tiling), evaluation and decoding are unchanged, a tile shorter than the window
is refused, and a tiled swa block keeps fewer saved activations."""
import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.models.config import ConfigError
from loom.trainer.parallelize import apply_activation_checkpointing, apply_tile_blocks, apply_tile_mlp


def _model(layers=("swa", "rat", "swa"), window=5, **swa) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=list(layers),
                      mixers={"swa": {"window": window, **swa}, "rat": {"chunk": 4}})
    return HybridLM(cfg).double()


def _step(model, ids, pos):
    out = model(ids, position_ids=pos)
    loss = model.loss(out.hidden, ids.roll(-1, 1)) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _batch(T=41):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, T), generator=g)
    pos = torch.cat([torch.arange(17), torch.arange(3), torch.arange(T - 20)]).expand(2, -1)
    return ids, pos


def _assert_same(a, b):
    """Loss to fp64 rounding. Gradients to fp32 rounding: RMSNorm computes in fp32 even in an
    fp64 model, and the halo rows' gradient is summed over two tiles, in another order than
    untiled; a last-bit fp64 difference can flip an fp32 rounding (6e-8 relative), which
    then travels through the rest of the backward. A real error would be O(1) relative."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    for name, g in b[1].items():
        torch.testing.assert_close(a[1][name], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("tile", [5, 7, 16, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_tiled_blocks_are_exact(tile, packed):
    ids, pos = _batch()
    pos = pos if packed else None
    ref = _step(_model(), ids, pos)
    model = _model()
    apply_tile_blocks(model, tile)
    _assert_same(_step(model, ids, pos), ref)


@pytest.mark.parametrize("layers", [("swa",) * 4, ("swa", "rat", "swa")])
def test_tiled_blocks_with_checkpointing_and_tile_mlp(layers):
    ids, pos = _batch()
    ref = _step(_model(layers), ids, pos)
    model = _model(layers)
    apply_activation_checkpointing(model, "full")
    apply_tile_mlp(model, 4)
    apply_tile_blocks(model, 9)
    _assert_same(_step(model, ids, pos), ref)


def test_evaluation_and_decoding_unchanged():
    ids, pos = _batch()
    ref = _model()
    model = _model()
    apply_tile_blocks(model, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos).hidden, ref(ids, position_ids=pos).hidden,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.generate(ids[:, :12], 5), ref.generate(ids[:, :12], 5))


def test_tile_shorter_than_window_is_refused():
    with pytest.raises(ConfigError, match="train.tile_blocks"):
        apply_tile_blocks(_model(window=8), 7)


@pytest.mark.parametrize("tile", [7, 16])
def test_tiled_blocks_with_a_conv_are_exact(tile):
    """swa with conv_size: a tile's halo covers the window plus the conv's taps (reach)."""
    def model():
        m = _model(conv_size=3)
        with torch.no_grad():  # the conv starts as the identity: make it reach back
            for block in m.blocks:
                if getattr(block.mixer, "conv", None) is not None:
                    block.mixer.conv.weight.copy_(torch.linspace(-1, 1, block.mixer.conv.weight.numel())
                                                  .view_as(block.mixer.conv.weight))
        return m

    ids, pos = _batch()
    ref = _step(model(), ids, pos)
    tiled = model()
    assert tiled.blocks[0].mixer.reach() == 5 + 2
    apply_tile_blocks(tiled, tile)
    _assert_same(_step(tiled, ids, pos), ref)


def test_moh_swa_is_left_whole():
    model = _model(moh=True, moh_shared=1)
    apply_tile_blocks(model, 5)
    assert all("forward" not in vars(b) for b in model.blocks)  # only the final norm is tiled


def _saved_elements(model, ids) -> int:
    count = [0]

    def pack(t):
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
        model.loss(out.hidden, ids.roll(-1, 1))
    return count[0]


def test_tiled_blocks_save_less():
    ids, _ = _batch(96)
    plain = _model(("swa",) * 2)
    apply_activation_checkpointing(plain, "full")
    tiled = _model(("swa",) * 2)
    apply_tile_blocks(tiled, 16)
    # both keep each block's input; the tiled final norm keeps no output of its own
    assert _saved_elements(tiled, ids) < _saved_elements(plain, ids)
