"""The Gradio app: compare base vs aligned checkpoints, optimise noise live, view training runs.

``flowalign app [--config FILE] [--host H] [--port P]`` starts it; with no config it runs on the toy
world. ``compare``, ``optimise`` and ``runs`` are plain functions (no gradio); only ``ui`` imports
gradio, and only when the app is built, so ``flowalign`` works without it.
"""
from __future__ import annotations

from .config import AppConfig, load_app_config
from .limits import Limits

__all__ = ["AppConfig", "Limits", "load_app_config", "build_app", "serve"]


def _gradio():
    """The ui module, or one line saying how to install gradio."""
    try:
        from . import ui
    except ImportError as err:
        if "gradio" not in str(err) and "pandas" not in str(err):
            raise
        from ..errors import FlowalignError

        raise FlowalignError("the app needs gradio: pip install 'flowalign[app]'") from None
    return ui


def build_app(cfg: AppConfig | None = None):
    """The ``gr.Blocks`` of the app for ``cfg`` (the toy default when None), queued, not yet launched."""
    return _gradio().build_app(cfg or load_app_config())


def serve(cfg: AppConfig | None = None, block: bool = True, quiet: bool = False):
    """Build and launch the app on ``cfg.server.host:port``."""
    return _gradio().launch(cfg or load_app_config(), block=block, quiet=quiet)
