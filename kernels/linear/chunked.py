"""Block-tiled causal linear attention with decay (Lightning Attention-2 layout): the CPU path.

Legend: B batch, T tokens, H heads, K key dim, V value dim, N blocks, Q block length.

Per head, lambda = exp(-decay). Split the (padded) sequence into N blocks of Q
tokens, with t, j the offsets inside a block and S_{n-1} the state after
block n-1:
    intra  O_n  = [(q_n k_n^T) * M] v_n,     M[t, j] = lambda^(t-j), j <= t, same document
    inter  O_n += (lambda^(t+1) [no reset in 0..t] * q_n) S_{n-1}
    state  S_n  = alpha_n S_{n-1} + U_n,
           U_n  = (lambda^(len_n-1-j) [j in the block's last document] * k_n)^T v_n
           alpha_n = lambda^(len_n) if the block has no reset, else 0
Exponents are never negative, so nothing overflows. len_n = Q except for the
last block, which is zero-padded; using its true length keeps the final
state exact. Everything is a batched matmul over the blocks of a segment (32
blocks) at once, except the scan S_n = alpha_n S_{n-1} + U_n, a loop over
blocks on (B, H, K, V) states.
"""
from __future__ import annotations

import torch


def _blocks(x: torch.Tensor, n: int, Q: int) -> torch.Tensor:
    """(B, T, H, X) -> zero-padded (B, H, N, Q, X)."""
    B, T, H, X = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * Q - T))
    return x.view(B, n, Q, H, X).permute(0, 3, 1, 2, 4)


def _block_terms(k, v, log_lam, reset, T: int, Q: int):
    """Per-block state contributions U (B, H, N, K, V), carries alpha (B, H, N),
    and the in-block segment index seg (B, N, Q)."""
    B, _, H, _ = k.shape
    n = -(-T // Q)
    i = torch.arange(Q, device=k.device)
    r = torch.nn.functional.pad(reset, (0, n * Q - T)).view(B, n, Q)
    seg = r.long().cumsum(-1)  # (B, N, Q) document index inside the block
    length = torch.full((n,), Q, device=k.device)
    length[-1] = T - (n - 1) * Q
    k_exp = (length[:, None] - 1 - i).clamp_min(0)  # (N, Q) steps to the block's last real token
    in_last = (seg == seg[..., -1:])[:, None]  # (B, 1, N, Q): padding shares the last token's segment
    k_fac = torch.exp(log_lam[:, None, None] * k_exp) * in_last  # (B, H, N, Q)
    kb, vb = _blocks(k, n, Q), _blocks(v, n, Q)
    U = torch.matmul((kb * k_fac[..., None]).transpose(-1, -2), vb)  # (B, H, N, K, V)
    alpha = torch.exp(log_lam[:, None] * length) * (seg[..., -1] == 0)[:, None]  # (B, H, N)
    return U, alpha, seg


def _scan_blocks(U, alpha, initial):
    """States before each block, (B, H, N, K, V), and the final state (B, H, K, V)."""
    S = torch.zeros_like(U[:, :, 0]) if initial is None else initial.to(U.dtype)
    before = []
    # unbind, not U[:, :, j]: indexing in a loop makes autograd build one full-size gradient per step
    for U_j, alpha_j in zip(U.unbind(2), alpha[..., None, None].unbind(2)):
        before.append(S)
        S = alpha_j * S + U_j
    return torch.stack(before, dim=2), S


def _segment(q, k, v, log_lam, reset, Q: int, initial):
    """One stretch of whole blocks: o (B, T, H, V) and the state after it."""
    B, T, H, _ = q.shape
    n = -(-T // Q)
    U, alpha, seg = _block_terms(k, v, log_lam, reset, T, Q)
    qb, kb, vb = _blocks(q, n, Q), _blocks(k, n, Q), _blocks(v, n, Q)  # (B, H, N, Q, X)

    i = torch.arange(Q, device=q.device)
    dist = i[:, None] - i[None, :]  # (Q, Q)
    mask = (torch.exp(log_lam[:, None, None] * dist.clamp_min(0)) * (dist >= 0))[:, None]  # (H, 1, Q, Q)
    if bool(reset.any()):
        mask = mask * (seg[..., :, None] == seg[..., None, :])[:, None]  # (B, H, N, Q, Q)
    o = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * mask, vb)  # (B, H, N, Q, V)

    before, final = _scan_blocks(U, alpha, initial)
    q_fac = torch.exp(log_lam[:, None] * (i + 1))[None, :, None, :] * (seg == 0)[:, None]  # (B, H, N, Q)
    o = o + torch.matmul(qb * q_fac[..., None], before)
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * Q, H, -1)[:, :T], final  # (B, T, H, V)


def linear_attention_chunked(q, k, v, decay, *, block: int = 64, reset=None, initial_state=None,
                             return_state: bool = False, scale: float = 1.0, segment_blocks: int = 32):
    """See `loom.kernels.linear.linear_attention`. Returns (o (B, T, H, V), final state or None).

    The sequence is processed `segment_blocks` blocks at a time with the state carried
    (2K tokens for blocks of 64), which keeps the working set in cache: the cost per
    token stays flat up to long contexts instead of growing once tensors outgrow L3."""
    B, T, H, K = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v = (q * scale).to(dt), k.to(dt), v.to(dt)
    log_lam = -decay.to(dt)  # (H,)
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    span = block * segment_blocks
    outs, state = [], initial_state
    # split, not slicing in the loop: each slice's backward would build a full-size gradient
    for q_s, k_s, v_s, r_s in zip(*(x.split(span, dim=1) for x in (q, k, v, reset))):
        o, state = _segment(q_s, k_s, v_s, log_lam, r_s, block, state)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.to(out_dtype), (state if return_state else None)


def linear_attention_state(k, v, decay, *, block: int = 64, reset=None):
    """The final state as an affine function of the initial one: final = carry * S0 + local.
    Returns local (B, H, K, V) and carry (B, H) (lambda^T, or 0 if a document starts)."""
    B, T, H, K = k.shape
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    log_lam = -decay.to(dt)
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=k.device)
    U, alpha, _ = _block_terms(k.to(dt), v.to(dt), log_lam, reset, T, block)
    _, local = _scan_blocks(U, alpha, None)
    return local, alpha.prod(dim=2)
