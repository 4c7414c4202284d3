"""The optimizer's and the EMA's whole state under FSDP, for tests/test_distributed.py; not a pytest module.

    torchrun --nproc_per_node 2 tests/dist_state_worker.py OUT     # FSDP2 (fully_shard) over gloo
    python tests/dist_state_worker.py OUT [SAVED]                  # one process, a plain module (resuming SAVED)

Two Adam steps on a small seeded model, each followed by an EMA step (diffusers' ``EMAModel`` over the sharded
parameters), then the full optimizer state (``flowalign.training.state``), the full EMA
(``flowalign.training.ema_state``) and the full weights are saved; a fresh model loads them and takes a third step,
as does the model that never stopped. Writes ``OUT/world{W}.pt`` with both third-step weights and EMAs (full) and
the saved optimizer and EMA states (main process).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowalign.training.ema_state import full_ema_state, load_full_ema_state  # noqa: E402
from flowalign.training.state import full_optimizer_state, load_full_optimizer_state  # noqa: E402


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def build_ema(model):
    from diffusers.training_utils import EMAModel

    return EMAModel(list(model.parameters()), decay=0.9)


def step(model, optimizer, ema, k: int) -> None:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(k))
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.step(list(model.parameters()))


def full_ema_weights(model, ema) -> dict[str, torch.Tensor]:
    """The EMA's full weights by parameter name, read directly (a sharded tensor's ``full_tensor``)."""
    return {name: (shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow).detach().clone()
            for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params)}


def full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def main(out: Path, saved_file: Path | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model, optimizer = build(world)
    ema = build_ema(model)
    step(model, optimizer, ema, 0)
    step(model, optimizer, ema, 1)
    saved = full_optimizer_state(model, optimizer)
    saved_ema = full_ema_state(model, list(model.parameters()), ema)
    weights = full_weights(model)
    if rank == 0:  # written at once: on the CPU the dicts share storage with the live state
        torch.save({"optimizer": saved, "weights": weights, "ema": saved_ema}, out / f"saved_world{world}.pt")
    step(model, optimizer, ema, 2)
    uninterrupted, uninterrupted_ema = full_weights(model), full_ema_weights(model, ema)
    if world > 1:
        dist.barrier()
    checkpoint = torch.load(saved_file or out / f"saved_world{world}.pt", weights_only=True)  # every process
    fresh, fresh_optimizer = build(world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(fresh, checkpoint["weights"], options=StateDictOptions(full_state_dict=True))
    load_full_optimizer_state(fresh, fresh_optimizer, checkpoint["optimizer"])
    fresh_ema = build_ema(fresh)
    load_full_ema_state(fresh, list(fresh.parameters()), fresh_ema, checkpoint["ema"])
    step(fresh, fresh_optimizer, fresh_ema, 2)
    resumed, resumed_ema = full_weights(fresh), full_ema_weights(fresh, fresh_ema)
    if rank == 0:
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "optimizer": checkpoint["optimizer"],
                    "uninterrupted_ema": uninterrupted_ema, "resumed_ema": resumed_ema, "ema": checkpoint["ema"],
                    "sharded": world > 1 and type(next(model.parameters())).__name__ == "DTensor"},
                   out / f"world{world}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
