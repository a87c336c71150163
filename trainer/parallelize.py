"""From a built single-device HybridLM to the engine the loop trains, in one place.

The model code never knows how it is run: everything below is applied to the
finished model from outside, in this order (torchtitan's `parallelize` is the
pattern):

    1. activation checkpointing, per block (`train.activation_checkpointing`):
         none       keep every activation;
         full       keep only each block's input, recompute the block in backward;
         selective  keep the mixer's activations and output, recompute the MLP
                    (the MLP's hidden activations, 3 x mlp_hidden per token, are
                    most of a block's memory at small d_model; the mixer is the
                    expensive part to recompute);
    1b. MLP tiling along the sequence (`train.tile_mlp: N` tokens, 0 = off):
         each block's MLP runs on N-token pieces of the row, each piece
         recomputed in backward, so its hidden activations (3 x mlp_hidden
         per token: 8 KiB per token at d_model 256) exist for N tokens at a
         time instead of the whole row (Arctic Long Sequence Training's
         TiledMLP, Mini-Sequence Transformer); exact, the MLP is per token;
    1c. block tiling along the sequence (`train.tile_blocks: N` tokens, 0 = off):
         each block whose mixer has a bounded reach (swa: its window, see
         Mixer.reach) runs whole (norms, mixer, MLP) on N-token tiles of the
         row, each tile with `reach` tokens of halo before it (recomputed, their
         outputs dropped) and recomputed in backward. Such a block keeps only its
         input, like full checkpointing, and its transient memory is one tile's
         instead of the row's (q, k, v, the kernel's buffers, RoPE tables, the
         MLP). Under context parallelism the halo of each local chunk comes from
         the rank that holds it (kernels/context_parallel halo_extend) and the
         tiles run with no further communication. Exact: a token's output
         depends on nothing outside its tile plus halo. The final norm is tiled
         the same way (per token, no halo);
    2. torch.compile per block (`train.compile`: true | false | null = auto,
       which is on for CUDA and off on CPU, where compile does not pay for the
       mixers' chunked loops);
    3. the engine (`parallel.engine`): single, ddp (DistributedDataParallel),
       fsdp (FSDP2 fully_shard per block, then the root) or deepspeed (ZeRO
       0-3); each builds Loom's AdamW and schedule on the wrapped parameters.

Both 1 and 2 replace a block's (or its MLP's) `forward` on the instance, so
parameter names, state dicts and checkpoints are the same with and without
them. Context parallelism is not applied here: the cp handle travels with each
forward call (`model(..., cp=env.cp)`) to the kernels/ ops, which decide.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from loom.models.config import ConfigError, nearest
from loom.models.mixers import SeqContext
from loom.trainer import dist
from loom.trainer.dist import Env
from loom.trainer.engine import SingleEngine

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
CHECKPOINTING = ("none", "full", "selective")


def parallelize(model, cfg, env: Env):
    """Apply activation checkpointing, compile and the engine to `model` (a HybridLM
    on the CPU, unwrapped) as `cfg` (a RunConfig) says; returns the engine."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    apply_tile_mlp(model, cfg.train.tile_mlp)
    apply_tile_blocks(model, cfg.train.tile_blocks)
    compile_blocks = cfg.train.compile if cfg.train.compile is not None else env.device.type == "cuda"
    if compile_blocks:
        apply_compile(model)
    dist.log(f"activation checkpointing: {cfg.train.activation_checkpointing}; "
             + (f"tile_mlp: {cfg.train.tile_mlp} tokens; " if cfg.train.tile_mlp else "")
             + (f"tile_blocks: {cfg.train.tile_blocks} tokens; " if cfg.train.tile_blocks else "") + "compile: "
             f"{'on' if compile_blocks else 'off'}" + ("" if cfg.train.compile is not None else
                                                        f" (auto on {env.device.type})"))
    return build_engine(cfg.parallel.engine, model, cfg.optim, cfg.train.steps, env=env, cfg=cfg)


def _recomputed(forward):
    """`forward`, recomputed in backward when it runs with gradients (training); plain
    otherwise (evaluation, decoding)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_activation_checkpointing(model, mode: str) -> None:
    """mode: none | full (whole blocks) | selective (the MLP of each block)."""
    if mode not in CHECKPOINTING:
        raise ConfigError(f"train.activation_checkpointing: unknown mode {mode!r}{nearest(mode, CHECKPOINTING)}")
    for block in model.blocks:
        if mode == "full":
            block.forward = _recomputed(block.forward)
        elif mode == "selective":
            block.mlp.forward = _recomputed(block.mlp.forward)


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
                y_t = ctx.fn(x_t, pos_ext[:, lo:b], None if sid_ext is None else sid_ext[:, lo:b])[:, a - lo:]
            wrt = ([x_t] if want_dx else []) + [ctx.params[i] for i in wanted]
            grads = list(torch.autograd.grad(y_t, wrt, dy[:, a - h0:b - h0], allow_unused=True))
            if want_dx:
                dx[:, lo:b] += grads.pop(0)
            for i, g in zip(wanted, grads):
                if g is not None:
                    dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        return (dx, None, None, None, None, None, None, *dparams)


def _tile_rows(h0: int, S: int, tile: int, reach: int):
    """(first input row, first output row, end row) of each tile over rows h0..S of x_ext."""
    for a in range(h0, S, tile):
        yield max(0, a - reach), a, min(S, a + tile)


def _run_tiles(fn, x_ext, pos_ext, sid_ext, h0: int, tile: int, reach: int) -> torch.Tensor:
    """fn's output for rows h0.. of x_ext, tile by tile, without a graph."""
    y = None
    with torch.no_grad():
        for lo, a, b in _tile_rows(h0, x_ext.shape[1], tile, reach):
            y_t = fn(x_ext[:, lo:b], pos_ext[:, lo:b], None if sid_ext is None else sid_ext[:, lo:b])[:, a - lo:]
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
    """Run each block whose mixer has a bounded reach on `tile`-token sequence tiles with
    halo, and the final norm on `tile`-token pieces (0: off). Blocks of unbounded reach
    (attention, recurrences, memory) are left as they are."""
    if not tile:
        return
    for i, block in enumerate(model.blocks):
        reach = block.mixer.reach()
        if reach is None:
            continue
        if tile < reach:
            raise ConfigError(f"train.tile_blocks ({tile}) must be >= the reach of layer {i} "
                              f"({block.kind}: {reach} tokens)")
        block.forward = _sequence_tiled_block(block, tile, reach)
    model.norm.forward = _tiled_norm(model.norm, tile)


def apply_compile(model) -> None:
    """torch.compile each block in place (names and state dict unchanged)."""
    for block in model.blocks:
        block.compile()


def build_engine(name: str, model, optim_cfg, total_steps: int, env: Env | None = None, cfg=None):
    """The engine named by `parallel.engine` around `model`.

    env: this process's Env (default: one process); cfg: the RunConfig (the
    DeepSpeed and FSDP engines read batch sizes and parallel.*). `single` on
    several processes (e.g. `torchrun ... parallel.cp=4` with the default
    engine) runs as ddp: replicas must average their gradients to stay one
    model. ddp on one process is the single engine (identical maths); fsdp and
    deepspeed start a one-rank process group so that offload and mixed
    precision behave as with many ranks.
    """
    env = env or Env()
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine: unknown engine {name!r}{nearest(name, ENGINES)}")
    if name == "single" and env.world > 1:
        dist.log(f"parallel.engine=single on {env.world} processes: using ddp")
        name = "ddp"
    if name in ("single", "ddp") and env.world == 1:
        return SingleEngine(model, optim_cfg, total_steps)
    if name == "ddp":
        from loom.trainer.distributed.ddp import DDPEngine

        return DDPEngine(model, optim_cfg, total_steps, env)
    if name == "fsdp":
        from loom.trainer.distributed.fsdp import FSDPEngine

        return FSDPEngine(model, optim_cfg, total_steps, env, cfg)
    from loom.trainer.distributed.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, optim_cfg, total_steps, env, cfg)
