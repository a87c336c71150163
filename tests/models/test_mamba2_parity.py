"""The `mamba2` mixer against transformers' own Nemotron-H Mamba-2 mixer (its torch
fallback, NemotronHMamba2Mixer without mamba_ssm / causal-conv1d): a tiny random config,
the weights copied one to one by the HF importer's adapter (trainer/hf/families/nemotron_h.py;
the conv taps flipped: see models/mixers/mamba2.py), the
same output in fp32 with several groups, a dt limit that clamps, conv and projection
biases. Also Loom's decoding state after a prefill continues the sequence exactly. ~2 s."""
import pytest
import torch

from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
from transformers import NemotronHConfig  # noqa: E402

D, H, P, G, N, W = 32, 4, 16, 2, 8, 4


def _pair(bias: bool, limit):
    cfg = NemotronHConfig(hidden_size=D, mamba_num_heads=H, mamba_head_dim=P, n_groups=G, ssm_state_size=N,
                          conv_kernel=W, chunk_size=16, time_step_limit=limit, use_conv_bias=True, use_bias=bias,
                          layer_types=["mamba"], layer_norm_epsilon=1e-5, vocab_size=64)
    torch.manual_seed(0)
    theirs = nemotron.NemotronHMamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        theirs.A_log.copy_(torch.linspace(-1, 1.5, H))
    opts = MIXERS["mamba2"].Config(d_state=N, d_conv=W, head_dim=P, n_heads=H, n_groups=G, chunk=8,
                                   dt_limit=list(limit), bias=bias)
    ours = MIXERS["mamba2"](MixerDims(D, 2, 2, 16, 0, 1, RopeConfig()), opts).eval()
    from loom.trainer.hf.families import NemotronH  # the importer's own mapping (conv taps flipped)

    fam = NemotronH()
    state = fam.tensors_from_hf({f"model.layers.0.mixer.{k}": v for k, v in theirs.state_dict().items()})
    ours.load_state_dict({fam.from_hf(k).removeprefix("blocks.0.mixer."): v for k, v in state.items()}, strict=True)
    return theirs, ours


@pytest.mark.parametrize(("bias", "limit"), [(False, (0.0, float("inf"))), (True, (0.05, 0.8))])
def test_output_equals_transformers_mixer(bias, limit):
    theirs, ours = _pair(bias, limit)
    x = torch.randn(2, 37, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(x)
        got, _ = ours(x, SeqContext(position_ids=torch.arange(37).expand(2, 37)))
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_prefill_then_decode_equals_transformers_full_forward():
    theirs, ours = _pair(False, (0.0, float("inf")))
    x = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(x)
        pos = torch.arange(20)[None]
        y, state = ours(x[:, :11], SeqContext(position_ids=pos[:, :11], want_state=True))
        steps = [y]
        for t in range(11, 20):
            y, state = ours(x[:, t:t + 1], SeqContext(position_ids=pos[:, t:t + 1], want_state=True), state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-4, atol=1e-5)
