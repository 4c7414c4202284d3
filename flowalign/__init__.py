"""flowalign: align diffusion and flow-matching generators of images, video and music to reward models."""
from .errors import FlowalignError
from .generators import Conditioning, Generator, load_generator
from .inference import generate

__version__ = "0.1.0"
__all__ = ["Conditioning", "FlowalignError", "Generator", "generate", "load_generator"]
