"""The `mamba2` mixer's own accounting and options: the mixing FLOPs it reports equal the
matmul FLOPs the chunked op runs (torch's FlopCounterMode); the decoding state's bytes are
what forward returns and do not grow with T; impl= forces the op's backend (the reference
gives the same result); bad options fail naming the key. ~2 s."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loom.kernels import dispatch
from loom.models import HybridLM, ModelConfig
from loom.models.config import ConfigError
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

OPTS = dict(d_state=8, head_dim=16, n_groups=2, chunk=8, d_conv=4)


def _mixer(**opts):
    torch.manual_seed(0)
    cls = MIXERS["mamba2"]
    m = cls(MixerDims(32, 2, 2, 16, 0, 1, RopeConfig()), cls.Config(**{**OPTS, **opts}))
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    m.reset_parameters()
    return m


def test_mixing_flops_are_the_ops_matmul_flops():
    from loom.kernels.ssd import ssd

    m = _mixer()
    T, H, P, G, N = 64, m.n_heads, 16, 2, 8
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, T, H, P, generator=g), torch.randn(1, T, H, generator=g), -torch.ones(H),
            torch.randn(1, T, G, N, generator=g), torch.randn(1, T, G, N, generator=g))
    with FlopCounterMode(display=False) as counter:
        ssd(*args, chunk=8, impl="chunked")
    assert counter.get_total_flops() == m.mixing_flops_per_token(T) * T


def test_state_bytes_match_the_state_and_stay_flat():
    m = _mixer()
    x = torch.randn(2, 19, 32)
    _, state = m(x, SeqContext(position_ids=torch.arange(19).expand(2, 19), want_state=True))
    per_row = state["ssm"][0].numel() * state["ssm"].element_size() + state["conv"][0].numel() * 2
    assert state["ssm"].dtype == torch.float32
    assert m.state_bytes(19) == m.state_bytes(1 << 20) == per_row


def test_impl_reference_equals_auto():
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    ctx = SeqContext(position_ids=torch.cat([torch.arange(9), torch.arange(12)]).expand(2, 21))
    auto = _mixer().double()(x, ctx)[0]
    dispatch.reset()
    ref = _mixer(impl="reference").double()(x, ctx)[0]
    assert dispatch.chosen()["ssd"] == ["reference"]
    torch.testing.assert_close(ref, auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("opts", "match"), [
    ({"n_groups": 3, "head_dim": 16}, "n_groups = 3 must divide the 4 heads"),
    ({"dt_limit": [0.5, 0.1]}, "model.mixers.mamba2: dt_limit must be"),
    ({"head_dim": 24}, "expand \\* d_model = 64 is not a multiple of head_dim = 24"),
    ({"d_stat": 8}, "unknown key 'model.mixers.mamba2.d_stat' \\(did you mean 'd_state'"),
])
def test_bad_options_fail_naming_the_key(opts, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        HybridLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, layers=["mamba2"], mixers={"mamba2": opts}))
