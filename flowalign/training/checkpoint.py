"""Checkpoints: atomic (written to a temporary folder, then renamed), verified, limited in number, resumable.

A checkpoint holds the trainable weights (LoRA only where LoRA is trained) as safetensors, the optimizer
state, the EMA weights, the loop's state (iteration, running statistics) as JSON, and last a manifest: every
file's size and SHA-256 and the config that shaped the weights. A folder whose files do not match its manifest
is corrupt; ``latest`` skips it with a warning. Every random draw of the loop derives from (seed, iteration),
so no RNG state is needed for a bitwise-exact resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import FlowalignError

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"


class CheckpointError(FlowalignError):
    """A checkpoint could not be written, or is incomplete, corrupt, or does not fit this run."""


def save_checkpoint(root: str | Path, iteration: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, ema: dict[str, torch.Tensor] | None = None, limit: int = 3,
                    config: dict | None = None) -> Path:
    """Write ``root/checkpoint-{iteration}`` atomically and keep the newest ``limit`` checkpoints. A failed write
    (disk full, unwritable folder) removes its temporary folder and leaves every earlier checkpoint as it was."""
    root = Path(root)
    final = root / f"{PREFIX}{iteration}"
    tmp = root / f".tmp-{PREFIX}{iteration}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_files(tmp, iteration, weights, optimizer_state, state, ema, config)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_folder(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(root) if p != final]
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {final}: {err.strerror or err} ({kept})") from None
    except BaseException:  # a second Ctrl-C mid-write: the half-written folder goes, the earlier ones stay
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(folder: Path, iteration: int, weights: dict, optimizer_state: dict, state: dict,
                 ema: dict | None, config: dict | None) -> None:
    """The checkpoint's files, each synced to disk, the manifest last (its presence marks a complete folder)."""
    save_file({k: v.contiguous().cpu() for k, v in sorted(weights.items())}, folder / "weights.safetensors")
    if ema:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, folder / "ema.safetensors")
    torch.save(optimizer_state, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"iteration": iteration, **state}))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())}
    (folder / MANIFEST).write_text(json.dumps({"files": files, "config": config or {}}, indent=1, sort_keys=True))
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make a rename or new entries in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (a half-written one is a ``.tmp-`` folder and never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (no manifest, a file missing, of another size or
    checksum), or None when every file matches its manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by a flowalign without manifests)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not readable"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def resolve(root: str | Path, which: str, warn: Callable[[str], None] = print) -> Path | None:
    """``latest`` -> the newest intact checkpoint under ``root``, warning about each newer one skipped (None if
    there is none at all; a one-line error if there are some but none is intact); else the named folder, which
    must be intact."""
    if which == "latest":
        found = list_checkpoints(root)
        skipped = []
        for path in reversed(found):
            why = problem(path)
            if why is None:
                return path
            warn(f"flowalign: warning: skipping {path}: {why}")
            skipped.append(path.name)
        if skipped:
            raise CheckpointError(f"no intact checkpoint under {root} ({', '.join(skipped)} skipped); move them away "
                                  "to start from scratch")
        return None
    path = Path(which)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: '{which}' is not a checkpoint folder")
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"resume_from_checkpoint: {path}: {why}")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict, dict | None]:
    """Weights, optimizer state, loop state and EMA weights (None if absent) of a checkpoint; a one-line
    CheckpointError if a file does not load or a weight is not finite."""
    path = Path(path)
    try:
        weights = load_file(path / "weights.safetensors")
        ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and json each raise their own types
        raise CheckpointError(f"{path}: does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]})") \
            from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int) or state["iteration"] < 0:
        raise CheckpointError(f"{path}/state.json: expected an object with a non-negative integer 'iteration'")
    for name, tensor in [*weights.items(), *(ema or {}).items()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight '{name}' is not finite")
    return weights, optimizer, state, ema


def read_manifest_config(path: str | Path) -> dict:
    """The config recorded in a checkpoint's manifest (empty if none)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def shaping_config(cfg, lora_targets: list[str]) -> dict:
    """What fixes the weights' names and shapes (model, method, LoRA rank, alpha and targets), and the whole run
    config, as recorded in a checkpoint's manifest."""
    import dataclasses

    t = cfg.train
    shape = {"model.name": cfg.model.name, "model.options": cfg.model.options, "method": cfg.method,
             "train.lora_rank": t.lora_rank, "train.lora_alpha": t.lora_alpha, "lora_targets": sorted(lora_targets)}
    return {"shape": json.loads(json.dumps(shape, default=str)),
            "run": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


def check_fits(path: Path, saved: dict[str, torch.Tensor], current: dict[str, tuple[int, ...]],
               saved_config: dict, this_config: dict) -> None:
    """A one-line CheckpointError if the checkpoint's weights do not have this run's names and shapes, naming
    the first weight that differs and the shaping settings that changed."""
    changed = [f"{k}={saved_config.get('shape', {}).get(k)!r} there, {v!r} here"
               for k, v in this_config["shape"].items()
               if k in saved_config.get("shape", {}) and saved_config["shape"][k] != v]
    why = f" (the checkpoint was made with {'; '.join(changed)})" if changed else ""
    for name, shape in current.items():
        if name not in saved:
            raise CheckpointError(f"{path} does not fit this run: it has no weight '{name}'{why}")
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(f"{path} does not fit this run: weight '{name}' has shape "
                                  f"{tuple(saved[name].shape)}, this run's {tuple(shape)}{why}")
    extra = [name for name in saved if name not in current]
    if extra:
        raise CheckpointError(f"{path} does not fit this run: unexpected weight '{extra[0]}'{why}")
