"""Train (view): read a training run's output folder: its logged metrics and its sample grids.

``flowalign train`` writes ``OUTPUT/`` with tensorboard event files (``flowalign/events.out.tfevents.*``:
``reward/mean``, ``reward/std``, per-reward ``reward/NAME``, losses, timings; a ``samples`` image every
checkpoint), ``report/`` (``before.png``, ``after.png``, ``reward_curve.png``, ``monitor.png``, ``metrics.json``
with the history), ``checkpoints/`` and ``final/`` (the LoRA). Event files are read first; ``metrics.json``'s
history stands in when there are none.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FlowalignError
from .models import LORA_FILE

EVENTS = "events.out.tfevents.*"
MAX_DEPTH = 4


@dataclass
class RunView:
    """What the Train tab shows of one run."""

    folder: Path
    scalars: dict[str, list[tuple[int, float]]]          # tag -> (step, value)
    images: list[tuple[object, str]] = field(default_factory=list)  # (PIL image, caption)
    summary: dict[str, object] = field(default_factory=dict)

    def reward_rows(self) -> list[tuple[int, float, str]]:
        """(step, value, tag) of every ``reward/*`` scalar, for the reward-curve plot."""
        return [(s, v, tag) for tag, points in self.scalars.items() if tag.startswith("reward/") for s, v in points]

    def last_values(self) -> list[list]:
        """One row per scalar: tag, last step, last value."""
        return [[tag, points[-1][0], round(points[-1][1], 6)] for tag, points in sorted(self.scalars.items())]


def _walk(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` at most ``MAX_DEPTH`` folders below ``root`` (no unbounded scans)."""
    found = []
    for depth in range(MAX_DEPTH + 1):
        found += sorted(root.glob("/".join(["*"] * depth + [pattern])))
    return found


def find_runs(root: str | Path) -> list[str]:
    """Run folders under ``root``: those holding ``report/metrics.json`` or a folder of event files."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = {p.parent.parent for p in _walk(root, "report/metrics.json")}
    runs |= {p.parent.parent for p in _walk(root, EVENTS) if (p.parent.parent / "checkpoints").is_dir()
             or (p.parent.parent / "final").is_dir()}
    return sorted(str(r) for r in runs)


def find_checkpoints(root: str | Path) -> list[str]:
    """LoRA folders (``*/final`` with ``pytorch_lora_weights.safetensors``) under ``root``."""
    root = Path(root)
    return sorted(str(p.parent) for p in _walk(root, f"final/{LORA_FILE}")) if root.is_dir() else []


def read_scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[object, str]]]:
    """Scalars and ``samples`` images from every tensorboard event folder under ``folder``."""
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: list[tuple[object, str]] = []
    for events_dir in sorted({p.parent for p in _walk(folder, EVENTS)}):
        acc = ea.EventAccumulator(str(events_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            points = scalars.setdefault(tag, [])
            points += [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in (t for t in tags.get("images", []) if not t.startswith("report/")):  # the report's own files
            for e in acc.Images(tag):
                image = Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")
                images.append((image, f"{tag} · iteration {e.step}"))
    for tag, points in scalars.items():  # a resumed run logs some steps twice: keep the latest of each
        scalars[tag] = sorted(dict(points).items())
    return scalars, images


def read_run(folder: str | Path) -> RunView:
    """The metrics, sample grids and summary of a ``flowalign train`` output folder, or one sentence."""
    from PIL import Image

    path = Path(str(folder or "").strip()).expanduser()
    if not str(folder or "").strip():
        raise FlowalignError("run: choose a training output folder")
    if not path.is_dir():
        raise FlowalignError(f"run '{folder}': no such folder")
    scalars, images = read_scalars(path)
    metrics_file = path / "report" / "metrics.json"
    summary: dict[str, object] = {}
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            raise FlowalignError(f"run '{folder}': report/metrics.json is not valid JSON") from None
        history = metrics.pop("history", [])
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "final"}
        if not scalars:
            for row in history:
                for tag, value in row.items():
                    if tag != "iteration" and isinstance(value, (int, float)):
                        scalars.setdefault(tag, []).append((int(row["iteration"]), float(value)))
    for name in ("before.png", "after.png", "reward_curve.png", "monitor.png"):
        if (path / "report" / name).is_file():
            images.append((Image.open(path / "report" / name).convert("RGB"), f"report/{name}"))
    if not scalars and not images:
        raise FlowalignError(f"run '{folder}': no tensorboard event files or report/ there "
                             "(expected an output folder of flowalign train)")
    summary["final LoRA"] = str(path / "final") if (path / "final" / LORA_FILE).is_file() else "none yet"
    iterations = max((p[-1][0] + 1 for p in scalars.values() if p), default=0)
    summary["iterations logged"] = iterations
    return RunView(path, scalars, images, summary)
