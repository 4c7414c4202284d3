"""Loaded generators, LoRA checkpoints and rewards, shared by every request of the app.

A generator is loaded once per name and guarded by a lock: LoRA adapters are switched on the shared
module, so a request holds the lock while it computes with a given adapter state (and takes it again,
setting the state afresh, after each streamed step).
"""
from __future__ import annotations

import gc
import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FlowalignError
from ..generators.base import Generator
from ..sharing import LORA_FILE

MAX_ADAPTERS = 8  # LoRAs kept loaded per model


@dataclass
class LoadedModel:
    """A generator, its lock and the LoRA adapters loaded into its trainable module (key -> name)."""

    generator: Generator
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, str] = field(default_factory=dict)


def check_lora_folder(folder: str) -> Path:
    """The folder of a diffusers-format LoRA (``flowalign train`` writes ``OUTPUT/final``), or one sentence."""
    path = Path(str(folder or "").strip()).expanduser()
    if not str(folder or "").strip():
        raise FlowalignError("checkpoint: empty folder name")
    if not path.is_dir():
        raise FlowalignError(f"checkpoint '{folder}': no such folder")
    if not (path / LORA_FILE).is_file():
        raise FlowalignError(f"checkpoint '{folder}': no {LORA_FILE} there (expected a LoRA folder such as "
                             "OUTPUT/final written by flowalign train)")
    return path.resolve()


class ModelCache:
    """Generators by name and rewards by name, loaded on first use and kept up to ``max_models`` generators and
    ``max_rewards`` rewards: beyond that the least recently used (a generator: one no request is computing with)
    is freed."""

    def __init__(self, dtype: str = "float32", device: str | None = None, local_files_only: bool = False,
                 max_models: int = 2, max_rewards: int = 8):
        self.dtype, self.device, self.local_files_only = dtype, device, local_files_only
        self.max_models, self.max_rewards = max_models, max_rewards
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._rewards: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def model(self, name: str) -> LoadedModel:
        """The loaded generator ``name`` (toy/digits, a hub id or a local folder)."""
        name = str(name or "").strip()
        if not name:
            raise FlowalignError("model: choose a base model")
        with self._lock:
            if name not in self._models:
                from ..generators import load_generator

                self._evict(self._models, self.max_models - 1, busy=lambda m: m.lock.locked())
                gen = load_generator(name, self.dtype, device=self.device, local_files_only=self.local_files_only)
                self._models[name] = LoadedModel(gen)
            self._models.move_to_end(name)
            current = self._models[name]
            self._evict(self._models, self.max_models, busy=lambda m: m is current or m.lock.locked())
            return current

    def reward(self, name: str, device: torch.device | None = None):
        """The reward ``name`` from the registry (built-ins, toy rewards, plug-ins), frozen, on ``device``."""
        from .. import rewards
        key = f"{name}@{device}"
        with self._lock:
            if key not in self._rewards:
                self._evict(self._rewards, self.max_rewards - 1)
                reward = rewards.load(name)
                if device is not None:
                    reward = reward.to(device)
                reward.requires_grad_(False)
                self._rewards[key] = reward
            self._rewards.move_to_end(key)
            return self._rewards[key]

    def loaded(self) -> list[str]:
        """The names of the generators held now, least recently used first."""
        return list(self._models)

    @staticmethod
    def _evict(held: OrderedDict, keep: int, busy=lambda _: False) -> None:
        """Free the least recently used entries until at most ``keep`` remain (skipping busy ones)."""
        stale = [k for k in held if not busy(held[k])][:max(0, len(held) - keep)]
        for key in stale:
            del held[key]
        if stale:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def weighted(self, weights: dict[str, float], device: torch.device | None = None):
        """A weighted composite of cached rewards (a new composite per request: it keeps per-call state)."""
        from ..rewards import CompositeReward

        if not weights:
            raise FlowalignError("rewards: choose at least one reward")
        return CompositeReward({n: self.reward(n, device) for n in weights}, weights)


def adapter_key(folder: Path) -> str:
    """A loaded LoRA's identity: its folder and the time its weights were written (a rerun reloads it)."""
    return f"{folder}@{(folder / LORA_FILE).stat().st_mtime_ns}"


def load_adapters(model: LoadedModel, folders: list[Path], keep: int = MAX_ADAPTERS) -> dict[Path, str]:
    """Load each LoRA folder once into the model (call with ``model.lock`` held) and return its adapter
    name; beyond ``keep`` loaded adapters, the oldest ones not asked for now are unloaded."""
    module = model.generator.trainable_module
    keys = {folder: adapter_key(folder) for folder in folders}
    prefix = model.generator.lora_format[1]
    for folder, key in keys.items():
        if key in model.adapters:
            continue
        name = "ckpt_" + hashlib.sha1(key.encode()).hexdigest()[:16]  # peft names may not contain dots
        try:
            module.load_lora_adapter(str(folder), prefix=prefix, adapter_name=name, weight_name=LORA_FILE)
        except Exception as err:  # a LoRA of another model, a damaged file, ...
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise FlowalignError(f"checkpoint '{folder}': cannot load it into {prefix} ({first})") from None
        model.adapters[key] = name
    wanted = set(keys.values())
    stale = [k for k in model.adapters if k not in wanted][:max(0, len(model.adapters) - keep)]
    if stale:
        module.delete_adapters([model.adapters.pop(k) for k in stale])
    return {folder: model.adapters[key] for folder, key in keys.items()}


def activate(model: LoadedModel, adapter: str | None, scale: float = 1.0) -> None:
    """Switch the shared module to the base (``adapter=None``) or to one LoRA at ``scale`` (lock held)."""
    module = model.generator.trainable_module
    if not model.adapters:
        if adapter is not None:
            raise FlowalignError(f"checkpoint adapter '{adapter}' is not loaded")
        return
    if adapter is None:
        module.disable_adapters()
        return
    if adapter not in model.adapters.values():
        raise FlowalignError("the checkpoint was unloaded to make room for others; run again")
    module.enable_adapters()
    module.set_adapters([adapter], weights=[float(scale)])


@contextmanager
def using(model: LoadedModel, adapter: str | None = None, scale: float = 1.0):
    """Hold the model's lock with the given adapter state; the base state is restored on the way out."""
    with model.lock:
        activate(model, adapter, scale)
        try:
            yield model.generator
        finally:
            if adapter is not None:
                activate(model, None)
