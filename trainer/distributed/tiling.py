"""Sequence tiling: a block's transient memory for one tile of the row, not the whole row.

Applied by `parallelize` (distributed/parallelize.py) after activation
checkpointing and before compile; both replace a forward on the instance, so
parameter names and state dicts do not change.

- MLP tiling (`train.tile_mlp: N` tokens, 0 = off): each block's MLP runs on
  N-token pieces of the row, each piece recomputed in backward, so its hidden
  activations (3 x mlp_hidden per token: 8 KiB per token at d_model 256) exist
  for N tokens at a time instead of the whole row (Arctic Long Sequence
  Training's TiledMLP, Mini-Sequence Transformer); exact, the MLP is per token.
- block tiling (`train.tile_blocks: N` tokens, 0 = off): every block runs whole
  (norms, mixer, MLP) on N-token tiles of the row, recomputed in backward. Such
  a block keeps only its input, like full checkpointing, and its transient
  memory is one tile's instead of the row's (q, k, v, the kernel's buffers,
  RoPE tables, the MLP). Two kinds:
  - a mixer of bounded reach (swa: its window, see Mixer.reach): each tile gets
    `reach` tokens of halo before it (recomputed, their outputs dropped). Under
    context parallelism the halo of each local chunk comes from the rank that
    holds it (kernels/context_parallel halo_extend) and the tiles run with no
    further communication. Exact: a token's output depends on nothing outside
    its tile plus halo;
  - any other mixer (attention, RAT, Titans, linear attention): each tile
    continues from the mixer's state at the end of the tile before (its decoding
    state, differentiable), and backward runs the tiles in reverse, handing each
    tile's start-state gradient to the tile before. Exact by the Mixer contract
    (pieces with the state carried equal the whole). Under context parallelism
    the state goes from rank to rank in the sequence's order: these blocks then
    run one rank after another.
  MoH blocks (a load-balancing loss over the whole row) are left whole. The
  final norm is tiled too (per token, no halo).
"""
from __future__ import annotations

import functools
import math

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.checkpoint import checkpoint

from loom.models.config import ConfigError
from loom.models.mixers import SeqContext


def _tiled(forward, tile: int):
    """`forward` of a per-token module (B, T, D) -> (B, T, D), run on `tile`-token pieces of T,
    each recomputed in backward when it runs with gradients."""

    @functools.wraps(forward)
    def run(x):
        if x.shape[1] <= tile:
            return forward(x)
        pieces = x.split(tile, dim=1)  # views; backward of split is one concatenation
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(forward, p, use_reentrant=False) for p in pieces], dim=1)
        return torch.cat([forward(p) for p in pieces], dim=1)

    return run


def apply_tile_mlp(model, tile: int) -> None:
    """Run each block's MLP on `tile`-token pieces of the sequence (0: off)."""
    if tile:
        for block in model.blocks:
            block.mlp.forward = _tiled(block.mlp.forward, tile)


class _SequenceTiles(torch.autograd.Function):
    """y = fn(x) for a function of bounded reach along the sequence, run on tiles.

    fn(x_in, pos, sid) -> y_in maps rows to rows, and y_in's row t depends on x_in's rows
    t - reach .. t only. x_ext (B, h0 + L, D): the first h0 <= reach rows are halo (inputs
    only); y (B, L, D) is fn's output for the other rows, computed `tile` rows at a time,
    each tile with the `reach` rows before it prepended (their outputs dropped).
    pos_ext, sid_ext: (B, h0 + L) position and document ids of the same rows (sid: or None).

    Forward runs without a graph and writes each tile into y; backward recomputes one tile
    at a time with a graph, takes its gradients with torch.autograd.grad and adds them into
    dx and into the gradients of `params` (fn's parameters, inputs of this Function so that
    autograd accumulates their gradients once, as for any op). Only x_ext is kept between
    forward and backward (as DeepSpeed's TiledMLP), and the whole-row tensors are allocated
    once (y, dx), so a row's memory does not grow with its number of tiles.
    """

    @staticmethod
    def forward(ctx, x_ext, pos_ext, sid_ext, fn, h0: int, tile: int, reach: int, *params):
        ctx.fn, ctx.h0, ctx.tile, ctx.reach, ctx.params = fn, h0, tile, reach, params
        ctx.save_for_backward(x_ext, pos_ext, sid_ext)
        return _run_tiles(fn, x_ext, pos_ext, sid_ext, h0, tile, reach)

    @staticmethod
    def backward(ctx, dy):
        x_ext, pos_ext, sid_ext = ctx.saved_tensors
        h0, want_dx = ctx.h0, ctx.needs_input_grad[0]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[7:]) if need]
        dx = torch.zeros_like(x_ext) if want_dx else None
        dparams = [None] * len(ctx.params)
        for lo, a, b in _tile_rows(h0, x_ext.shape[1], ctx.tile, ctx.reach):
            x_t = x_ext[:, lo:b].detach().requires_grad_(want_dx)
            with torch.enable_grad():
                y_t = ctx.fn(x_t, pos_ext[:, lo:b], _rows(sid_ext, lo, b))[:, a - lo:]
            wrt = ([x_t] if want_dx else []) + [ctx.params[i] for i in wanted]
            grads = list(torch.autograd.grad(y_t, wrt, dy[:, a - h0:b - h0], allow_unused=True))
            if want_dx:
                dx[:, lo:b] += grads.pop(0)
            for i, g in zip(wanted, grads):
                if g is not None:
                    dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        return (dx, None, None, None, None, None, None, *dparams)


def _rows(t, a: int, b: int):
    """Rows a..b (dim 1) of an optional per-token tensor (document ids may be None)."""
    return None if t is None else t[:, a:b]


def _tile_rows(h0: int, S: int, tile: int, reach: int):
    """(first input row, first output row, end row) of each tile over rows h0..S of x_ext."""
    for a in range(h0, S, tile):
        yield max(0, a - reach), a, min(S, a + tile)


def _run_tiles(fn, x_ext, pos_ext, sid_ext, h0: int, tile: int, reach: int) -> torch.Tensor:
    """fn's output for rows h0.. of x_ext, tile by tile, without a graph."""
    y = None
    with torch.no_grad():
        for lo, a, b in _tile_rows(h0, x_ext.shape[1], tile, reach):
            y_t = fn(x_ext[:, lo:b], pos_ext[:, lo:b], _rows(sid_ext, lo, b))[:, a - lo:]
            if y is None:
                y = y_t.new_empty(x_ext.shape[0], x_ext.shape[1] - h0, *y_t.shape[2:])
            y[:, a - h0:b - h0] = y_t
    return y


def sequence_tiles(fn, params, x_ext, pos_ext, sid_ext, h0: int, tile: int, reach: int) -> torch.Tensor:
    """Apply _SequenceTiles (shapes there); without grad mode, just the tiled forward."""
    if not torch.is_grad_enabled():
        return _run_tiles(fn, x_ext, pos_ext, sid_ext, h0, tile, reach)
    return _SequenceTiles.apply(x_ext, pos_ext, sid_ext, fn, h0, tile, reach, *params)


def _block_fn(block):
    """The plain block (not a checkpointed wrapper) as fn(x_in, pos, sid) -> y_in."""

    def fn(x_in, pos, sid):
        sub = SeqContext(position_ids=pos, seq_ids=sid)
        y, _ = type(block).forward(block, x_in, sub)
        if sub.aux_losses:
            raise RuntimeError(f"{type(block.mixer).__name__} declares a bounded reach but adds an auxiliary "
                               "loss, which is not a sum over tiles")
        return y

    return fn


def _sequence_tiled_block(block, tile: int, reach: int):
    """block.forward run by sequence tiles with halo (step 1c of the module docstring);
    calls with a decoding state, state output or diagnostics take the block's own forward."""
    plain, fn = block.forward, _block_fn(block)

    @functools.wraps(plain)
    def run(x, ctx: SeqContext, state=None):
        if state is not None or ctx.want_state or ctx.stats is not None:
            return plain(x, ctx, state)
        params = list(block.parameters())  # at call time: an engine may have swapped them (FSDP)
        cp = ctx.sharding
        if cp is None:
            if x.shape[1] <= tile:
                return plain(x, ctx, state)
            return sequence_tiles(fn, params, x, ctx.position_ids, ctx.seq_ids, 0, tile, reach), None
        from loom.kernels.context_parallel import halo_extend

        xs = halo_extend(x, cp, reach)
        poss = halo_extend(ctx.position_ids.contiguous(), cp, reach)
        sids = [None] * len(xs) if ctx.seq_ids is None else halo_extend(ctx.seq_ids.contiguous(), cp, reach)
        C = x.shape[1] // len(xs)
        ys = [sequence_tiles(fn, params, xe, pe, se, xe.shape[1] - C, tile, reach)
              for xe, pe, se in zip(xs, poss, sids)]
        return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), None

    return run


def _tensor_leaves(state) -> list:
    """The leaves of a mixer state (a pytree of tensors, ints, None) in a fixed order."""
    return tree_flatten(state)[0]


def _state_input(state):
    """A detached copy of `state` whose floating-point tensors require grad (a tile's
    recomputation differentiates with respect to its start state)."""
    flat, spec = tree_flatten(state)
    for t in flat:
        if not isinstance(t, (torch.Tensor, int, float, bool, str, type(None))):
            raise TypeError(f"a mixer state holds a {type(t).__name__}, which is not a pytree node: register it "
                            "(torch.utils._pytree.register_dataclass) so that its tensors carry gradients")
    flat = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in flat]
    return tree_unflatten(flat, spec)


class _Chain:
    """The order in which a row's pieces continue one another, and the messages between
    ranks that hold consecutive pieces (train.tile_blocks with blocks of unbounded reach).

    pieces: (first local row, end row, rank of the previous piece or None, rank of the
    next piece or None) of each piece this rank holds, in the order of the sequence.
    Without cp: one piece, the whole row. Under cp the sequence's chunks are dealt by
    `cp.layout` (zigzag: rank r holds chunks r and 2 cp - 1 - r), so a piece's neighbour
    may be on this rank (the state is simply carried) or on another (it is sent).
    """

    def __init__(self, L: int, cp=None):
        self.cp = cp
        if cp is None:
            self.rank, self.pieces = 0, [(0, L, None, None)]
            return
        from loom.kernels.context_parallel.layout import chunk_ranges

        T, self.rank = L * cp.world_size, cp.rank
        C = T // cp.n_chunks
        owner = {}  # global chunk -> (rank, local chunk)
        for r in range(cp.world_size):
            for j, (a, _) in enumerate(chunk_ranges(T, cp.world_size, r, cp.layout)):
                owner[a // C] = (r, j)
        n = cp.n_chunks
        self.pieces = [(owner[c][1] * C, (owner[c][1] + 1) * C, owner[c - 1][0] if c else None,
                        owner[c + 1][0] if c + 1 < n else None) for c in range(n) if owner[c][0] == cp.rank]

    def remote(self, peer) -> bool:
        return peer is not None and peer != self.rank

    def send(self, obj, peer: int) -> None:
        torch.distributed.send_object_list([obj], dst=self.cp.global_rank(peer), group=self.cp.group)

    def recv(self, peer: int, device):
        box = [None]
        torch.distributed.recv_object_list(box, src=self.cp.global_rank(peer), group=self.cp.group)
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, box[0])


def _state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in _tensor_leaves(state) if isinstance(t, torch.Tensor))


def _tile_plan(chain: _Chain, tile: int) -> list[list[tuple[int, int, int]]]:
    """Per piece of `chain`, its tiles as (index in sequence order, first row, end row)."""
    plan, i = [], 0
    for lo, hi, _, _ in chain.pieces:
        plan.append([(i + n, a, min(hi, a + tile)) for n, a in enumerate(range(lo, hi, tile))])
        i += len(plan[-1])
    return plan


def _run_carried(fn, x, pos, sid, plan: list, chain: _Chain, keep: dict | None = None) -> torch.Tensor:
    """fn's output for the row x, tile after tile (`plan`: _tile_plan) with the state carried,
    without a graph.

    With `keep` (a dict), also keeps tile start states in it ({tile index: state}): every
    tile's while they fit in the memory of x itself, else those of every 2nd, 4th, ...
    tile, the stride doubling whenever they would not fit, up to the power of two at or
    above sqrt(tiles) (then at most ~2 sqrt(tiles) states exist at once, counting the ones
    backward regenerates between two kept ones). A piece's first tile is always kept: its
    state may come from another rank."""
    y = torch.empty_like(x)
    n = plan[-1][-1][0] + 1
    state, stride, kept, budget = None, 1, 0, x.numel() * x.element_size()
    max_stride = 1 << max(0, math.ceil(math.log2(math.sqrt(n))))
    firsts = {tiles[0][0] for tiles in plan}
    with torch.no_grad():
        for (lo, hi, prev, nxt), tiles in zip(chain.pieces, plan):
            state = chain.recv(prev, x.device) if chain.remote(prev) else (state if prev is not None else None)
            for i, a, b in tiles:
                if keep is not None and (i in firsts or i % stride == 0):
                    keep[i] = state
                    kept += _state_bytes(state)
                    while kept > budget and stride < max_stride:
                        stride *= 2
                        for j in [j for j in keep if j % stride and j not in firsts]:
                            kept -= _state_bytes(keep.pop(j))
                y[:, a:b], state = fn(x[:, a:b], pos[:, a:b], _rows(sid, a, b), state)
            if chain.remote(nxt):
                chain.send(state, nxt)
    return y


class _CarriedTiles(torch.autograd.Function):
    """y = fn(x) for a block of unbounded reach (attention, RAT, Titans memory, linear
    attention), run on tiles with the mixer's state carried from tile to tile.

    fn(x_in, pos, sid, state) -> (y_in, new_state) runs the block on rows that continue
    the ones `state` summarises (None: the row's start). Feeding a row in pieces with the
    state carried equals feeding it whole, and the state is differentiable: the Mixer
    contract, tested for every kind (tests/models/test_mixer_contract.py,
    tests/trainer/test_tile_blocks.py). x (B, L, D) is this process's row; `chain` cuts it
    into pieces in the sequence's order (one without cp), each cut into `tile`-row tiles.

    Forward runs without a graph and keeps x and the states at tile starts (every tile's
    while they take no more memory than x, else every 2nd, 4th, ... tile's, up to every
    ~sqrt(tiles)-th: _run_carried).
    Backward walks the tiles in reverse: it recomputes a tile from its start state with
    a graph and takes, with torch.autograd.grad, the gradients of (the tile's output,
    its end state) with respect to (its input, its start state, the parameters), given
    dy and the end state's gradient from the tile after it; the start state's gradient
    then seeds the tile before. A start state that was not kept is regenerated by running
    the tiles since the last kept one forward again, without a graph. So the states cost
    the memory of x, or of ~2 sqrt(tiles) states when they are larger (they hold a fixed
    size for linear attention and Titans memory, a summary per chunk for RAT, the keys
    and values so far for attention), at the price of up to one more forward pass.

    Under context parallelism a piece continues the one before it on another rank: its
    start state is received from that rank, its end state sent to the next, and backward
    sends the start state's gradient back. The pieces run in the sequence's order, one
    rank after the other: exact, with 1/cp of the row's memory per rank, but not faster
    than one rank for these blocks.
    """

    @staticmethod
    def forward(ctx, x, pos, sid, fn, tile: int, chain: _Chain, *params):
        ctx.fn, ctx.chain, ctx.params = fn, chain, params
        ctx.save_for_backward(x, pos, sid)
        ctx.keep, ctx.plan = {}, _tile_plan(chain, tile)
        return _run_carried(fn, x, pos, sid, ctx.plan, chain, ctx.keep)

    @staticmethod
    def backward(ctx, dy):
        x, pos, sid = ctx.saved_tensors
        chain, keep = ctx.chain, ctx.keep
        want_dx = ctx.needs_input_grad[0]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[6:]) if need]
        dx = torch.zeros_like(x) if want_dx else None
        dparams = [None] * len(ctx.params)
        dstate = None  # gradient of the current tile's end state (a list aligned with its leaves)
        for (lo, hi, prev, nxt), tiles in reversed(list(zip(chain.pieces, ctx.plan))):
            if chain.remote(nxt):
                dstate = chain.recv(nxt, x.device)
            elif nxt is None:
                dstate = None
            first = tiles[0][0]
            for i, a, b in reversed(tiles):
                if i not in keep:  # regenerate the start states since the last kept one
                    j = max(k for k in keep if first <= k < i)
                    state = keep[j]
                    with torch.no_grad():
                        for t, ta, tb in tiles[j - first:i - first]:
                            _, state = ctx.fn(x[:, ta:tb], pos[:, ta:tb], _rows(sid, ta, tb), state)
                            keep[t + 1] = state
                s0 = _state_input(keep.pop(i))
                x_t = x[:, a:b].detach().requires_grad_(want_dx)
                with torch.enable_grad():
                    y_t, s1 = ctx.fn(x_t, pos[:, a:b], _rows(sid, a, b), s0)
                outs, gouts = [y_t], [dy[:, a:b]]
                for t, g in zip(_tensor_leaves(s1), dstate or ()):
                    if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                        outs.append(t)
                        gouts.append(g)
                s0_leaves = _tensor_leaves(s0)
                s0_diff = [k for k, t in enumerate(s0_leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
                wrt = ([x_t] if want_dx else []) + [s0_leaves[k] for k in s0_diff] + [ctx.params[k] for k in wanted]
                grads = list(torch.autograd.grad(outs, wrt, gouts, allow_unused=True))
                if want_dx:
                    dx[:, a:b] = grads.pop(0)
                dstate = [None] * len(s0_leaves)
                for k in s0_diff:
                    dstate[k] = grads.pop(0)
                for k, g in zip(wanted, grads):
                    if g is not None:
                        dparams[k] = g if dparams[k] is None else dparams[k].add_(g)
            if chain.remote(prev):
                chain.send(dstate, prev)
        ctx.keep = ctx.plan = None
        return (dx, None, None, None, None, None, *dparams)


def _carry_fn(block):
    """The plain block as fn(x_in, pos, sid, state) -> (y_in, new_state), continuing a row."""

    def fn(x_in, pos, sid, state):
        if sid is not None:
            sid = sid - sid[:, :1]
        sub = SeqContext(position_ids=pos, seq_ids=sid, want_state=True)
        y, new_state = type(block).forward(block, x_in, sub, state)
        if sub.aux_losses:
            raise RuntimeError(f"{type(block.mixer).__name__} adds an auxiliary loss but does not declare "
                               "row_losses(), so it was run on sequence tiles")
        return y, new_state

    return fn


def _carried_block(block, tile: int):
    """block.forward run on sequence tiles with its mixer's state carried (step 1c of the
    module docstring); calls with a decoding state, state output or diagnostics, and rows
    of at most one tile, take the block's own forward (under cp: its own cp op)."""
    plain, fn = block.forward, _carry_fn(block)

    @functools.wraps(plain)
    def run(x, ctx: SeqContext, state=None):
        if state is not None or ctx.want_state or ctx.stats is not None or x.shape[1] <= tile:
            return plain(x, ctx, state)
        chain = _Chain(x.shape[1], ctx.sharding)
        if not torch.is_grad_enabled():
            return _run_carried(fn, x, ctx.position_ids, ctx.seq_ids, _tile_plan(chain, tile), chain), None
        params = list(block.parameters())
        return _CarriedTiles.apply(x, ctx.position_ids, ctx.seq_ids, fn, tile, chain, *params), None

    return run


def _tiled_norm(norm, tile: int):
    """The final norm (per token) on `tile`-token pieces, through _SequenceTiles."""
    plain = norm.forward

    def fn(x_in, pos, sid):
        return plain(x_in)

    @functools.wraps(plain)
    def run(x):
        if x.shape[1] <= tile:
            return plain(x)
        pos = torch.zeros(1, 1, dtype=torch.long, device=x.device).expand(x.shape[0], x.shape[1])
        return sequence_tiles(fn, list(norm.parameters()), x, pos, None, 0, tile, 0)

    return run


def apply_tile_blocks(model, tile: int) -> None:
    """Run each block on `tile`-token sequence tiles: with a halo of `reach` tokens when its
    mixer has a bounded reach, else with the mixer's state carried from tile to tile; and
    the final norm on `tile`-token pieces (0: off). A mixer with row-level auxiliary
    losses (MoH) is left whole."""
    if not tile:
        return
    for i, block in enumerate(model.blocks):
        if block.mixer.row_losses():
            continue
        reach = block.mixer.reach()
        if reach is None:
            block.forward = _carried_block(block, tile)
            continue
        if tile < reach:
            raise ConfigError(f"train.tile_blocks ({tile}) must be >= the reach of layer {i} "
                              f"({block.kind}: {reach} tokens)")
        block.forward = _sequence_tiled_block(block, tile, reach)
    model.norm.forward = _tiled_norm(model.norm, tile)
