"""flowalign: align diffusion and flow-matching generators of images, video and music to reward models."""
from .errors import FlowalignError
from .generators import Conditioning, Generator, load_generator
from .inference import generate
from .optimize import optimize, optimize_iter  # binds the function over the submodule's name (import it first)


def train(config=None, overrides=(), resume=None, **kw):
    """Run a training job from a YAML config (or a RunConfig); see ``flowalign.training.run.train``."""
    from .training.run import train as _train

    return _train(config, overrides, resume, **kw)


__version__ = "0.1.0"
__all__ = ["Conditioning", "FlowalignError", "Generator", "generate", "load_generator", "optimize", "optimize_iter",
           "train"]
