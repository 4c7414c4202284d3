"""What a visitor may name: closed by default (only the models, checkpoints, runs and rewards the config lists or
finds under ``runs_root``); with ``allow_custom_paths: true``, also runs and checkpoints under ``runs_root``,
local models under ``model_roots`` and hub ids. A refusal is the same sentence whether or not the path exists,
so the page reveals nothing about the machine's folders."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import FlowalignError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def under(value: str, roots: list[str]) -> bool:
    """Whether ``value``, resolved (``..`` and symlinks followed), lies inside one of ``roots``."""
    try:
        path = Path(value).expanduser().resolve()
        return any(path.is_relative_to(Path(root).expanduser().resolve()) for root in roots)
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
        return False


def _local(value: str) -> bool:
    """Whether a model name would be read from disk (what the loader does when the path exists)."""
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1 or ".." in value:
        return True
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return True


class Access:
    """The allow-list of one app: ``check_*`` raise one sentence for anything a visitor may not name."""

    def __init__(self, cfg):
        self.cfg = cfg

    def refuse(self, kind: str, value: str) -> FlowalignError:
        shown = value if len(value) <= 120 else value[:117] + "..."
        return FlowalignError(f"{kind} '{shown}': not offered by this app")

    def check_model(self, name: str) -> None:
        name = str(name or "").strip()
        if not name or name in self.cfg.models:
            return
        if not self.cfg.allow_custom_paths or name.startswith("toy/"):
            raise self.refuse("model", name)
        if _local(name) and not under(name, self.cfg.model_roots):
            raise self.refuse("model", name)
        if not _local(name) and not HUB_ID.match(name):
            raise self.refuse("model", name)

    def check_folder(self, kind: str, value: str, offered: list[str]) -> None:
        """A checkpoint or run: one that is offered, or (custom paths on) any folder under ``runs_root``."""
        value = str(value or "").strip()
        if not value or value in offered:
            return
        if not (self.cfg.allow_custom_paths and under(value, [self.cfg.runs_root])):
            raise self.refuse(kind, value)

    def check_rewards(self, names: list[str]) -> None:
        """Rewards the config lists (any registered reward once custom paths are allowed)."""
        if self.cfg.allow_custom_paths:
            return
        for name in names:
            if name not in self.cfg.rewards:
                raise self.refuse("reward", name)
