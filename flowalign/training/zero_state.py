"""DeepSpeed ZeRO (stages 1 and 2): the optimizer's whole state and the fp32 master weights, gathered from every
process's partition and loaded back into any partitioning. DeepSpeed's tensor-fragment API does the gathering; the
result has the name-keyed layout torch's distributed state-dict API gives under DDP and FSDP, so one checkpoint
format serves every engine and resumes on any number of processes."""
from __future__ import annotations

import torch


def zero_optimizer(optimizer: torch.optim.Optimizer):
    """DeepSpeed's ZeRO optimizer behind accelerate's wrapper, or None under the other engines."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and type(inner).__module__.startswith("deepspeed.") else None


def set_micro_batch(accelerator, size: int) -> None:
    """DeepSpeed reads its micro-batch size from a data loader, and the trainer has none: ``size`` unless set."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = size


def partitions_only(zero) -> bool:
    """ZeRO stage 1 or 2: the optimizer is partitioned, each process still holds the whole model."""
    return zero is not None and type(zero).__name__ == "DeepSpeedZeroOptimizer"


def _named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def master_weights(engine) -> dict[str, torch.Tensor]:
    """The trainable parameters' fp32 master weights by state-dict name, on the CPU (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in _named(engine)}


def full_zero_state(engine, zero) -> dict:
    """Every trainable parameter's optimizer state (its tensors gathered from the partitions, the step count) and
    the parameter groups by name, on the CPU (a collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    names = {p: name for name, p in _named(engine)}
    base = zero.optimizer  # the torch optimizer over this process's flat fp32 partitions
    first = next(iter(base.state.values()), None)
    state = {}
    if first is not None:  # before the first step the torch optimizer has no state yet
        keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
        for group in zero.bit16_groups:
            for p in group:
                state[names[p]] = {"step": first["step"].detach().clone().cpu(),
                                   **{k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in params]}
              for g, params in zip(base.param_groups, zero.bit16_groups)]
    return {"state": state, "param_groups": groups}


def load_full_zero_state(engine, zero, state: dict, weights: dict[str, torch.Tensor]) -> None:
    """Load ``full_zero_state``'s dict (every process passes it): each process keeps its partition of the optimizer
    state, and the fp32 master weights become the checkpoint's ``weights`` (keyed as peft or the state dict names
    them), so a run under bf16 resumes from the exact masters, not from their bf16 copies."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved, base = state.get("state", {}), zero.optimizer
    named = _named(engine)
    for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        name = next((n for n, p in named if any(p is q for q in group) and n in saved), None)
        if name is not None:  # the torch optimizer's lazily created state, filled below
            base.state[flat] = {k: torch.zeros_like(flat) if v.dim() else v.clone() for k, v in saved[name].items()}
    if base.state:
        zero._lazy_init_hp_params_optimizer_state()  # DeepSpeed links the fragments after its first step
    for name, p in named:
        master = weights.get(name, weights.get(name.replace(".default.", "."), p.detach()))
        safe_set_full_fp32_param(p, master.to(p.device, torch.float32))
        for key, value in saved.get(name, {}).items():
            if value.dim():
                safe_set_full_optimizer_state(p, value.to(p.device), key)
    for group, saved_group in zip(base.param_groups, state.get("param_groups", [])):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
