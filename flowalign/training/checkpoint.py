"""Checkpoints: atomic (written to a temporary folder, then renamed), limited in number, resumable.

A checkpoint holds the trainable weights (LoRA only where LoRA is trained) as safetensors, the optimizer
state, the EMA weights and the loop's state (iteration, running statistics) as JSON. Every random draw of
the loop derives from (seed, iteration), so no RNG state is needed for a bitwise-exact resume.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def save_checkpoint(root: str | Path, iteration: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, ema: dict[str, torch.Tensor] | None = None, limit: int = 3) -> Path:
    """Write ``root/checkpoint-{iteration}`` atomically and keep the newest ``limit`` checkpoints."""
    root = Path(root)
    final = root / f"{PREFIX}{iteration}"
    tmp = root / f".tmp-{PREFIX}{iteration}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
    if ema:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a ``.tmp-`` folder and never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(root: str | Path, which: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint under ``root`` (None if there is none); else a path."""
    if which == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(which)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: '{which}' is not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict, dict | None]:
    """Weights, optimizer state, loop state and EMA weights (None if absent) of a checkpoint."""
    path = Path(path)
    ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    return (load_file(path / "weights.safetensors"), torch.load(path / "optimizer.pt", weights_only=True),
            json.loads((path / "state.json").read_text()), ema)
