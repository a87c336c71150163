"""Gated delta rule (Gated DeltaNet; Qwen3.5 / Qwen3-Next / OLMo-hybrid linear layers).

gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, seq_ids=None, cu_seqlens=None,
                 use_qk_l2norm=False, return_state=False, cp=None, impl="auto", chunk=64)

Legend: B batch, T tokens, HK query/key heads, HV value heads (HV % HK == 0), K key dim,
V value dim, N sequences of a varlen batch.

Per value head, with the key-major state S (K, V) (the layout of fla and transformers):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)
(S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t in the paper's (V, K) form).
Value head h reads q/k head h // (HV / HK).

impl: "auto" -> "fla" on CUDA when fla-core is installed, else "chunked" (chunked.py: the
WY / UT chunk form, a loop over chunks only); "reference" runs the token loop of reference.py
(tests); each can be forced, and a forced "fla" without fla-core raises. The choice is announced
once per process (loom.kernels.dispatch, op "gated delta rule").
Under `cp` (a CPContext) the sequence is sharded across ranks (cp.py: each piece's end state is
affine in its start state; the ranks exchange those maps and compose them in global order); the
pieces run on the backend `impl` resolves to (fla's kernel on CUDA), announced with the layout.

Example:
    o, S = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, seq_ids=doc_ids, return_state=True)
    o_next = gated_delta_rule(q1, k1, v1, g1, beta1, use_qk_l2norm=True, initial_state=S)
"""
from __future__ import annotations

import torch

from loom.kernels.backends import have_fla, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from loom.kernels.gated_delta_rule.reference import gated_delta_rule_reference, prepare

__all__ = ["gated_delta_rule", "IMPLS"]
IMPLS = ("auto", "chunked", "fla", "reference")
OP = "gated delta rule"


def _check(q, k, v, g, beta, initial_state, seq_ids, cu_seqlens, chunk) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"gated_delta_rule expects q and k of shape (B, T, HK, K); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, T, HK, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % HK:
        raise ValueError(f"gated_delta_rule expects v of shape (B, T, HV, V) = ({B}, {T}, HV, V) with HV a "
                         f"multiple of HK = {HK}; got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(f"{name} must be (B, T, HV) = ({B}, {T}, {HV}); got {tuple(x.shape)}")
    if T < 1:
        raise ValueError("gated_delta_rule needs at least one token (T >= 1)")
    if seq_ids is not None and cu_seqlens is not None:
        raise ValueError("gated_delta_rule takes seq_ids or cu_seqlens, not both")
    if seq_ids is not None and tuple(seq_ids.shape) != (B, T):
        raise ValueError(f"seq_ids must be (B, T) = ({B}, {T}); got {tuple(seq_ids.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or int(cu_seqlens[0]) != 0 \
                or int(cu_seqlens[-1]) != T or bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must be increasing (N + 1,) offsets from 0 to T = {T} with B = 1; got "
                             f"{tuple(cu_seqlens.shape)} for q {tuple(q.shape)}")
        N = cu_seqlens.shape[0] - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, K, V):
        raise ValueError(f"initial_state must be (N, HV, K, V) = ({N}, {HV}, {K}, {V}); got "
                         f"{tuple(initial_state.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")


def _reset(seq_ids):
    """(B, T) True where a token's document id differs from its predecessor's."""
    if seq_ids is None:
        return None
    return torch.cat([torch.zeros_like(seq_ids[:, :1], dtype=torch.bool), seq_ids[:, 1:] != seq_ids[:, :-1]], 1)


def _padded(cu_seqlens, T: int):
    """Gather plan for varlen -> (N, Tmax) rows: indices (N, Tmax) into T and the valid mask."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    t = torch.arange(int(lens.max()), device=cu_seqlens.device)
    valid = t[None] < lens[:, None]  # (N, Tmax)
    idx = (cu_seqlens[:-1, None] + t[None]).clamp_max(T - 1)
    return idx, valid


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     seq_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                     use_qk_l2norm: bool = False, return_state: bool = False, cp=None, impl: str = "auto",
                     chunk: int = 64):
    """The gated delta rule over a batch of rows (or one varlen row).

    Args:
        q, k: (B, T, HK, K) queries and keys.
        v: (B, T, HV, V) values, HV % HK == 0.
        g: (B, T, HV) log-decay per token and value head (a_t = exp(g_t); g <= 0).
        beta: (B, T, HV) write strength (sigmoid(b) in (0, 1); OLMo-hybrid's 2 sigmoid(b) in (0, 2)).
        scale: multiplies q after the optional l2 norm; None: K^-0.5.
        initial_state: (N, HV, K, V) state before each row (N = B), or before each varlen sequence
            (N = len(cu_seqlens) - 1); with seq_ids it applies to each row's first document only.
        seq_ids: (B, T) int document ids, non-decreasing in a row; a token whose id differs from its
            predecessor's starts a document from a zero state. Under cp: this rank's shard of the
            GLOBAL ids. None: one document per row.
        cu_seqlens: (N + 1,) int offsets of N sequences packed in one row (B = 1), fla's varlen form.
        use_qk_l2norm: divide q and k by their l2 norm (eps 1e-6) inside the op.
        return_state: also return the final state.
        cp: None, or a CPContext: q, k, v, g, beta, seq_ids are this rank's shard (no initial state,
            no cu_seqlens); the returned state is the one after the whole sequence.
        impl: "auto", "chunked", "fla" or "reference" (see the module docstring).
        chunk: tokens per chunk of the chunked form (fla chooses its own).
    Returns:
        o (B, T, HV, V) in v's dtype, and with return_state the final state (N, HV, K, V) in fp32
        (fp64 for fp64 inputs): per row, or per varlen sequence with cu_seqlens.
    """
    _check(q, k, v, g, beta, initial_state, seq_ids, cu_seqlens, chunk)
    if impl not in IMPLS:
        raise ValueError(f"unknown gated_delta_rule impl {impl!r}; choose one of {IMPLS}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    if impl == "auto":
        impl = "fla" if on_gpu(v) and have_fla() else "chunked"
    require(impl != "fla" or have_fla(), "gated_delta_rule", impl,
            "fla-core is not installed (pip install -e '.[gpu]')")
    if cp is not None:
        if initial_state is not None or cu_seqlens is not None:
            raise ValueError("gated_delta_rule under context parallelism takes no initial_state and no cu_seqlens")
        from loom.kernels.gated_delta_rule.cp import cp_gated_delta_rule

        announce(OP, f"{impl} (context-parallel, layout={cp.layout}, cp={cp.world_size})")
        with torch.autocast(device_type=v.device.type, enabled=False):
            o, state = cp_gated_delta_rule(q, k, v, g, beta, cp, scale=scale, seq_ids=seq_ids,
                                           use_qk_l2norm=use_qk_l2norm, chunk=chunk, impl=impl)
        return (o, state) if return_state else o
    announce(OP, impl)
    if impl == "fla":
        from loom.kernels.gated_delta_rule.fla import gated_delta_rule_fla

        o, state = gated_delta_rule_fla(q, k, v, g, beta, scale=scale, initial_state=initial_state, seq_ids=seq_ids,
                                        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, return_state=return_state)
        return (o, state) if return_state else o

    # fp32 (fp64) inside whatever autocast is in force: it would run the state's matmuls in bf16
    with torch.autocast(device_type=v.device.type, enabled=False):
        o, state = _cpu(q, k, v, g, beta, scale, initial_state, seq_ids, cu_seqlens, use_qk_l2norm, impl, chunk)
    return (o, state) if return_state else o


def _cpu(q, k, v, g, beta, scale, initial_state, seq_ids, cu_seqlens, use_qk_l2norm, impl, chunk):
    """The reference and chunked paths (any device), varlen rows padded into a batch."""
    T = q.shape[1]
    reset = _reset(seq_ids)
    if cu_seqlens is not None:  # one row per sequence, end-padded with beta = g = 0 (the state stays exact)
        idx, valid = _padded(cu_seqlens, T)
        m = valid[..., None]
        q, k, v = (torch.where(m[..., None], x[0][idx], 0) for x in (q, k, v))  # (N, Tmax, H, X)
        g, beta = (torch.where(m, x[0][idx], 0) for x in (g, beta))  # (N, Tmax, HV)
    if impl == "reference":
        o, state = gated_delta_rule_reference(q, k, v, g, beta, scale=scale, reset=reset,
                                              initial_state=initial_state, use_qk_l2norm=use_qk_l2norm)
    else:
        qq, kk, vv, gg, bb = prepare(q, k, v, g, beta, scale, use_qk_l2norm)
        o, state = gated_delta_rule_chunked(qq, kk, vv, gg, bb, reset=reset, initial_state=initial_state, chunk=chunk)
        o = o.to(v.dtype)
    if cu_seqlens is not None:
        o = o[valid][None]  # (1, T, HV, V) in the packed order
    return o, state
