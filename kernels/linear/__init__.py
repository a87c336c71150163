"""Lightning-style causal linear attention with per-head decay.

linear_attention(q, k, v, decay, *, block=64, reset=None, initial_state=None,
                 return_state=False, scale=1.0, impl="auto", cp=None)

Legend: B batch, T tokens, H heads, K key dim, V value dim.

    q, k:          (B, T, H, K)
    v:             (B, T, H, V)
    decay:         (H,) rates s_h >= 0; the state decays by lambda_h = exp(-s_h) per token
                   (ALiBi slopes in Lightning Attention / TNL).
    reset:         (B, T) bool, True at a document's first token (position_ids == 0):
                   the state from before it is dropped. None: one document per row.
    initial_state: (B, H, K, V) state after the previous tokens of the same rows.
    scale:         multiplies q (the operator itself has no normalisation).
    cp:            None, or a CPContext: q, k, v, reset are this rank's shard and the
                   ranks combine their states with a prefix scan (cp.py); no initial
                   state; the returned state is the state after the whole sequence.
Returns o (B, T, H, V) [, final state (B, H, K, V) in fp32 (fp64 for fp64 inputs)].

    S_t = lambda * S_{t-1} * (1 - reset_t) + k_t^T v_t,      o_t = scale * q_t S_t

linear_attention_state(k, v, decay, *, block=64, reset=None) -> (local, carry)
    The final state of a sequence as an affine map of its initial state S0:
    final = carry[..., None, None] * S0 + local, local (B, H, K, V), carry (B, H).
    Context parallelism combines ranks with a prefix scan over these pairs:
    (c1, s1) then (c2, s2) = (c1 c2, c2 s1 + s2).

impl: "auto" and "chunked" run chunked.py (block-tiled matmuls, a loop over
T / block blocks for the state); "reference" runs reference.py's
`linear_attention_reference`, the token loop (tests only); "fla" runs fla-core's
chunk_simple_gla (linear/fla.py, the `gpu` extra; auto on CUDA when installed).
forms.py runs them.

Example:
    o, state = linear_attention(q, k, v, slopes, reset=position_ids == 0, return_state=True)
    o_next = linear_attention(q1, k1, v1, slopes, initial_state=state)
"""
from __future__ import annotations

import torch

from loom.kernels.backends import have_fla, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.linear.chunked import linear_attention_state as _state
from loom.kernels.linear.cp import cp_linear_attention
from loom.kernels.linear.forms import FORMS, run_linear
from loom.kernels.linear.reference import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_state", "linear_attention_reference", "alibi_slopes",
           "cp_linear_attention"]
IMPLS = ("auto",) + FORMS


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """(H,) ALiBi slopes: 2^(-8(h+1)/H) for H a power of two; otherwise those of the
    nearest lower power of two followed by every other slope of the next one."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 1 << (n_heads.bit_length() - 1)
    slopes = power_of_two(p)
    if p < n_heads:
        slopes += power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def _check(q, k, v, decay, reset, initial_state, block) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"linear_attention expects q and k of shape (B, T, H, K); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"linear_attention expects v of shape (B, T, H, V) = ({B}, {T}, {H}, V); "
                         f"got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("linear_attention needs at least one token (T >= 1)")
    if tuple(decay.shape) != (H,):
        raise ValueError(f"decay must be (H,) = ({H},); got {tuple(decay.shape)}")
    if reset is not None and (tuple(reset.shape) != (B, T) or reset.dtype != torch.bool):
        raise ValueError(f"reset must be a bool tensor (B, T) = ({B}, {T}); got {reset.dtype} {tuple(reset.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, v.shape[3]):
        raise ValueError(f"initial_state must be (B, H, K, V) = ({B}, {H}, {K}, {v.shape[3]}); "
                         f"got {tuple(initial_state.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                     block: int = 64, reset: torch.Tensor | None = None,
                     initial_state: torch.Tensor | None = None, return_state: bool = False,
                     scale: float = 1.0, impl: str = "auto", cp=None):
    """Causal linear attention with per-head decay: S_t = lambda S_{t-1} (1 - reset_t) + k_t^T v_t,
    o_t = scale * q_t S_t.

    Args:
        q, k: (B, T, H, K) queries and keys.
        v: (B, T, H, V) values.
        decay: (H,) rates s_h >= 0, lambda_h = exp(-s_h).
        block: tokens per block of the chunked form.
        reset: (B, T) bool, True at a document's first token, or None.
        initial_state: (B, H, K, V) state after the previous tokens of the same rows, or None.
        return_state: also return the final state.
        scale: multiplies q.
        impl: "auto", "chunked", "fla" or "reference" (module docstring).
        cp: None, or a CPContext: q, k, v, reset are this rank's (B, L, ...) shard.

    Returns:
        o (B, T, H, V) [, final state (B, H, K, V) fp32 (fp64 for fp64 inputs)].
    """
    _check(q, k, v, decay, reset, initial_state, block)
    if impl not in IMPLS:
        raise ValueError(f"unknown linear_attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "fla" if on_gpu(q) and have_fla() else "chunked"
    require(impl != "fla" or have_fla(), "linear_attention", impl,
            "fla-core is not installed (pip install -e '.[gpu]')")
    announce("linear attention", impl)
    if cp is not None:
        if initial_state is not None:
            raise ValueError("linear_attention under context parallelism takes no initial state")
        o, state = cp_linear_attention(q, k, v, decay, cp, block=block, reset=reset, scale=scale, impl=impl)
    else:
        o, state = run_linear(impl, q, k, v, decay, block=block, reset=reset, initial_state=initial_state,
                              return_state=return_state, scale=scale)
    return (o, state) if return_state else o


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *, block: int = 64,
                           reset: torch.Tensor | None = None):
    """The final state as an affine map of the initial one: final = carry[..., None, None] * S0 + local.

    Args:
        k: (B, T, H, K); v: (B, T, H, V); decay: (H,); block: tokens per block;
        reset: (B, T) bool or None.

    Returns:
        local (B, H, K, V) and carry (B, H), fp32 (fp64 for fp64 inputs).
    """
    _check(k, k, v, decay, reset, None, block)
    return _state(k, v, decay, block=block, reset=reset)
