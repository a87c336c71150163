"""train.tile_blocks under context parallelism (two gloo ranks): a HybridLM whose swa
blocks run on sequence tiles, each local chunk's halo fetched from the rank that holds
it (kernels/context_parallel halo_extend), and whose other blocks carry their mixer's
state from tile to tile and from rank to rank in the sequence's order, equals the
untiled single process (output and parameter gradients; packed documents crossing the
shard boundaries; both layouts)."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from loom.kernels.context_parallel import CPContext, shard_sequence
from loom.models import HybridLM, ModelConfig
from loom.trainer.distributed.parallelize import apply_activation_checkpointing
from loom.trainer.distributed.tiling import apply_tile_blocks

import loomtest

B, T, VOCAB = 2, 48, 50
DOC_LENS = ([5, 17, 1, 3, 22], [30, 18])
FIRST_POS = (0, 7)
# name -> (layout, layers, tile, window)
CASES = {
    "swa_rat_zigzag": ("zigzag", ["swa", "rat", "swa"], 5, 5),
    "swa_contiguous": ("contiguous", ["swa", "swa"], 7, 6),
    "swa_window_past_chunk": ("zigzag", ["swa", "swa"], 13, 13),  # the halo spans more than a zigzag piece
    # blocks of unbounded reach carry their state tile to tile and rank to rank, in sequence order
    "carried_zigzag": ("zigzag", ["rat", "memory", "swa", "attn"], 5, 5),
    "carried_contiguous": ("contiguous", ["linear", "titans_mag", "rat"], 7, 5),
}


def _rows():
    pos, ids = [], []
    for lens, first in zip(DOC_LENS, FIRST_POS):
        pos.append(torch.cat([torch.arange(n) + (first if i == 0 else 0) for i, n in enumerate(lens)]))
        ids.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(pos), torch.stack(ids)


def _model(layers, window):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_heads=2, layers=layers,
                      mixers={"swa": {"window": window}, "rat": {"chunk": 3}, "memory": {"chunk_size": 4},
                              "linear": {"block": 4}, "titans_mag": {"chunk_size": 4, "window": 6}})
    return HybridLM(cfg).double()


def _run_case(name: str, world: int) -> dict:
    layout, layers, tile, window = CASES[name]
    cp = CPContext.from_group(None, impl="ring", layout=layout)
    g = torch.Generator().manual_seed(1234)
    ids_in = torch.randint(0, VOCAB, (B, T), generator=g)
    dy = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    pos, ids = _rows()
    ref = _model(layers, window)
    ref(ids_in, position_ids=pos, seq_ids=ids).hidden.backward(dy)
    model = _model(layers, window)
    apply_activation_checkpointing(model, "full")
    apply_tile_blocks(model, tile)
    y = model(shard_sequence(ids_in, cp), position_ids=shard_sequence(pos, cp), seq_ids=shard_sequence(ids, cp),
              cp=cp).hidden
    y.backward(shard_sequence(dy, cp))
    with torch.no_grad():
        y_ref = shard_sequence(ref(ids_in, position_ids=pos, seq_ids=ids).hidden, cp)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"output: {m}")
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        # fp32 rounding: RMSNorm computes in fp32 (see tests/trainer/test_tile_blocks.py)
        torch.testing.assert_close(grad, r.grad, rtol=1e-6, atol=1e-6 * float(r.grad.abs().max()),
                                   msg=lambda m: f"d{n}: {m}")
    return {}


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    return loomtest.launch(__file__, 2, list(CASES), tmp_path_factory.mktemp("cp2"), timeout_s=300.0)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_blocks_under_cp_equal_single_process(cp2, case):
    loomtest.assert_no_errors(cp2[case])


if __name__ == "__main__":
    loomtest.worker_main(_run_case)
