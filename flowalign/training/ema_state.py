"""The training EMA's whole state, whatever the engine. The EMA update is elementwise, so each process averaging its
own shard of the weights (FSDP) is the EMA of the full weights; only saving, loading and swapping in need care:
torch's distributed state-dict API gathers the EMA, swapped into the live parameters, into one full, name-keyed dict
(FSDP1 flat shards, FSDP2 DTensors, DDP replicas alike) and loads a full dict back into any layout."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

STEP_KEY = "__ema_optimization_step__"  # no parameter has this name: it holds the EMA's decay warm-up counter
_POSITION_KEY = re.compile(r"ema\.\d+")  # older checkpoints: ``ema.{i}``, the i-th trainable parameter
_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's values: a DTensor's local shard, else the tensor itself (call under ``no_grad``)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextmanager
def ema_swapped_in(ema, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """The EMA's weights in ``params`` inside the block, the live ones restored after (kept on the CPU meanwhile);
    elementwise on each process's shard. Does nothing without an EMA (``ema`` None)."""
    if ema is None:
        yield
        return
    with torch.no_grad():
        live = [_local(p).detach().to("cpu", copy=True) for p in params]
        for p, shadow in zip(params, ema.shadow_params):
            _local(p).copy_(_local(shadow))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, live):
                _local(p).copy_(saved)


def _unwrapped_deepspeed(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DeepSpeed engine (ZeRO-1/2: whole on every process), so names carry no ``module.``."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" else model


def _buffer_names(model: torch.nn.Module) -> set[str]:
    """The model's buffer names with wrapper prefixes (DDP, FSDP1, activation checkpointing) removed."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
            for name, _ in inner.named_buffers()}


def full_ema_state(model: torch.nn.Module, params: Sequence[torch.Tensor], ema) -> dict[str, torch.Tensor]:
    """The EMA of ``params`` (the model's trainable parameters) as full tensors keyed by parameter name, on the
    CPU, plus its step counter; a collective under FSDP (every process calls it; processes other than the first
    may get the counter only)."""
    model = _unwrapped_deepspeed(model)
    buffers = _buffer_names(model)
    with ema_swapped_in(ema, params):  # copied inside: on the CPU the gathered tensors may be the live ones
        gathered = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        state = {name: tensor.detach().clone() for name, tensor in gathered.items() if name not in buffers}
    return {**state, STEP_KEY: torch.tensor(ema.optimization_step, dtype=torch.int64)}


def load_full_ema_state(model: torch.nn.Module, params: Sequence[torch.Tensor], ema, state: dict) -> None:
    """Load ``full_ema_state``'s dict (every process passes it) into the EMA of ``params`` in this run's layout
    (each process keeps its shard); an older checkpoint's position-keyed ``ema.{i}`` tensors load by position."""
    weights, model = {k: v for k, v in state.items() if k != STEP_KEY}, _unwrapped_deepspeed(model)
    if STEP_KEY in state:
        ema.optimization_step = int(state[STEP_KEY])
    with torch.no_grad():
        if weights and all(_POSITION_KEY.fullmatch(k) for k in weights):
            for i, shadow in enumerate(ema.shadow_params):
                shadow.copy_(weights[f"ema.{i}"])
            return
        with ema_swapped_in(ema, params):  # the live weights come back after; the loaded EMA is read inside
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            for p, shadow in zip(params, ema.shadow_params):
                _local(shadow).copy_(_local(p))
