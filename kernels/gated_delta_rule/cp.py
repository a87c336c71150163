"""Gated delta rule over a sequence sharded across cp ranks: compose the pieces' affine maps.

Legend: B batch, T full length, L = T / cp tokens per rank, HV value heads, K key dim, V value
dim, P tokens of one piece (T / (2 cp) zigzag, T / cp contiguous), n_chunks = T / P pieces in
position order.

The recurrence is linear in (state, values) jointly, so over a piece started from Z_in (K, V)

    Z_t = M_t Z_in + O_t,      o_t = o_t|Z_in=0 + Z_in^T r_t,      r_t = M_t^T (scale q_t)

with M_t (K, K) the product of the tokens' exp(g) (I - beta k k^T), O_t the state from a zero
start. One run of the chunked form computes all of it: values [v, 0] (V + K columns) from the
start state [0, I] give outputs [o|0, r] and the final state [O, M] (each column evolves on its
own). So each rank
  1. runs its pieces that way (`piece_maps`, on the op's backend: the chunked form, or fla's
     kernel on CUDA; a document starting inside a piece zeroes its M);
  2. all-gathers every piece's (O, M) (B HV K (V + K) numbers per piece) and, without
     gradient, the document ids at the pieces' ends;
  3. composes in GLOBAL piece order: Z_in(0) = 0, Z_end(c) = M_c Z_in(c) + O_c, and
     Z_in(c + 1) = Z_end(c) unless piece c + 1 opens with a new document (then 0);
  4. adds Z_in(c)^T r_t to each of its pieces' outputs.
The gather is differentiable (context_parallel/gather.py: its backward reduce-scatters), so
gradients reach the k, v, g and beta of earlier ranks' pieces. Cost: two extra K columns per
value column of the chunked form's work; bytes per rank forward (cp - 1) n_local B HV K (V + K) a
(a = 4, 8 for fp64), the same backward.
"""
from __future__ import annotations

import torch

from loom.kernels.context_parallel.gather import all_gather, all_gather_nograd, depend_on
from loom.kernels.context_parallel.layout import CPContext, check_seq_len, chunk_ranges
from loom.kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from loom.kernels.gated_delta_rule.reference import gated_delta_rule_reference, prepare

__all__ = ["cp_gated_delta_rule", "piece_indices", "piece_maps"]


def piece_indices(T: int, cp: CPContext, rank: int) -> list[int]:
    """Global (position-order) indices of the pieces `rank` holds, in shard order."""
    P = T // cp.n_chunks
    return [a // P for a, _ in chunk_ranges(T, cp.world_size, rank, cp.layout)]


def piece_maps(q, k, v, g, beta, *, scale: float, seq_ids=None, use_qk_l2norm=False, chunk: int = 64,
               impl: str = "chunked"):
    """One piece run from the start state [0, I] with values [v, 0] by backend `impl` ("chunked",
    "reference" or "fla"). q, k: (B, P, HK, K); v: (B, P, HV, V); g, beta: (B, P, HV); seq_ids (B, P)
    or None. Returns (o, r) (B, P, HV, V + K): the output from a zero state and the reads
    r_t = M_t^T (scale q_t), and (O, M) (B, HV, K, V + K): the end state from zero and the map."""
    B, P, HV, V = v.shape
    K = k.shape[3]
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    start = torch.cat([torch.zeros(K, V, dtype=dt, device=v.device), torch.eye(K, dtype=dt, device=v.device)], 1)
    start = start.expand(B, HV, K, V + K)  # (B, HV, K, V + K)
    v_ext = torch.cat([v, v.new_zeros(B, P, HV, K)], dim=-1)  # (B, P, HV, V + K)
    if impl == "fla":
        from loom.kernels.gated_delta_rule.fla import gated_delta_rule_fla

        o, final = gated_delta_rule_fla(q, k, v_ext, g, beta, scale=scale, initial_state=start, seq_ids=seq_ids,
                                        use_qk_l2norm=use_qk_l2norm, return_state=True)
        return o.to(dt), final.to(dt)
    reset = None if seq_ids is None else torch.cat([torch.zeros_like(seq_ids[:, :1], dtype=torch.bool),
                                                    seq_ids[:, 1:] != seq_ids[:, :-1]], 1)
    if impl == "reference":
        o, final = gated_delta_rule_reference(q, k, v_ext.to(dt), g, beta, scale=scale, reset=reset,
                                              initial_state=start, use_qk_l2norm=use_qk_l2norm)
        return o, final
    qq, kk, vv, gg, bb = prepare(q, k, v_ext, g, beta, scale, use_qk_l2norm)
    return gated_delta_rule_chunked(qq, kk, vv, gg, bb, reset=reset, initial_state=start, chunk=chunk)


def cp_gated_delta_rule(q, k, v, g, beta, cp: CPContext, *, scale: float, seq_ids=None, use_qk_l2norm=False,
                        chunk: int = 64, impl: str = "chunked"):
    """`gated_delta_rule` on this rank's shard (either layout). q, k: (B, L, HK, K); v: (B, L, HV, V);
    g, beta: (B, L, HV); seq_ids: (B, L) shard of the global document ids, or None (one document
    per row). Returns o (B, L, HV, V) in v's dtype, equal to the shard of the single-process output,
    and the state after the whole sequence (B, HV, K, V), the same on every rank. Collective."""
    B, L, HV, V = v.shape
    K = k.shape[3]
    T = L * cp.world_size
    check_seq_len(T, cp)
    P = T // cp.n_chunks

    # 1. every local piece from the start state [0, I], on backend `impl`
    outs, maps, ends = [], [], []
    for i in range(L // P):
        sl = slice(i * P, (i + 1) * P)
        ids = None if seq_ids is None else seq_ids[:, sl]
        o, final = piece_maps(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale, seq_ids=ids,
                              use_qk_l2norm=use_qk_l2norm, chunk=chunk, impl=impl)
        outs.append(o)  # (B, P, HV, V + K): [o from zero, r]
        maps.append(final)  # (B, HV, K, V + K): [O, M]
        if ids is not None:
            ends.append(torch.stack([ids[:, 0], ids[:, -1]], dim=1))  # (B, 2)
    # 2. every piece's map and end ids, in rank order
    gathered = all_gather(torch.stack(maps), cp)  # (cp, n_local, B, HV, K, V + K)
    ids_all = None if seq_ids is None else all_gather_nograd(torch.stack(ends), cp)  # (cp, n_local, B, 2)
    by_piece, ids_by_piece = {}, {}
    for r in range(cp.world_size):
        for i, c in enumerate(piece_indices(T, cp, r)):
            by_piece[c] = gathered[r, i]
            if ids_all is not None:
                ids_by_piece[c] = ids_all[r, i]
    # 3. compose in position order
    Z = maps[0].new_zeros(B, HV, K, V)
    incoming = []
    for c in range(cp.n_chunks):
        if c > 0 and ids_by_piece:
            same = ids_by_piece[c][:, 0] == ids_by_piece[c - 1][:, 1]  # (B,) the piece continues a document
            Z = Z * same.to(Z.dtype)[:, None, None, None]
        elif c == 0:
            Z = torch.zeros_like(Z)
        incoming.append(Z)
        O_c, M_c = by_piece[c].split([V, K], dim=-1)
        Z = M_c @ Z + O_c
    # 4. add the read of each local piece's incoming state
    fixed = []
    for i, c in enumerate(piece_indices(T, cp, cp.rank)):
        o0, r = outs[i].split([V, K], dim=-1)
        fixed.append(o0 + torch.einsum("bthk,bhkv->bthv", r, incoming[c]))
    o = torch.cat(fixed, dim=1).to(v.dtype)
    return depend_on(o, gathered), Z  # the gather's backward runs on every rank
