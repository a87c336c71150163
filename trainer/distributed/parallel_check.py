"""Start-up checks that a built model can run under the chosen context parallelism.

Called by the training loop when parallel.cp > 1, after the model is
built and before any engine, data or step: a layer that cannot shard its
sequence fails here in one line naming it, not as a hang or a wrong gradient
minutes later. The rules come from the mixers themselves:

- `cp_impls` (models/mixers/base.py), declared in each mixer class's own body:
  the cp algorithms whose result is exactly the single-device one;
- `cp_chunk_tokens()`: tokens that must stay on one rank together; every
  zigzag piece of seq_len / (2 cp) tokens must be a multiple of it;
- Ulysses trades sequence for heads: the kernels' head rule (H % cp == 0, and
  G % cp == 0 or cp % G == 0) must hold for the softmax-attention layers that
  run it (attn and its subclasses without a window; sliding-window layers use
  the halo exchange, and the recurrent mixers pass states, whatever cp_impl says).
data.seq_len % (2 cp) == 0 itself is checked with the recipe (trainer/config.py).
"""
from __future__ import annotations

from loom.models.config import ConfigError
from loom.models.mixers.attn import Attention


def supported_cp_impls(mixer) -> tuple[str, ...]:
    """The cp algorithms a mixer class declares in its own body (not inherited)."""
    return tuple(vars(type(mixer)).get("cp_impls", ()))


def check_cp_support(model, cfg) -> None:
    """Raise ConfigError naming the first layer that cannot run with parallel.cp / cp_impl.

    model: a built HybridLM; cfg: the RunConfig (parallel.cp, parallel.cp_impl, data.seq_len).
    """
    cp, impl, seq_len = cfg.parallel.cp, cfg.parallel.cp_impl, cfg.data.seq_len
    if cp <= 1:
        return
    piece = seq_len // (2 * cp)
    for i, block in enumerate(model.blocks):
        mixer, where = block.mixer, f"model.layers[{i}] ({block.kind})"
        impls = supported_cp_impls(mixer)
        if impl not in impls:
            hint = (f"it supports parallel.cp_impl={' or '.join(impls)}" if impls
                    else "it has no context-parallel implementation yet; use parallel.cp=1")
            raise ConfigError(f"{where} cannot run with parallel.cp={cp} and parallel.cp_impl={impl}: {hint}")
        chunk = mixer.cp_chunk_tokens()
        if piece % chunk:
            raise ConfigError(f"{where} keeps chunks of {chunk} tokens on one rank, but parallel.cp={cp} cuts "
                              f"data.seq_len={seq_len} into pieces of {piece}; pick data.seq_len as a multiple "
                              f"of {2 * cp * chunk}")
        if impl == "ulysses" and isinstance(mixer, Attention) and mixer.window is None:  # windowed: halo path
            from loom.kernels.context_parallel.ulysses import ulysses_kv_heads

            try:
                ulysses_kv_heads(mixer.dims.n_heads, mixer.dims.n_kv_heads, cp)
            except ValueError as e:
                raise ConfigError(f"{where} cannot run parallel.cp_impl=ulysses at parallel.cp={cp}: {e}; "
                                  "use parallel.cp_impl=ring") from None
