"""The app's config: which models, checkpoints, rewards and runs it offers, its limits and its server.

With no file the app runs on the embedded toy world (``toy/digits`` and the toy rewards). A YAML file
points it at real models::

    models: [stabilityai/stable-diffusion-3.5-medium]
    dtype: bfloat16
    checkpoints: [outputs/sd35_pickscore/final]
    runs_root: outputs
    rewards: [pickscore, hpsv2.1, clipscore]
    default_rewards: [pickscore]
    limits: {max_steps: 40, max_batch: 4}
    server: {concurrency: 1}

The app is closed by default: a visitor may name only what the config lists (and the runs and LoRAs found under
``runs_root``); ``allow_custom_paths: true`` opens it to folders under ``runs_root`` and ``model_roots``, hub ids
and every registered reward. Bad input raises ``ConfigError`` with one line naming the key, as for the training
configs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, bounded, load_config
from .limits import Limits

TOY_REWARDS = ["toy/bold_digit", "toy/classifier", "toy/digit_match", "toy/ink", "toy/centered", "toy/clipscore"]
TOY_PROMPTS = ["a handwritten seven", "the digit 3", "a bold number two"]


@dataclass
class ServerConfig:
    host: str = bounded("127.0.0.1", doc="bind address; 0.0.0.0 exposes the app to the network")
    port: int = bounded(7860, min=0, max=65535, doc="0: a free port")
    concurrency: int = bounded(1, min=1, doc="requests computed at once (queue default_concurrency_limit)")
    max_queue: int = bounded(64, min=1, doc="requests waiting at most; more are turned away")
    work_dir: str | None = bounded(None, doc="where result files go (default: a new temporary folder)")
    max_request_bytes: int = bounded(1 << 20, min=1024, doc="request bodies larger than this are refused unread")


@dataclass
class AppConfig:
    models: list[str] = bounded(["toy/digits"], doc="base models offered (toy/digits, hub ids, local folders)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = bounded(None, doc="torch device (default: accelerate's choice)")
    local_files_only: bool = False
    checkpoints: list[str] = bounded([], doc="LoRA folders offered (flowalign train writes OUTPUT/final)")
    runs_root: str = bounded("outputs", doc="training runs and their final/ LoRAs are found under it")
    allow_custom_paths: bool = bounded(False, doc="the page may also name runs and checkpoints under runs_root, "
                                       "models under model_roots, hub ids and any registered reward")
    model_roots: list[str] = bounded([], doc="with allow_custom_paths: folders whose local models may be named")
    max_loaded_models: int = bounded(2, min=1, max=64, doc="base models kept loaded; the least recently used is "
                                     "freed to make room")
    rewards: list[str] = bounded(list(TOY_REWARDS), doc="rewards offered in the page")
    default_rewards: list[str] = bounded(["toy/bold_digit", "toy/classifier"])
    prompts: list[str] = bounded(list(TOY_PROMPTS), doc="example prompts")
    steps: int | None = bounded(8, min=1, doc="default sampling steps (null: the model's default)")
    guidance: float | None = bounded(None, min=0.0, doc="default CFG scale (null: the model's default)")
    lr: float = bounded(5.0, min=0.0, doc="default ReNO / CARINOX learning rate")
    iterations: int = bounded(15, min=1, doc="default ReNO / CARINOX iterations, best-of-N candidates")
    display_size: int = bounded(256, min=16, doc="small images are upscaled (nearest) to this side for viewing")
    limits: Limits = field(default_factory=Limits)
    server: ServerConfig = field(default_factory=ServerConfig)

    def check(self) -> "AppConfig":
        """Cross-field checks, one line each."""
        if not self.models:
            raise ConfigError("app config: models: give at least one base model")
        if not self.rewards:
            raise ConfigError("app config: rewards: give at least one reward")
        missing = [r for r in self.default_rewards if r not in self.rewards]
        if missing:
            raise ConfigError(f"app config: default_rewards: '{missing[0]}' is not in rewards")
        for key in ("steps", "iterations"):
            cap = getattr(self.limits, f"max_{key}")
            if getattr(self, key) is not None and getattr(self, key) > cap:
                raise ConfigError(f"app config: {key}: {getattr(self, key)} is above limits.max_{key} ({cap})")
        return self


def load_app_config(path: str | Path | None = None, overrides: list[str] = ()) -> AppConfig:
    """The app config from YAML (or the toy default) with ``key=value`` overrides, validated."""
    return load_config(path, list(overrides), cls=AppConfig).check()
