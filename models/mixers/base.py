"""The mixer contract shared by every sequence-mixing layer.

A *mixer* replaces the attention sub-block of a pre-norm transformer block:
it maps the normalised hidden state x (B, T, D) to an update (B, T, D) that
the block adds to its residual stream.

Legend: B batch, T tokens in this call, D model width, H query heads,
G key/value heads, K head dim.

Each mixer file under models/mixers/ defines one subclass of `Mixer`,
decorated with `@register("<kind>")`, and a dataclass `Config` holding the
options a recipe sets under `model.mixers.<kind>`. The package imports every
module in this folder, so adding a mixer is adding a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from loom.models.norms import NormStyle
from loom.models.rope import RopeConfig


@dataclass(frozen=True)
class MixerDims:
    """Model-level sizes a mixer needs; the same for every layer of a model."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_idx: int
    n_layers: int
    rope: RopeConfig
    init_std: float = 0.02
    norm: NormStyle = NormStyle()  # how the mixer's own norms (q/k norm) apply their weight


@dataclass
class SeqContext:
    """Per-call information about the token sequence, shared by all layers.

    position_ids: (B, T) int64, the position of each token inside its own
        document (restarts at 0 at every document start). During decoding it
        continues from the cache length.
    seq_ids: (B, T) int64 document index inside each row (non-decreasing), or
        None when each row is a single document. Two tokens may interact only
        if their seq_ids are equal.
    want_state: mixers return their final state (KV cache, recurrent state)
        when True, else None.
    cp: None, or the context-parallel handle (a kernels CPContext) when
        each row is this process's shard of a longer sequence. Mixers pass it
        unchanged to their kernels/ op as `cp=`; the op decides what to do.
    aux_losses: mixers append scalar auxiliary losses, already weighted
        (e.g. MoH load balancing); the model adds them to the training loss.
    stats: when a dict, mixers record diagnostics as detached scalar tensors
        keyed "<name>/layer<idx>" (gate mean, attention-sink mass, head usage).
    """

    position_ids: torch.Tensor
    seq_ids: torch.Tensor | None = None
    want_state: bool = False
    cp: Any = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, torch.Tensor] | None = None

    @property
    def doc_starts(self) -> torch.Tensor:
        """(B, T) bool, True at the first token of each document."""
        return self.position_ids == 0


class Mixer(nn.Module):
    """Base class. Subclasses implement `forward` and the accounting hooks.

    forward(x, ctx, state=None) -> (y, new_state)
        x: (B, T, D) normalised hidden states.
        state: what this mixer returned for the previous tokens of the same
            rows (decoding, chunked prefill), or None at the start.
        y: (B, T, D); new_state: mixer-specific (None unless ctx.want_state).
    Feeding a sequence in pieces with the state carried must equal feeding it
    whole; tests check this for every kind.
    """

    kind: ClassVar[str] = ""
    # Context-parallel algorithms (`parallel.cp_impl`) under which this mixer's
    # sharded forward and backward equal the single-device ones. Read from the
    # class's OWN namespace, never inherited: a subclass that changes the maths
    # (swa, s2 over attn) declares its own support. The trainer refuses any other
    # cp setting at start-up (trainer/parallel_check.py).
    cp_impls: ClassVar[tuple[str, ...]] = ()

    @dataclass
    class Config:
        pass

    def __init__(self, dims: MixerDims, cfg: Any):
        super().__init__()
        self.dims = dims
        self.cfg = cfg

    def mixing_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the parameter-free mixing (e.g. QK^T and
        AV), averaged over a causal sequence of `seq_len` tokens. Projections
        are counted by the model through the parameter count."""
        return 0.0

    def state_bytes(self, seq_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes of decoding state for one sequence after `seq_len` tokens."""
        return 0

    def reset_parameters(self) -> None:
        """Initialise this mixer's parameters (called once by HybridLM.init_weights)."""

    def reach(self) -> int | None:
        """How far back this mixer looks: the output at token t depends on its
        inputs at tokens t - reach .. t only (a sliding window), or None when it
        may depend on any earlier token (attention, recurrences: the default).
        A bounded reach lets the trainer run the block on sequence tiles with
        `reach` tokens of halo each (trainer/parallelize.py, train.tile_blocks);
        a mixer that appends row-level auxiliary losses must return None."""
        return None

    def row_losses(self) -> bool:
        """True when forward appends an auxiliary loss computed over the whole row
        (MoH's load balance is a mean over all its tokens). Such a mixer cannot run on
        sequence tiles (train.tile_blocks): the tiles' losses would be means over tiles.
        Default: whether any submodule says so through its own `row_losses` attribute
        (heads.HeadOutput with MoH, in attn, swa, s2 and rat)."""
        return any(getattr(m, "row_losses", False) is True for m in self.modules() if m is not self)

    def cp_chunk_tokens(self) -> int:
        """Under context parallelism, how many consecutive tokens must stay on one
        rank (e.g. RAT's chunk length when chunks may not straddle ranks): each
        zigzag piece of seq_len / (2 cp) tokens must be a multiple. 1: no constraint."""
        return 1


MIXERS: dict[str, type[Mixer]] = {}


def register(kind: str):
    """Class decorator: make a Mixer subclass available as `kind` in recipes."""

    def wrap(cls: type[Mixer]) -> type[Mixer]:
        if kind in MIXERS:
            raise ValueError(f"mixer kind {kind!r} registered twice")
        cls.kind = kind
        MIXERS[kind] = cls
        return cls

    return wrap
