"""Experiment trackers (``train.report_to``) through accelerate: tensorboard, wandb, trackio, all or none.

accelerate starts, logs to and finishes the trackers; this file names them, checks that they are installed before
anything loads, keeps each one's files with the run, and draws images for each (accelerate has no image call for
trackio, and its wandb one wants a list).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..config import ConfigError, config_dict

TRACKERS = ("tensorboard", "wandb", "trackio")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def installed(name: str) -> bool:
    """Whether the tracker's package imports here (without importing it)."""
    return importlib.util.find_spec(name) is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers ``report_to`` names: one, ``all`` (each of the three that is installed) or ``none``."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if installed(name)]
    return [report_to]


def check_trackers(report_to: str) -> None:
    """A tracker that is not installed: one line naming the extra that installs it (before anything loads)."""
    for name in tracker_names(report_to):
        if not installed(name):
            raise ConfigError(f"train.report_to: {name} is not installed (pip install 'flowalign[{EXTRAS[name]}]', "
                              f"or report_to=tensorboard / none)")


def init_kwargs(out: Path) -> dict[str, dict]:
    """Each tracker's run named after the output folder; wandb writes its run folder inside it (offline too)."""
    return {"wandb": {"dir": str(out), "name": out.name}, "trackio": {"name": out.name}}


def hyperparameters(cfg) -> dict[str, str | int | float | bool]:
    """The run's config (as its YAML holds it) flattened to ``section.key`` scalars, as trackers store them."""
    flat: dict[str, str | int | float | bool] = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (str, int, float, bool)) else str(value)

    visit("", config_dict(cfg))
    return flat


def log_image(acc, tag: str, image: torch.Tensor, step: int) -> None:
    """One image ``[3,H,W]`` in [0, 1] to every active tracker (main process)."""
    if not acc.is_main_process:
        return
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # HWC, as all take
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, pixels, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({tag: wandb.Image(pixels)}, step=step)
        elif tracker.name == "trackio":
            import trackio

            tracker.run.log({tag: trackio.Image(pixels)}, step=step)


def log_report(acc, report: Path, step: int) -> None:
    """The report's figures (before/after grids, reward curve, monitor) to the trackers at the last step."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    for name in ("before", "after", "reward_curve", "monitor"):
        if (report / f"{name}.png").is_file() and acc.trackers:
            with Image.open(report / f"{name}.png") as image:
                log_image(acc, f"report/{name}", pil_to_tensor(image.convert("RGB")).float() / 255, step)
