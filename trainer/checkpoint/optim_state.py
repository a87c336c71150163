"""Optimizer state in a form that does not depend on the engine or the world size.

Every engine saves its optimizer state as the *full, name-keyed* state dict
that torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(...,
full_state_dict=True) produces:

    {"state": {param_name: {"step": tensor(), "exp_avg": full tensor, "exp_avg_sq": full tensor}},
     "param_groups": [{"lr": ..., "betas": ..., ..., "params": [param_name, ...]}, ...]}

param_name is the name in HybridLM.named_parameters() (no wrapper prefixes),
every tensor is unsharded and on CPU. So a checkpoint written by DDP on 2 ranks,
FSDP on 4 or ZeRO-3 on 8 resumes on any engine and any number of ranks; the
single engine reads it too (and still reads the older index-keyed state dicts).
"""
from __future__ import annotations

import torch


def is_named(osd: dict) -> bool:
    """True for a name-keyed state dict (this module's format)."""
    groups = osd.get("param_groups", [])
    return bool(groups) and all(isinstance(n, str) for g in groups for n in g["params"])


def param_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in model.named_parameters()."""
    return {id(p): name for name, p in model.named_parameters()}


def named_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Name-keyed CPU copy of a plain (unsharded) optimizer's state."""
    names = param_names(model)
    state, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            if p in optimizer.state:
                state[names[id(p)]] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                       for k, v in optimizer.state[p].items()}
    return {"state": state, "param_groups": groups}


def load_named_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a name-keyed (or index-keyed, as torch saves it) state dict into a plain optimizer.

    Raises ValueError naming the first parameter the checkpoint and the model disagree on.
    """
    if not is_named(osd):
        optimizer.load_state_dict(osd)
        return
    names = param_names(model)
    index, state, groups = 0, {}, []
    for group, saved in zip(optimizer.param_groups, osd["param_groups"], strict=True):
        ours = [names[id(p)] for p in group["params"]]
        if ours != list(saved["params"]):
            diff = next((a, b) for a, b in zip(ours + [None], list(saved["params"]) + [None]) if a != b)
            raise ValueError(f"optimizer state does not fit the model: parameter {diff[0]!r} here, "
                             f"{diff[1]!r} in the checkpoint")
        ids = list(range(index, index + len(ours)))
        groups.append({**saved, "params": ids})
        state.update({i: osd["state"][n] for i, n in zip(ids, ours) if n in osd["state"]})
        index += len(ours)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
