"""Titans neural long-term memory: an MLP per (batch row, head) trained online by
chunked gradient descent with momentum and weight decay.

neural_memory(q, k, v, theta, eta, alpha, init_weights, *, chunk_size, state=None,
              reset=None, mask=None, activation="gelu", retrieval="chunk", norm_weight=None,
              momentum_step="token", return_state=False, impl="auto", cp=None)
doc_chunks(reset, offset, T, size, mask=None) -> DocChunks: the per-document chunk layout
    the op uses, public for mixers whose segments follow the same grid (MAC).

Legend: B batch, T tokens, H heads, K head dim, E*K the hidden width of a
deep memory. Maths and decisions: README.md in this folder.
"""
from __future__ import annotations

import torch

from loom.kernels.backends import have_triton, on_gpu, require
from loom.kernels.dispatch import announce
from loom.kernels.memory.common import ACTIVATIONS, MemoryState, Weights, mlp_forward
from loom.kernels.memory.cp import cp_neural_memory
from loom.kernels.memory.forms import FORMS, run_memory
from loom.kernels.memory.layout import DocChunks, doc_chunks
from loom.kernels.memory.reference import neural_memory_reference

__all__ = ["neural_memory", "neural_memory_reference", "cp_neural_memory", "MemoryState", "init_memory_weights",
           "RETRIEVALS", "MOMENTUM_STEPS", "IMPLS", "DocChunks", "doc_chunks", "memory_read"]

RETRIEVALS = ("chunk", "token")
MOMENTUM_STEPS = ("token", "chunk")
IMPLS = ("auto",) + FORMS


def init_memory_weights(n_heads: int, head_dim: int, depth: int, expansion: int = 4,
                        dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """Fresh W0 for a memory of `depth` layers: Xavier-uniform (H, D_in, D_out) matrices.

    depth 1: [(H, K, K)]; depth >= 2: [(H, K, E*K), (H, E*K, E*K) ..., (H, E*K, K)]."""
    if depth < 1:
        raise ValueError(f"memory depth must be >= 1; got {depth}")
    sizes = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
    out = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        w = torch.empty(n_heads, d_in, d_out, dtype=dtype, device=device)
        bound = (6.0 / (d_in + d_out)) ** 0.5
        out.append(w.uniform_(-bound, bound))
    return out


def memory_read(weights: Weights, x: torch.Tensor, activation: str = "gelu",
                norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """M_W(x) without any update: weights[l] (B or 1, H, D_in, D_out), x (B, T, H, K) -> (B, T, H, K)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    weights = tuple(w.to(dt) for w in weights)
    norm_weight = None if norm_weight is None else norm_weight.to(dt)
    return mlp_forward(weights, x.to(dt).transpose(1, 2), ACTIVATIONS[activation][0], norm_weight).transpose(1, 2)


def _validate(q, k, v, theta, eta, alpha, init_weights, chunk_size, state, reset, mask, activation,
              retrieval, norm_weight, momentum_step) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"neural_memory expects q, k, v of one shape (B, T, H, K); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("neural_memory needs at least one token (T >= 1)")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must be (B, T, H) = ({B}, {T}, {H}); got {tuple(g.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if len(init_weights) < 1:
        raise ValueError("init_weights must hold at least one (H, D_in, D_out) matrix")
    d_prev = K
    for l, w in enumerate(init_weights):
        if w.dim() != 3 or w.shape[0] != H or w.shape[1] != d_prev:
            raise ValueError(f"init_weights[{l}] must be (H, D_in, D_out) with H = {H}, D_in = {d_prev}; "
                             f"got {tuple(w.shape)}")
        d_prev = w.shape[2]
    if d_prev != K:
        raise ValueError(f"the last memory matrix must map to K = {K}; got init_weights[-1] "
                         f"{tuple(init_weights[-1].shape)}")
    if reset is not None and (tuple(reset.shape) != (B, T) or reset.dtype != torch.bool):
        raise ValueError(f"reset must be a (B, T) = ({B}, {T}) bool tensor; got {tuple(reset.shape)} "
                         f"{reset.dtype}")
    if mask is not None:
        if tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a (B, T) = ({B}, {T}) bool tensor; got {tuple(mask.shape)} {mask.dtype}")
        if reset is not None and bool((reset & ~mask).any()):
            raise ValueError("reset is set on a masked-out token; put it on the document's first kept token")
    if norm_weight is not None and tuple(norm_weight.shape) != (H, K):
        raise ValueError(f"norm_weight must be (H, K) = ({H}, {K}); got {tuple(norm_weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown memory activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if retrieval not in RETRIEVALS:
        raise ValueError(f"unknown retrieval {retrieval!r}; choose one of {RETRIEVALS}")
    if momentum_step not in MOMENTUM_STEPS:
        raise ValueError(f"unknown momentum_step {momentum_step!r}; choose one of {MOMENTUM_STEPS}")
    if state is not None:
        for name, ws in (("weights", state.weights), ("momentum", state.momentum), ("base", state.base)):
            if len(ws) != len(init_weights):
                raise ValueError(f"state.{name} has {len(ws)} matrices, init_weights {len(init_weights)}")
            for l, (w, w0) in enumerate(zip(ws, init_weights)):
                if tuple(w.shape) != (B, *w0.shape):
                    raise ValueError(f"state.{name}[{l}] must be (B, H, D_in, D_out) = "
                                     f"{(B, *w0.shape)}; got {tuple(w.shape)}")
        if tuple(state.offset.shape) != (B,):
            raise ValueError(f"state.offset must be (B,) = ({B},); got {tuple(state.offset.shape)}")
        if bool(((state.offset < 0) | (state.offset >= chunk_size)).any()):
            raise ValueError(f"state.offset must lie in [0, chunk_size = {chunk_size}); got "
                             f"{state.offset.tolist()}")


def neural_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                  eta: torch.Tensor, alpha: torch.Tensor, init_weights: Weights, *, chunk_size: int,
                  state: MemoryState | None = None, reset: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, activation: str = "gelu", retrieval: str = "chunk",
                  norm_weight: torch.Tensor | None = None, momentum_step: str = "token",
                  return_state: bool = False, impl: str = "auto", cp=None):
    """Store (k, v) pairs in a neural memory by online gradient descent and read it with q.

    Per (batch row, head), the memory M_W is an MLP with weights W (depth =
    len(init_weights); z = x @ W_l, act between layers, no biases, no
    residual), optionally with an RMS-normalised output. Tokens are split into chunks of
    `chunk_size` on a grid that restarts at every reset; all gradients of a
    chunk are taken at its start weights G:

        u_t = d/dW sum_K (M_W(k_t) - v_t)^2 at W = G
        S_t = eta_t S_{t-1} - theta_t u_t
        W_t = (1 - alpha_t) W_{t-1} + S_t
        y_t = M_G(q_t)        retrieval="chunk" (chunk size 1: read before write)
        y_t = M_{W_t}(q_t)    retrieval="token" (read after write, the paper's rule)

    With momentum_step="chunk", momentum and decay step once per chunk instead, at
    its first token t0, with that token's gates, and each gradient then enters both:
        S <- eta_t0 S,  W <- (1 - alpha_t0) W + S            (at t0)
        S_t = S_{t-1} - theta_t u_t,  W_t = W_{t-1} - theta_t u_t
    titans-pytorch's rule (chunk-level momentum and decay), and half the chunk-end
    work; the eta and alpha of a chunk's other tokens are unused. Chunk size 1: the same.

    Args:
        q, k, v: (B, T, H, K) queries, keys, values.
        theta, eta, alpha: (B, T, H) learning rate (already scaled), momentum
            and forget gates, each in (0, 1).
        init_weights: the learned W0, a sequence of (H, D_in, D_out) tensors
            (depth 1: [(H, K, K)]; depth 2: [(H, K, E*K), (H, E*K, K)]).
        chunk_size: tokens per chunk (the inner mini-batch).
        state: MemoryState carried from a previous call (W, S, chunk-start
            weights and the offset inside the current chunk), or None for
            W = W0, S = 0 in every row. Splitting a sequence at any token and
            carrying the state gives exactly the result of the whole.
        reset: (B, T) bool, True at document starts: W <- W0 and S <- 0 before
            that token, and a new chunk begins there.
        mask: (B, T) bool or None; tokens with False are skipped as if absent
            (no update, no place in a chunk) and get y = 0. For padding.
        activation: "gelu" (exact erf form) or "silu", between memory layers.
        norm_weight: (H, K) gamma or None. Given, M_W(x) = rmsnorm(MLP_W(x)) * gamma,
            which keeps a deep memory's inner descent stable as its weights grow;
            None is the paper's plain MLP.
        retrieval: "chunk" or "token", see above.
        momentum_step: "token" (the paper's per-token recurrence) or "chunk", see above.
        return_state: also return the final MemoryState.
        impl: "auto" or "chunked" (the eager chunk-parallel form), or "compiled": the same
            code with each block through torch.compile (inductor), same results to
            rounding; opt-in, since the first call of each shape compiles for seconds.
            "triton": the chunked form with memory/triton.py's kernels for the chunk update
            (auto on CUDA): the gradient at the chunk start (depth 1 and 2; deeper memories keep
            its PyTorch form) and the fused chunk-end update. "reference": reference.py's
            `neural_memory_reference`, the token-by-token definition (tests). forms.py runs them.
        cp: None, or a CPContext: every (B, T, ...) argument is this rank's shard;
            the memory state travels rank to rank in global chunk order (cp.py).
            No state in; the returned state is None.

    Returns:
        y (B, T, H, K) in q's dtype [, MemoryState in the compute dtype].

    Example:
        >>> B, T, H, K = 2, 100, 4, 32
        >>> q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> theta, eta, alpha = (torch.rand(B, T, H) for _ in range(3))
        >>> W0 = init_memory_weights(H, K, depth=2)
        >>> y, st = neural_memory(q, k, v, 0.1 * theta, eta, 0.01 * alpha, W0,
        ...                       chunk_size=16, return_state=True)
        >>> y.shape, st.weights[0].shape, int(st.offset[0])
        (torch.Size([2, 100, 4, 32]), torch.Size([2, 4, 32, 128]), 4)
    """
    _validate(q, k, v, theta, eta, alpha, init_weights, chunk_size, state, reset, mask, activation, retrieval,
              norm_weight, momentum_step)
    if impl not in IMPLS:
        raise ValueError(f"unknown neural_memory impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if on_gpu(q) and have_triton() else "chunked"
    require(impl != "triton" or have_triton(), "neural_memory", impl, "triton is not installed")
    # The Triton chunk-start gradient covers depth 1 and 2; deeper memories keep its PyTorch form, said here.
    deep = impl == "triton" and len(init_weights) > 2
    announce("neural memory", "triton (chunk-start gradient in PyTorch: depth > 2)" if deep else impl)
    opts = dict(chunk_size=chunk_size, reset=reset, mask=mask, activation=activation, retrieval=retrieval,
                norm_weight=norm_weight, momentum_step=momentum_step)
    if cp is not None:
        if state is not None:
            raise ValueError("neural_memory under context parallelism starts from W0: it takes no state")
        y = cp_neural_memory(q, k, v, theta, eta, alpha, list(init_weights), cp, impl=impl, **opts)
        return (y, None) if return_state else y
    y, final = run_memory(impl, q, k, v, theta, eta, alpha, init_weights, state=state, **opts)
    return (y, final) if return_state else y
