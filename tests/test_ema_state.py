"""The training EMA's checkpoint state on one process (flowalign.training.ema_state): saved by parameter name with
its step counter, frozen parameters and buffers left out; both that and the older position-keyed ``ema.{i}`` form
load back; the EMA swapped into the live weights and out again. (Under FSDP2: tests/test_distributed.py.)"""
from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from flowalign.training.ema_state import STEP_KEY, ema_swapped_in, full_ema_state, load_full_ema_state


def model_and_ema(steps: int, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Parameter], EMAModel]:
    """A seeded model with a frozen layer and buffers; an EMA over its trainable parameters, stepped ``steps``
    times after a deterministic change of the weights each time."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=0.9)
    with torch.no_grad():
        for k in range(steps):
            for p in params:
                p.add_(0.1 * (k + 1))
            ema.step(params)
    return model, params, ema


def test_the_ema_is_saved_by_parameter_name_without_frozen_parameters_or_buffers():
    model, params, ema = model_and_ema(3)
    state = full_ema_state(model, params, ema)
    names = ["1.weight", "1.bias", "2.weight", "2.bias"]  # the trainable parameters, in model order
    assert set(state) == {*names, STEP_KEY} and int(state[STEP_KEY]) == 3
    assert all(torch.equal(state[name], shadow) for name, shadow in zip(names, ema.shadow_params))
    assert all(not torch.equal(state[name], p) for name, p in zip(names, params))  # the EMA, not the live weights


def test_name_keyed_and_position_keyed_ema_checkpoints_both_load():
    model, params, ema = model_and_ema(3)
    saved_new = full_ema_state(model, params, ema)
    saved_old = {f"ema.{i}": shadow.clone() for i, shadow in enumerate(ema.shadow_params)}
    for saved, step in ((saved_new, 3), (saved_old, 0)):  # the older form has no step counter
        fresh, fresh_params, fresh_ema = model_and_ema(0, seed=1)
        live = [p.detach().clone() for p in fresh_params]
        load_full_ema_state(fresh, fresh_params, fresh_ema, saved)
        assert all(torch.equal(a, b) for a, b in zip(fresh_ema.shadow_params, ema.shadow_params))
        assert fresh_ema.optimization_step == step
        assert all(torch.equal(a, b) for a, b in zip(fresh_params, live))  # the live weights are untouched


def test_the_ema_is_swapped_in_and_the_live_weights_come_back():
    _, params, ema = model_and_ema(2)
    live = [p.detach().clone() for p in params]
    with ema_swapped_in(ema, params):
        assert all(torch.equal(p, shadow) for p, shadow in zip(params, ema.shadow_params))
    assert all(torch.equal(p, saved) for p, saved in zip(params, live))
    with ema_swapped_in(None, params):
        assert all(torch.equal(p, saved) for p, saved in zip(params, live))
