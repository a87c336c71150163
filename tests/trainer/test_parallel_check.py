"""Start-up checks of context-parallel support (trainer/distributed/parallel_check.py):
unsupported mixers and cp implementations, chunked mixers whose chunks a cp
split would cut, and Ulysses' head rule, each a one-line ConfigError naming
the layer. In-process, about a second."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from loom.models import HybridLM, ModelConfig
from loom.models.config import ConfigError
from loom.models.mixers import Mixer
from loom.trainer.config import RunConfig
from loom.trainer.distributed.parallel_check import check_cp_support, supported_cp_impls


class Chunked(Mixer):  # a stand-in, never registered: chunks of 16 tokens must stay on one rank
    cp_impls = ("ring",)

    def cp_chunk_tokens(self) -> int:
        return 16


class Subclass(Chunked):  # declares nothing itself, so supports nothing
    pass


def run_config(cp: int, impl: str = "ring", seq_len: int = 128, n_heads: int = 4, n_kv: int = 2) -> RunConfig:
    cfg = RunConfig()
    cfg.parallel = replace(cfg.parallel, cp=cp, cp_impl=impl)
    cfg.data = replace(cfg.data, seq_len=seq_len)
    cfg.model = ModelConfig(vocab_size=64, d_model=32, n_heads=n_heads, n_kv_heads=n_kv, layers=["attn", "x2"])
    return cfg


def fake_model(*mixers) -> SimpleNamespace:
    return SimpleNamespace(blocks=[SimpleNamespace(kind=type(m).__name__.lower(), mixer=m) for m in mixers])


def attn_model(cfg) -> HybridLM:
    return HybridLM(cfg.model)


def test_attention_supports_both_implementations():
    for impl in ("ring", "ulysses"):
        cfg = run_config(2, impl)
        check_cp_support(attn_model(cfg), cfg)


def test_support_is_declared_per_class_not_inherited():
    assert supported_cp_impls(Chunked(None, None)) == ("ring",)
    assert supported_cp_impls(Subclass(None, None)) == ()
    cfg = run_config(2)
    with pytest.raises(ConfigError) as e:
        check_cp_support(fake_model(Chunked(None, None), Subclass(None, None)), cfg)
    assert str(e.value) == ("model.layers[1] (subclass) cannot run with parallel.cp=2 and parallel.cp_impl=ring: "
                            "it has no context-parallel implementation yet; use parallel.cp=1")


def test_unsupported_implementation_names_the_supported_one():
    with pytest.raises(ConfigError, match=r"model.layers\[0\] \(chunked\).*it supports parallel.cp_impl=ring"):
        check_cp_support(fake_model(Chunked(None, None)), run_config(2, "ulysses"))


def test_chunks_must_not_straddle_ranks():
    check_cp_support(fake_model(Chunked(None, None)), run_config(2, seq_len=64))  # pieces of 16
    with pytest.raises(ConfigError, match=r"chunks of 16 tokens.*pieces of 8; pick data.seq_len as a multiple of 128"):
        check_cp_support(fake_model(Chunked(None, None)), run_config(4, seq_len=64))


def test_ulysses_head_rule_is_checked_at_start_up():
    cfg = run_config(4, "ulysses", n_heads=6, n_kv=2)  # H % cp != 0
    with pytest.raises(ConfigError, match=r"model.layers\[0\] \(attn\) cannot run parallel.cp_impl=ulysses at "
                                          r"parallel.cp=4: .*use parallel.cp_impl=ring"):
        check_cp_support(attn_model(cfg), cfg)


def test_cp_one_checks_nothing():
    check_cp_support(fake_model(Subclass(None, None)), run_config(1))
