"""Fixtures for the trainer tests.

`loss_and_grads(model, ids, pos=None, seq=None)` runs one forward with the next-token
loss and backward, and returns (loss, {name: gradient}): the comparison that the
checkpointing and tiling tests make between a transformed model and the plain one.

For the export and lm-eval tests, a run folder fabricated without training:

`make_run(folder, model={...}, tokenizer="byte")` writes what `loom train`
leaves behind (config.yaml, checkpoints/step-00000005 with manifest) for a
HybridLM whose weights are drawn with std 0.1 (`std`) and norms near 1
(transformers-style zeros and ones would hide a swapped norm or a dropped
bias), and returns the HybridLM in eval mode. At std 0.1 the Titans memory
layers amplify fp32 rounding differences about 100x per layer (a 1e-7 change
of input becomes 1e-3 at the logits after memory + titans_mag + titans_mac);
comparisons of computations with different shapes use std 0.02 for them.
"""
from pathlib import Path

import pytest
import torch

from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.config import config_from_dict, dump
from loom.trainer.data import load_tokenizer
from loom.trainer.train import build_model

def _loss_and_grads(model, ids, pos=None, seq=None):
    out = model(ids, position_ids=pos, seq_ids=seq)
    loss = model.loss(out.hidden, ids.roll(-1, 1)) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def loss_and_grads():
    return _loss_and_grads


HYBRID = {"d_model": 32, "n_heads": 4, "layers": ["attn", "swa", "rat", "s2", "linear", "memory", "titans_mag",
                                                  "titans_mac"],
          "mixers": {"attn": {"gate": "headwise"}, "swa": {"window": 16, "conv_size": 3},
                     "rat": {"chunk": 8, "moh": True, "moh_shared": 2, "moh_topk": 1},
                     "s2": {"block": 8, "local_blocks": 2, "vert_stride": 2}, "memory": {"chunk_size": 8},
                     "titans_mag": {"chunk_size": 8, "window": 16}, "titans_mac": {"chunk_size": 8, "segment": 16}}}


def _make_run(folder, model: dict, tokenizer: str = "byte", seq_len: int = 64, step: int = 5, seed: int = 0,
              std: float = 0.1):
    cfg = config_from_dict({"output_dir": str(folder), "seed": seed, "model": model,
                            "data": {"seq_len": seq_len, "tokenizer": tokenizer}})
    net = build_model(cfg, load_tokenizer(tokenizer))
    gen = torch.Generator().manual_seed(seed + step)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.yaml").write_text(dump(cfg))
    CheckpointManager(folder).save(step, net.state_dict(), {}, {"loss": 1.0})
    return net.eval()


@pytest.fixture
def make_run():
    return _make_run


@pytest.fixture
def hybrid_model() -> dict:
    return dict(HYBRID)
