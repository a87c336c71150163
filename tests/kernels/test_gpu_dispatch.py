"""The GPU rule of every op, exercised on CPU: with the device test (`on_gpu`) answering True,
`impl="auto"` announces each op's GPU backend (attention/swa/s2: flex without flash-attn,
rat: gpu = Triton scan + flex, memory: triton, linear: fla), and that backend's result
equals the op's reference (Triton in the interpreter; FlexAttention through its dense eager
form, since inputs require grad). Forcing a backend whose package is missing fails naming it.
Fast tier (~10 s).
"""
import pytest
import torch

import loom.kernels.attention as attention_mod
import loom.kernels.attention.forms as attention_forms
import loom.kernels.linear as linear_mod
import loom.kernels.memory as memory_mod
import loom.kernels.rat as rat_mod
import loom.kernels.s2 as s2_mod
import loom.kernels.swa as swa_mod
from loom.kernels import dispatch

pytest.importorskip("triton")

B, T, H, K = 2, 19, 2, 16
TOL = dict(rtol=1e-3, atol=1e-4)  # fp32 forms of different summation order; exact parity: test_triton, test_flex


@pytest.fixture
def gpu_rule(monkeypatch):
    for mod in (attention_forms, swa_mod, s2_mod, rat_mod, memory_mod, linear_mod):
        monkeypatch.setattr(mod, "on_gpu", lambda x: True)
    monkeypatch.setattr(attention_forms, "have_flash_attn", lambda: False)
    dispatch.reset()
    yield
    dispatch.reset()


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, generator=g).requires_grad_() for _ in range(3))
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[1, 7:] = 1
    return q, k, v, ids


def _calls():
    q, k, v, ids = _inputs()
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(7), torch.arange(T - 7)])])
    f = torch.randn(B, T, H, K)
    gates = [0.1 * torch.rand(B, T, H) for _ in range(3)]
    w0 = memory_mod.init_memory_weights(H, K, 2, expansion=2)
    return {
        "attention": ("flex", lambda impl: attention_mod.attention(q, k, v, seq_ids=ids, impl=impl)),
        "sliding-window attention": ("flex", lambda impl: swa_mod.sliding_window_attention(
            q, k, v, window=5, seq_ids=ids, impl=impl)),
        "s2 attention": ("flex", lambda impl: s2_mod.s2_attention(
            q, k, v, block=4, local_blocks=2, vert_stride=2, seq_ids=ids, impl=impl)),
        "rat": ("gpu", lambda impl: rat_mod.rat(q, k, v, f, pos, chunk=4, impl=impl)),
        "neural memory": ("triton", lambda impl: memory_mod.neural_memory(
            q, k, v, *gates, w0, chunk_size=4, impl=impl)),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_auto_on_cuda_picks_the_gpu_backend_and_it_matches_the_reference(op, gpu_rule):
    backend, fn = _calls()[op]
    out = fn("auto")
    assert dispatch.chosen()[op] == [backend]
    torch.testing.assert_close(out, fn("reference"), **TOL)


def test_linear_auto_on_cuda_picks_fla_when_installed(gpu_rule, monkeypatch):
    q, k, v, _ = _inputs()
    decay = torch.full((H,), 0.1)
    monkeypatch.setattr(linear_mod, "have_fla", lambda: False)
    linear_mod.linear_attention(q, k, v, decay, impl="auto")
    assert dispatch.chosen()["linear attention"] == ["chunked"]
    with pytest.raises(RuntimeError, match="fla-core is not installed"):
        linear_mod.linear_attention(q, k, v, decay, impl="fla")
    monkeypatch.setattr(linear_mod, "have_fla", lambda: True)
    dispatch.reset()
    # fla's kernels need a GPU driver: stand in for the form runner, record which form auto asked
    # for, and answer with the reference so the output is checked too (no exception swallowed)
    asked = []
    real_run = linear_mod.run_linear

    def fake_run(impl, *args, **kwargs):
        asked.append(impl)
        return real_run("reference" if impl == "fla" else impl, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "run_linear", fake_run)
    out = linear_mod.linear_attention(q, k, v, decay, impl="auto")
    assert asked == ["fla"]
    assert dispatch.chosen()["linear attention"] == ["fla"]
    torch.testing.assert_close(out, linear_mod.linear_attention(q, k, v, decay, impl="reference"), **TOL)


def test_forcing_a_missing_gpu_package_fails_naming_it(monkeypatch):
    q, k, v, _ = _inputs()
    monkeypatch.setattr(rat_mod, "have_triton", lambda: False)
    monkeypatch.setattr(s2_mod, "have_flex", lambda: False)
    f = torch.randn(B, T, H, K)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        rat_mod.rat(q, k, v, f, torch.arange(T).expand(B, T), chunk=4, impl="triton")
    with pytest.raises(RuntimeError, match="no FlexAttention"):
        s2_mod.s2_attention(q, k, v, block=4, local_blocks=2, vert_stride=2, impl="flex")
