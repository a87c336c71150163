"""train.tile_blocks (trainer/distributed/tiling.py): every block runs on sequence tiles, each
tile recomputed in backward: swa blocks with a halo of `window` tokens, blocks of
unbounded reach (attention, RAT, Titans, linear attention, Gated DeltaNet) with their mixer's state
carried from tile to tile. Both give the loss and gradients of the untiled model
(float64; packed documents; tiles that do not divide T; every mixer kind; with full
checkpointing and MLP tiling), evaluation and decoding are unchanged, a tile shorter
than the window is refused, MoH (a row-level loss) stays whole, and tiled blocks keep
fewer saved activations."""
import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.models.config import ConfigError
from loom.models.mixers import MIXERS
from loom.trainer.distributed.parallelize import apply_activation_checkpointing
from loom.trainer.distributed.tiling import apply_tile_blocks, apply_tile_mlp

# Structure (chunks, windows, blocks) smaller than the tiles, so both are crossed.
SMALL = {"swa": {"window": 5}, "rat": {"chunk": 4}, "s2": {"block": 4, "local_blocks": 2, "vert_stride": 2},
         "linear": {"block": 8}, "gdn": {"chunk": 8}, "mamba2": {"chunk": 4, "d_state": 8, "head_dim": 16, "n_groups": 2, "d_conv": 3},
         "memory": {"chunk_size": 4}, "titans_mag": {"chunk_size": 4, "window": 7},
         "titans_mac": {"chunk_size": 4, "segment": 8}}


def _model(layers=("swa", "rat", "swa"), window=5, **swa) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=list(layers),
                      mixers={"swa": {"window": window, **swa}, "rat": {"chunk": 4}})
    return HybridLM(cfg).double()


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
def test_tiled_blocks_are_exact(tile, packed, loss_and_grads):
    ids, pos = _batch()
    pos = pos if packed else None
    ref = loss_and_grads(_model(), ids, pos)
    model = _model()
    apply_tile_blocks(model, tile)
    _assert_same(loss_and_grads(model, ids, pos), ref)


@pytest.mark.parametrize("layers", [("swa",) * 4, ("swa", "rat", "swa")])
def test_tiled_blocks_with_checkpointing_and_tile_mlp(layers, loss_and_grads):
    ids, pos = _batch()
    ref = loss_and_grads(_model(layers), ids, pos)
    model = _model(layers)
    apply_activation_checkpointing(model, "full")
    apply_tile_mlp(model, 4)
    apply_tile_blocks(model, 9)
    _assert_same(loss_and_grads(model, ids, pos), ref)


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
def test_tiled_blocks_with_a_conv_are_exact(tile, loss_and_grads):
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
    ref = loss_and_grads(model(), ids, pos)
    tiled = model()
    assert tiled.blocks[0].mixer.reach() == 5 + 2
    apply_tile_blocks(tiled, tile)
    _assert_same(loss_and_grads(tiled, ids, pos), ref)


def _kind_model(kind: str, conv: bool) -> HybridLM:
    """[kind, swa, kind] at d_model 32, its structure smaller than the tiles; with `conv` the
    attention family's short conv (made to mix neighbours: it starts as the identity)."""
    opts = {**SMALL.get(kind, {}), **({"conv_size": 3} if conv else {})}
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=[kind, "swa", kind],
                      mixers={kind: opts, **({} if kind == "swa" else {"swa": SMALL["swa"]})})
    model = HybridLM(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            if conv and getattr(block.mixer, "conv", None) is not None:
                block.mixer.conv.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("kind", sorted(MIXERS) + ["attn+conv", "s2+conv"])
@pytest.mark.parametrize("tile", [8, 13])
def test_state_carrying_tiles_are_exact(kind, tile, loss_and_grads):
    """Blocks of unbounded reach run tile by tile with their state carried: the same loss and
    gradients as untiled, with packed documents that cross the tiles' boundaries."""
    kind, _, conv = kind.partition("+")
    ids, pos = _batch()
    seq = torch.cat([torch.zeros(17), torch.ones(3), torch.full((ids.shape[1] - 20,), 2)]).long().expand(2, -1)
    ref = loss_and_grads(_kind_model(kind, bool(conv)), ids, pos, seq)
    model = _kind_model(kind, bool(conv))
    apply_tile_blocks(model, tile)
    assert "forward" in vars(model.blocks[0])  # the block is tiled, not left whole
    _assert_same(loss_and_grads(model, ids, pos, seq), ref)


def test_kept_states_are_bounded_and_the_rest_regenerated(loss_and_grads):
    """With many tiles, attention's states (the keys and values so far) outgrow the block's
    input: only every 2^k-th tile's start state is kept (k up to log2 sqrt(tiles)), and
    backward regenerates the others from the last kept one. Still exact."""
    from loom.kernels.context_parallel.chain import StateChain
    from loom.trainer.distributed.tiling import _carry_fn, _run_carried, _tile_plan

    def model():
        torch.manual_seed(0)
        return HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=["attn", "rat", "attn"],
                                    mixers={"rat": SMALL["rat"]})).double()

    ids, pos = _batch()
    seq = torch.cat([torch.zeros(17), torch.ones(3), torch.full((ids.shape[1] - 20,), 2)]).long().expand(2, -1)
    m = model()
    keep = {}
    with torch.no_grad():
        x = m.embed(ids)
        chain = StateChain(x.shape[1])
        _run_carried(_carry_fn(m.blocks[0]), x, pos, seq, _tile_plan(chain, 3), chain, keep)
    assert sorted(keep) == [0, 4, 8, 12]  # 14 tiles: every 4th (the power of two >= sqrt(14))
    ref = loss_and_grads(model(), ids, pos, seq)
    tiled = model()
    apply_tile_blocks(tiled, 3)
    _assert_same(loss_and_grads(tiled, ids, pos, seq), ref)


def test_carried_state_must_be_a_pytree():
    from loom.trainer.distributed.tiling import _state_input

    class Opaque:
        pass

    with pytest.raises(TypeError, match="pytree"):
        _state_input({"k": torch.zeros(1), "other": Opaque()})


@pytest.mark.parametrize("layers", [("swa",), ("attn",), ("rat",)])
def test_moh_is_left_whole(layers):
    """MoH's load-balancing loss is a mean over the whole row: its blocks are not tiled."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, layers=list(layers) * 2,
                      mixers={layers[0]: {"moh": True, "moh_shared": 1, **SMALL.get(layers[0], {})}})
    model = HybridLM(cfg).double()
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


@pytest.mark.parametrize("layers", [("swa",) * 2, ("rat", "swa")])
def test_tiled_blocks_save_less(layers):
    ids, _ = _batch(96)
    plain = _model(layers)
    apply_activation_checkpointing(plain, "full")
    tiled = _model(layers)
    apply_tile_blocks(tiled, 16)
    # both keep each block's input; the tiled final norm keeps no output of its own
    assert _saved_elements(tiled, ids) < _saved_elements(plain, ids)


def test_tile_blocks_through_the_cli(tmp_path):
    """A hybrid ([rat, swa], packed stdlib documents, 96-token rows) trained through the real
    CLI with train.tile_blocks=32 logs the losses and gradient norms of the untiled run."""
    from pathlib import Path

    from loom.trainer.cli import main
    from loom.trainer.observe.metrics import read_metrics

    from loomtest import TINY as tiny
    logs = []
    for tile in (0, 32):
        out = tmp_path / f"tile{tile}"
        assert main(["train", str(tiny), f"output_dir={out}", "train.steps=3", "train.eval_every=100",
                     "model.layers=[rat,swa]", "model.mixers.swa.window=16", "model.mixers.rat.chunk=8",
                     f"train.tile_blocks={tile}"]) == 0
        logs.append([(r["loss"], r["grad_norm"]) for r in read_metrics(out) if "split" not in r])
    assert len(logs[0]) == 3
    for (loss, norm), (loss_t, norm_t) in zip(*logs):
        assert loss_t == pytest.approx(loss, rel=1e-5) and norm_t == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("layout", [
    dict(layers=["swa", "attn", "swa"], norm_placement="sandwich", norm_zero_centred=True, mlp_kind="geglu",
         embed_scale=5.0),
    dict(layers=["swa", "mlp", "attn", "mlp"], norm_placement="post", norm_weight_fp32=True, block_mlp=False,
         mlp_kind="relu2"),
])
def test_tiled_blocks_are_exact_for_the_family_layouts(layout, loss_and_grads):
    """Sandwich / post norms, MLP-only and mixer-only blocks (models/blocks.py) tile exactly."""
    def build():
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, mixers={"swa": {"window": 5, "qk_norm": True}},
                          **layout)
        model = HybridLM(cfg).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        return model

    ids, pos = _batch()
    ref = loss_and_grads(build(), ids, pos)
    model = build()
    apply_tile_blocks(model, 7)
    apply_tile_mlp(model, 6)
    _assert_same(loss_and_grads(model, ids, pos), ref)
