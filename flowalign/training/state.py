"""The optimizer's whole state, whatever the engine: torch's distributed state-dict API gathers it from DDP
replicas or FSDP shards into one full, parameter-name-keyed dict (on the main process), and loads a full dict
back into any layout, so a checkpoint resumes on any number of processes. DeepSpeed ZeRO's partitions go through
``zero_state.py`` into the same layout."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from .zero_state import full_zero_state, load_full_zero_state, zero_optimizer


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter names, on the CPU; a collective under FSDP (every process
    calls it; processes other than the first may get an empty dict)."""
    zero = zero_optimizer(optimizer)
    if zero is not None:
        return full_zero_state(model, zero)
    return get_optimizer_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              weights: dict[str, torch.Tensor] | None = None) -> None:
    """Load a full state from ``full_optimizer_state`` (every process passes it); an older checkpoint's
    ``optimizer.state_dict()`` (integer-keyed, one process's view) is loaded as it was saved. Under ZeRO the
    checkpoint's ``weights`` also become the optimizer's fp32 master weights."""
    zero = zero_optimizer(optimizer)
    if zero is not None:
        load_full_zero_state(model, zero, state, weights or {})
        return
    if all(isinstance(k, int) for k in state.get("state", {})) and all(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g.get("params", [])):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
