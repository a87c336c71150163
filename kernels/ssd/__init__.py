"""Mamba-2's SSD (state space duality): a selective state space with a scalar decay per head.

ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0, inf),
    initial_state=None, doc_starts=None, cu_seqlens=None, return_state=False,
    chunk=64, cp=None, impl="auto")

Legend: B batch, T tokens, H heads, P head dim, G groups (H % G == 0; head h reads
group h // (H / G)), N state size, S sequences of a varlen batch.

    x:             (B, T, H, P) inputs (Mamba-2's x after the conv).
    dt:            (B, T, H) raw step sizes; the op computes dt = softplus(dt + dt_bias)
                   (softplus if dt_softplus), clamped to [dt_limit[0], dt_limit[1]], as
                   Mamba-2 and transformers' torch_forward do.
    A:             (H,) decay rates, negative (Mamba-2: A = -exp(A_log)).
    B, C:          (B, T, G, N) input and output projections of the state, per group.
    D:             (H,) skip: y += D x. None: no skip.
    dt_bias:       (H,) added to dt before the softplus.
    initial_state: (B, H, P, N) the state before each row (decoding, chunked prefill);
                   with cu_seqlens (S, H, P, N), one per sequence.
    doc_starts:    (B, T) bool, True at a document's first token: the state from before
                   it is dropped (at t = 0 that drops initial_state). A per-token flag,
                   so a context-parallel shard of it is exact (the shard of
                   position_ids == 0). None: one document per row.
    cu_seqlens:    (S + 1,) int offsets of S sequences packed in one row (B = 1), the
                   varlen form of fla / mamba_ssm; not with doc_starts.
    chunk:         tokens per chunk of the chunked form.
    cp:            None, or a CPContext: x, dt, B, C, doc_starts are this rank's shard;
                   pieces exchange (transition, offset) pairs (ssd/cp.py); no initial
                   state; the returned state is the whole sequence's.
Returns y (B, T, H, P) [, final state (B, H, P, N) (S, H, P, N with cu_seqlens), fp32,
fp64 for fp64 inputs].

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t    (see reference.py)

impl: "auto" -> "fla" on CUDA when fla-core is installed (fla's chunk_simple_gla, fla.py),
else "chunked" (the SSD chunk algorithm, chunked.py); "reference" runs the token loop of
reference.py (tests only). The choice is announced once (loom.kernels.dispatch). With
cu_seqlens, chunked and reference run each sequence in turn (a loop over sequences).

Example:
    y, h = ssd(x, dt, -torch.exp(A_log), B, C, D=D, dt_bias=dt_bias, doc_starts=pos == 0,
               return_state=True)
    y_next = ssd(x1, dt1, -torch.exp(A_log), B1, C1, D=D, dt_bias=dt_bias, initial_state=h)
"""
from __future__ import annotations

import torch

from loom.kernels.backends import have_fla, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.ssd.chunked import ssd_chunked
from loom.kernels.ssd.reference import discretize, ssd_reference

__all__ = ["ssd", "discretize"]
IMPLS = ("auto", "chunked", "fla", "reference")


def _check(x, dt, A, B, C, D, dt_bias, initial_state, doc_starts, cu_seqlens, chunk, dt_limit) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd expects x of shape (B, T, H, P); got {tuple(x.shape)}")
    Bt, T, H, P = x.shape
    if T < 1:
        raise ValueError("ssd needs at least one token (T >= 1)")
    if tuple(dt.shape) != (Bt, T, H):
        raise ValueError(f"ssd: dt must be (B, T, H) = ({Bt}, {T}, {H}); got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"ssd: A must be (H,) = ({H},); got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (Bt, T) or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must be (B, T, G, N) with B, T = {Bt}, {T}; got {tuple(B.shape)}, "
                         f"{tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise ValueError(f"ssd: heads H={H} must be a multiple of the groups G={G} (B, C of shape {tuple(B.shape)})")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (H,):
            raise ValueError(f"ssd: {name} must be (H,) = ({H},); got {tuple(t.shape)}")
    if doc_starts is not None and (tuple(doc_starts.shape) != (Bt, T) or doc_starts.dtype != torch.bool):
        raise ValueError(f"ssd: doc_starts must be a bool tensor (B, T) = ({Bt}, {T}); got {doc_starts.dtype} "
                         f"{tuple(doc_starts.shape)}")
    S = Bt
    if cu_seqlens is not None:
        if doc_starts is not None:
            raise ValueError("ssd: pass doc_starts or cu_seqlens, not both")
        if Bt != 1 or cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"ssd: cu_seqlens must be (S + 1,) offsets from 0 to T={T} over a batch of one row; "
                             f"got x {tuple(x.shape)}, cu_seqlens {cu_seqlens.tolist()}")
        if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
            raise ValueError(f"ssd: cu_seqlens must increase strictly; got {cu_seqlens.tolist()}")
        S = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (S, H, P, N):
        what = "(S, H, P, N) per sequence" if cu_seqlens is not None else "(B, H, P, N)"
        raise ValueError(f"ssd: initial_state must be {what} = ({S}, {H}, {P}, {N}); "
                         f"got {tuple(initial_state.shape)}")
    if chunk < 1:
        raise ValueError(f"ssd: chunk must be >= 1; got {chunk}")
    if not 0.0 <= dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"ssd: dt_limit must be (low, high) with 0 <= low <= high; got {tuple(dt_limit)}")


def _backend(impl: str, chunk: int):
    """(x, dt, A, B, C, D, doc_starts, initial_state, return_state) -> (y, state) of one backend."""
    if impl == "chunked":
        return lambda x, dt, A, B, C, D, s, h0, rs: ssd_chunked(x, dt, A, B, C, D=D, starts=s, initial_state=h0,
                                                                return_state=rs, chunk=chunk)
    if impl == "reference":
        return lambda x, dt, A, B, C, D, s, h0, rs: ssd_reference(x, dt, A, B, C, D=D, starts=s, initial_state=h0)
    from loom.kernels.ssd.fla import ssd_fla
    return lambda x, dt, A, B, C, D, s, h0, rs: ssd_fla(x, dt, A, B, C, D=D, doc_starts=s, initial_state=h0,
                                                        return_state=rs)


def _varlen(run, x, dt, A, B, C, D, initial_state, cu_seqlens):
    """Each sequence of a (1, T) varlen row on its own: y (1, T, H, P), states (S, H, P, N)."""
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    h0s = [None] * len(sizes) if initial_state is None else initial_state.unbind(0)
    ys, states = [], []
    # split, not slicing in the loop: each slice's backward would build a full-size gradient
    for x_s, dt_s, B_s, C_s, h0 in zip(*(t.split(sizes, dim=1) for t in (x, dt, B, C)), h0s):
        y, h = run(x_s, dt_s, A, B_s, C_s, D, None, None if h0 is None else h0[None], True)
        ys.append(y)
        states.append(h[0])
    return torch.cat(ys, dim=1), torch.stack(states)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
        D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
        dt_limit: tuple[float, float] = (0.0, float("inf")), initial_state: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
        return_state: bool = False, chunk: int = 64, cp=None, impl: str = "auto"):
    _check(x, dt, A, B, C, D, dt_bias, initial_state, doc_starts, cu_seqlens, chunk, dt_limit)
    if impl not in IMPLS:
        raise ValueError(f"unknown ssd impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "fla" if on_gpu(x) and have_fla() else "chunked"
    require(impl != "fla" or have_fla(), "ssd", impl, "fla-core is not installed (pip install -e '.[gpu]')")
    dt = discretize(dt, dt_bias, dt_softplus, tuple(dt_limit))
    run = _backend(impl, chunk)
    if cp is not None:
        if initial_state is not None or cu_seqlens is not None:
            raise ValueError("ssd under context parallelism takes no initial_state and no cu_seqlens "
                             "(pass doc_starts)")
        from loom.kernels.ssd.cp import cp_ssd

        announce("ssd", f"{impl} (context-parallel, layout={cp.layout}, cp={cp.world_size})")
        def piece(x_, dt_, B_, C_, starts_):  # one piece from a zero state
            return run(x_, dt_, A, B_, C_, D, starts_, None, True)

        y, state = cp_ssd(piece, x, dt, A, B, C, cp, D=D, doc_starts=doc_starts)
        return (y, state) if return_state else y
    announce("ssd", impl)
    if cu_seqlens is not None and impl != "fla":
        y, state = _varlen(run, x, dt, A, B, C, D, initial_state, cu_seqlens)
    elif cu_seqlens is not None:
        from loom.kernels.ssd.fla import ssd_fla
        y, state = ssd_fla(x, dt, A, B, C, D=D, cu_seqlens=cu_seqlens, initial_state=initial_state,
                           return_state=return_state)
    else:
        y, state = run(x, dt, A, B, C, D, doc_starts, initial_state, return_state)
    if not return_state:
        return y
    return y, (state if state.dtype == torch.float64 else state.float())
