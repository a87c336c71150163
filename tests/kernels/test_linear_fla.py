"""linear_attention(impl="fla") (fla-core's chunk_simple_gla) against the chunked op: output,
final state and the gradients of q, k, v, initial state, with packed documents (resets
mid-row and at a row start), an initial state and an awkward length (T = 77).

Skipped without CUDA, and only for that reason: fla-core imports on CPU but its kernels go
through Triton's autotuner, which needs a GPU driver even under TRITON_INTERPRET=1 ("0 active
drivers"), so the parity can only run on a GPU. The mapping itself (decay -> g_gamma, resets ->
cu_seqlens, per-sequence initial/final states) is in kernels/linear/fla.py.
"""
import pytest
import torch

from loom.kernels.linear import linear_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla-core's kernels need a CUDA driver")


def test_fla_matches_chunked_with_documents_and_state():
    pytest.importorskip("fla")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, K, V = 2, 77, 4, 32, 48
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=g) * K ** -0.5 for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=g)
    s0 = torch.randn(B, H, K, V, device="cuda", generator=g)
    decay = torch.linspace(0.01, 0.5, H, device="cuda")
    reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    reset[0, 30] = reset[1, 0] = reset[1, 50] = True
    results = {}
    for impl in ("chunked", "fla"):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, s0)]
        o, st = linear_attention(*inputs[:3], decay, reset=reset, initial_state=inputs[3], return_state=True,
                                 scale=0.5, impl=impl)
        w = torch.randn(o.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        grads = torch.autograd.grad((o * w).sum() + st.sum(), inputs)
        results[impl] = (o, st) + grads
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "ds0"), results["fla"], results["chunked"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3, msg=name)
