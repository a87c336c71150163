"""The `gdn` mixer's own accounting and options (the shared contract is test_mixer_contract.py,
the HF parity test_gdn_parity.py): state_bytes equals the bytes of the decoding state it
returns (bf16 model, fp32 recurrent state); mixing_flops_per_token equals the matmul FLOPs that
torch's FlopCounterMode counts in the op plus the triangular solve; `impl` reaches the op
(reference = chunked, announced); the sigmoid2 beta doubles beta; bad head counts fail naming
the option. Cost: ~2 s."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loom.kernels import dispatch
from loom.kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

D = 32


def gdn(**opts):
    torch.manual_seed(0)
    cls = MIXERS["gdn"]
    return cls(MixerDims(D, 4, 4, 8, layer_idx=0, n_layers=2, rope=RopeConfig()), cls.Config(**opts))


def ctx(B, T, **kw):
    return SeqContext(position_ids=torch.arange(T).expand(B, T), **kw)


def test_state_bytes_equal_the_returned_state():
    mixer = gdn(n_k_heads=2, head_v_dim=6).to(torch.bfloat16)
    _, state = mixer(torch.randn(1, 20, D, dtype=torch.bfloat16), ctx(1, 20, want_state=True))
    assert state["conv"].dtype == torch.bfloat16 and state["recurrent"].dtype == torch.float32
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert mixer.state_bytes(20, bytes_per_elem=2) == nbytes == mixer.state_bytes(1 << 20, bytes_per_elem=2)


@pytest.mark.parametrize("T", [64, 256])
def test_flops_per_token_match_the_counted_matmuls(T):
    mixer = gdn(head_v_dim=6, chunk=32)
    H, K, V, C = 4, 8, 6, 32
    q, k = torch.randn(1, T, H, K), torch.randn(1, T, H, K)
    v, g, beta = torch.randn(1, T, H, V), -torch.rand(1, T, H), torch.rand(1, T, H)
    with FlopCounterMode(display=False) as counter:
        gated_delta_rule_chunked(q, k, v, g, beta, chunk=C)
    solve = H * C * (V + K)  # per token: C^2 (V + K) / 2 multiply-adds per chunk of C tokens
    assert counter.get_total_flops() / T + solve == mixer.mixing_flops_per_token(T)


def test_impl_reaches_the_op_and_reference_agrees():
    x = torch.randn(2, 19, D, dtype=torch.float64)
    dispatch.reset()
    y = gdn(chunk=4).double()(x, ctx(2, 19))[0]
    y_ref = gdn(chunk=4, impl="reference").double()(x, ctx(2, 19))[0]
    assert dispatch.chosen()["gated delta rule"] == ["chunked", "reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_sigmoid2_beta_is_twice_sigmoid(monkeypatch):
    seen = {}
    import loom.models.mixers.gdn as mod

    real = mod.gated_delta_rule

    def spy(q, k, v, g, beta, **kw):
        seen.setdefault("beta", []).append(beta)
        return real(q, k, v, g, beta, **kw)

    monkeypatch.setattr(mod, "gated_delta_rule", spy)
    x = torch.randn(1, 7, D)
    gdn()(x, ctx(1, 7))
    gdn(beta="sigmoid2")(x, ctx(1, 7))
    torch.testing.assert_close(seen["beta"][1], 2 * seen["beta"][0])


def test_head_counts_must_divide():
    with pytest.raises(ValueError, match="n_v_heads = 4 must be a multiple of n_k_heads = 3"):
        gdn(n_k_heads=3)


def test_bf16_autocast_error_within_the_token_loops():
    """Under CPU bf16 autocast (projections in bf16, the op in fp32 with autocast off inside) the chunked layer's error
    against the fp64 layer stays within 2x that of the same layer on the token-loop reference,
    for the output and every parameter gradient; no NaN (STYLE.md 6)."""
    x = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pos = torch.cat([torch.arange(30), torch.arange(40)]).expand(2, 70)

    def run(impl, dtype):
        bf16 = dtype == torch.bfloat16
        mixer = gdn(n_k_heads=2, chunk=16, impl=impl).to(torch.float32 if bf16 else torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # casts fp32 matmuls only
            y = mixer(x.to(torch.float32) if bf16 else x, SeqContext(position_ids=pos))[0]
        assert (y.dtype == torch.bfloat16) == bf16  # out_proj ran in bf16
        y.double().pow(2).sum().backward()
        return [y.double()] + [p.grad.double() for p in mixer.parameters()]

    ref = run("reference", torch.float64)
    got, base = run("chunked", torch.bfloat16), run("reference", torch.bfloat16)
    names = ["y"] + [n for n, _ in gdn().named_parameters()]
    for name, r, a, b in zip(names, ref, got, base):
        assert not torch.isnan(a).any(), name
        assert (a - r).abs().max() > 0, f"{name}: no bf16 rounding at all"
        err, base_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * base_err + 2 ** -8 * r.abs().max().item(), f"{name}: chunked {err:.3g}, loop {base_err:.3g}"
