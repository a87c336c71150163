"""RAT: gated linear recurrence inside chunks of L tokens, softmax attention across chunks.

rat(q, k, v, f, position_ids, *, chunk=16, seq_ids=None, cos=None, sin=None, scale=None,
    initial_state=None, return_state=False, return_stats=False, impl="auto", cp=None)

Legend: B batch, T tokens, G q/k groups, H heads (H % G == 0), K head dim,
C cached chunk states.

    q, k:          (B, T, G, K) queries and pre-recurrence keys; tiled to H heads,
                   head h uses group h % G (RAT's grouped q/k).
    v:             (B, T, H, K) values.
    f:             (B, T, H, K) forget-gate logits: g = sigmoid(f), one gate per
                   channel shared by the key and value recurrences.
    position_ids:  (B, T) int64 position inside the document (0 at a document start).
                   Chunk index = position // chunk; the recurrence restarts where
                   position % chunk == 0; the state at position % chunk == chunk - 1
                   is the chunk's final state.
    seq_ids:       (B, T) document ids (optional; a change also starts a document).
    cos, sin:      (B, T, K) RoPE tables evaluated at each token's CHUNK index
                   (position // chunk), applied to q and to the recurrent keys; None: no RoPE.
    scale:         score scale, default K ** -0.5.
    initial_state: a state returned by an earlier call on the same rows (below).
    cp:            None, or a CPContext: every (B, T, ...) argument is this rank's
                   shard and the op runs cp.py (chunk states gathered across
                   ranks); no state or stats in or out.
Returns o (B, T, H, K), then if return_stats a dict of detached (B, T, H) tensors
    "lse" (log-sum-exp of the scores), "local" (attention share of the query's own running
    state) and "first" (share of its document's first chunk state; the own state in chunk 0),
then the state if return_state.

State (dict), for decoding and for passing between context-parallel ranks:
    "k", "v":          (B, C, H, K) chunk-final states of each row's last document
                       (keys after RoPE), right-aligned: the valid ones are the last n;
    "n":               (B,) int64 number of valid chunk states;
    "k_run", "v_run":  (B, H, K) fp32 recurrent state after the last token (keys before RoPE).
It holds about T/L entries per head, where attention's KV cache holds T.

impl: "auto" and "chunked" run chunked.py (the CPU path: log-depth scan plus
block-sparse attention over chunk states); "reference" runs reference.py's
`rat_reference`, the token loop (tests only). GPU backends of the same chunked form: "triton"
(step 1, the gated recurrence, as rat/triton.py's kernel), "flex" (step 3, attention over
chunk states, through FlexAttention: rat/flex.py), "gpu" both (auto on CUDA); forms.py runs them.

Example:
    o, state = rat(q, k, v, f, position_ids, chunk=16, return_state=True)
    o_next = rat(q1, k1, v1, f1, position_ids[:, -1:] + 1, chunk=16, initial_state=state)
"""
from __future__ import annotations

import torch

from loom.kernels.backends import have_flex, have_triton, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.rat.cp import cp_rat, rat_comm_bytes
from loom.kernels.rat.forms import FORMS, run_rat
from loom.kernels.rat.reference import rat_reference

__all__ = ["rat", "rat_reference", "cp_rat", "rat_comm_bytes"]
IMPLS = ("auto",) + FORMS


def _check(q, k, v, f, position_ids, chunk, seq_ids, cos, sin, initial_state) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"rat expects q and k of shape (B, T, G, K); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, G, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[3] != K or v.shape[2] % G:
        raise ValueError(f"rat expects v of shape (B, T, H, K) = ({B}, {T}, H, {K}) with H a multiple of "
                         f"G = {G}; got {tuple(v.shape)}")
    if f.shape != v.shape:
        raise ValueError(f"rat expects f (forget-gate logits) shaped like v {tuple(v.shape)}; got {tuple(f.shape)}")
    if T < 1:
        raise ValueError("rat needs at least one token (T >= 1)")
    if chunk < 1:
        raise ValueError(f"rat chunk must be >= 1; got {chunk}")
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids must be (B, T) = ({B}, {T}); got {tuple(position_ids.shape)}")
    if seq_ids is not None and tuple(seq_ids.shape) != (B, T):
        raise ValueError(f"seq_ids must be (B, T) = ({B}, {T}); got {tuple(seq_ids.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("rat needs both cos and sin, or neither")
    if cos is not None and (tuple(cos.shape) != (B, T, K) or cos.shape != sin.shape):
        raise ValueError(f"cos and sin must be (B, T, K) = ({B}, {T}, {K}); got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if initial_state is not None:
        H = v.shape[2]
        sk = initial_state["k"]
        if sk.dim() != 4 or sk.shape[0] != B or sk.shape[2:] != (H, K) or initial_state["v"].shape != sk.shape:
            raise ValueError(f"initial_state k/v must be (B, C, H, K) = ({B}, C, {H}, {K}); "
                             f"got {tuple(sk.shape)}, {tuple(initial_state['v'].shape)}")
        for name in ("k_run", "v_run"):
            if tuple(initial_state[name].shape) != (B, H, K):
                raise ValueError(f"initial_state {name} must be (B, H, K) = ({B}, {H}, {K}); "
                                 f"got {tuple(initial_state[name].shape)}")
        if tuple(initial_state["n"].shape) != (B,):
            raise ValueError(f"initial_state n must be (B,) = ({B},); got {tuple(initial_state['n'].shape)}")


def rat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, position_ids: torch.Tensor, *,
        chunk: int = 16, seq_ids: torch.Tensor | None = None, cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None, scale: float | None = None, initial_state: dict | None = None,
        return_state: bool = False, return_stats: bool = False, impl: str = "auto", cp=None):
    """RAT attention: a gated recurrence inside chunks of `chunk` tokens, softmax
    attention over the document's chunk-final states.

    Args:
        q, k: (B, T, G, K) queries and pre-recurrence keys (head h uses group h % G).
        v, f: (B, T, H, K) values and forget-gate logits.
        position_ids: (B, T) int64 position inside the document (0 at a document start).
        chunk: L, tokens per chunk.
        seq_ids: (B, T) document ids, or None.
        cos, sin: (B, T, K) RoPE tables at each token's chunk index, or None.
        scale: score scale, default K ** -0.5.
        initial_state: a state dict an earlier call returned (module docstring), or None.
        return_state, return_stats: also return the state / the (B, T, H) diagnostics.
        impl: "auto", "chunked", "gpu", "triton", "flex" or "reference".
        cp: None, or a CPContext (every (B, T, ...) argument is this rank's shard).

    Returns:
        o (B, T, H, K) [, stats dict of (B, T, H)] [, state dict].
    """
    _check(q, k, v, f, position_ids, chunk, seq_ids, cos, sin, initial_state)
    if impl not in IMPLS:
        raise ValueError(f"unknown rat impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "gpu" if on_gpu(q) and have_triton() and have_flex() else "chunked"
    require(impl not in ("gpu", "triton") or have_triton(), "rat", impl, "triton is not installed")
    require(impl not in ("gpu", "flex") or have_flex(), "rat", impl, "this PyTorch has no FlexAttention")
    announce("rat", impl)
    if cp is not None:
        if initial_state is not None or return_state or return_stats:
            raise ValueError("rat under context parallelism takes and returns no state or stats")
        return cp_rat(q, k, v, f, position_ids, cp, chunk=chunk, seq_ids=seq_ids, cos=cos, sin=sin, scale=scale,
                      impl=impl)
    o, stats, state = run_rat(impl, q, k, v, f, position_ids, chunk=chunk, seq_ids=seq_ids, cos=cos, sin=sin,
                              scale=scale, initial_state=initial_state, return_state=return_state,
                              return_stats=return_stats)
    if return_stats:
        stats = {name: x.detach() for name, x in stats.items()}
    out = (o,) + ((stats,) if return_stats else ()) + ((state,) if return_state else ())
    return out[0] if len(out) == 1 else out
