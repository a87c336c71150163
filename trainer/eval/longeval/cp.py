"""Evaluation and generation under context parallelism, for lengths one process cannot hold.

Legend: B rows, T window length, L = T / cp tokens per rank, P prompt length,
P0 the part of the prompt prefilled under cp (a multiple of the layout's
chunk count), D model width.

Scoring (teacher-forced, loss by position): every rank takes its zigzag shard
of the window (the split training uses), runs the model with `cp=` (the same
context-parallel kernels as training: ring/Ulysses attention, halo exchange,
chunk-state passing), scores its own tokens and the per-token results are
all-gathered back into position order. Every rank ends with the same (B, T).

Generation: a sharded prefill of the first P0 prompt tokens records each
layer's input (this rank's shard); per layer, the inputs are all-gathered to
(B, P0, D) and the layer's decoding state (KV cache, recurrent state, memory
weights) is rebuilt by feeding them to that mixer alone, `rebuild_chunk`
tokens at a time with the state carried (the mixer contract: pieces with the
state carried equal the whole). Memory per rank: one layer's inputs plus the
states, never a full-length forward of the whole model. The last P - P0 prompt
tokens and the decoding then run on every rank identically (greedy, so the
ranks agree without communication).

Example (inside an initialised process group):
    runner = CPRunner(CPContext.from_group(None))
    loss, correct = runner.token_scores(model, batch)        # (B, T) each, on every rank
    out = runner.generate(model, prompt_ids, 16, tok.eos_id)  # (1, P + new)
"""
from __future__ import annotations

from typing import Optional

import torch

from loom.kernels.context_parallel import CPContext, check_seq_len, gather_sequence, shard_sequence
from loom.models import HybridLM
from loom.models.mixers import SeqContext
from loom.trainer.eval.validation import token_losses


class CPRunner:
    """Forward passes sharded over the ranks of `cp` (see the module docstring)."""

    def __init__(self, cp: CPContext, rebuild_chunk: int = 1024):
        self.cp = cp
        self.rebuild_chunk = rebuild_chunk

    def token_scores(self, model: HybridLM, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss (B, T) and argmax-correct (B, T) bool, gathered on every rank."""
        check_seq_len(batch["input_ids"].shape[1], self.cp)
        part = {k: shard_sequence(batch[k], self.cp, dim=1) for k in ("input_ids", "labels", "position_ids", "seq_ids")}
        hidden = model(part["input_ids"], position_ids=part["position_ids"], seq_ids=part["seq_ids"],
                       cp=self.cp).hidden
        loss, correct = token_losses(model, hidden, part["labels"], chunk)
        return gather_sequence(loss, self.cp), gather_sequence(correct.to(torch.uint8), self.cp).bool()

    @torch.no_grad()
    def prefill_state(self, model: HybridLM, ids: torch.Tensor) -> list[dict]:
        """Decoding state after ids (B, P0), P0 a multiple of cp.n_chunks; the same on every rank."""
        B, P0 = ids.shape
        check_seq_len(P0, self.cp)
        pos = torch.arange(P0, device=ids.device).expand(B, P0)
        inputs: dict[int, torch.Tensor] = {}
        hooks = [block.mixer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
                 for i, block in enumerate(model.blocks)]
        try:
            model(shard_sequence(ids, self.cp), position_ids=shard_sequence(pos, self.cp), cp=self.cp)
        finally:
            for h in hooks:
                h.remove()
        state = []
        for i, block in enumerate(model.blocks):
            x = gather_sequence(inputs.pop(i), self.cp)              # (B, P0, D) in position order
            s = None
            for a in range(0, P0, self.rebuild_chunk):
                b = min(P0, a + self.rebuild_chunk)
                _, s = block.mixer(x[:, a:b], SeqContext(position_ids=pos[:, a:b], want_state=True), s)
            state.append({"mixer": s, "length": P0})
        return state

    @torch.no_grad()
    def generate(self, model: HybridLM, ids: torch.Tensor, max_new_tokens: int,
                 eos_id: Optional[int]) -> torch.Tensor:
        """Greedy continuation of ids (B, P) -> (B, P + new), as HybridLM.generate."""
        n = self.cp.n_chunks
        P0 = (ids.shape[1] - 1) // n * n                             # at least one token left to feed
        state = self.prefill_state(model, ids[:, :P0]) if P0 else None
        return decode(model, ids, ids[:, P0:], state, max_new_tokens, eos_id)


@torch.no_grad()
def decode(model: HybridLM, ids: torch.Tensor, rest: torch.Tensor, state: Optional[list], max_new_tokens: int,
           eos_id: Optional[int]) -> torch.Tensor:
    """Feed `rest` (B, R >= 1) after `state`, then decode greedily; returns ids (B, P) + new tokens."""
    out = model(rest, state=state, want_state=True)
    state, tokens = out.state, [ids]
    nxt = model.logits(out.hidden[:, -1]).argmax(-1, keepdim=True)
    for _ in range(max_new_tokens - 1):
        tokens.append(nxt)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
        out = model(nxt, state=state, want_state=True)
        state = out.state
        nxt = model.logits(out.hidden[:, -1]).argmax(-1, keepdim=True)
    else:
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)
