"""Generator adapters behind one interface; ``load_generator`` picks one from a name, hub id or folder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FlowalignError
from ..files import read_json
from .base import Conditioning, Generator
from .prompt_cache import PromptCache

__all__ = ["Conditioning", "Generator", "PromptCache", "load_generator", "toy_world"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: diffusers pipeline class (``_class_name`` in ``model_index.json``) -> ``"module:Adapter"`` in this package.
#: Each adapter class has ``from_pretrained(path, dtype=, device=, local_files_only=)``.
ADAPTERS: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3:SD3Generator",
    "StableDiffusionPipeline": "sd:StableDiffusionGenerator",  # SD 1.x and 2.x
    "StableDiffusionXLPipeline": "sdxl:StableDiffusionXLGenerator",
    "FluxPipeline": "flux:FluxGenerator",
    "FluxKontextPipeline": "flux_kontext:FluxKontextGenerator",  # image editing: a source image per prompt
    "WanPipeline": "wan:WanGenerator",  # Wan 2.1 and 2.2 A14B (two experts)
    "StableAudioPipeline": "stable_audio:StableAudioGenerator",
    "QwenImagePipeline": "qwen_image:QwenImageGenerator",
    "QwenImageEditPipeline": "qwen_image_edit:QwenImageEditGenerator",  # image editing
    "Flux2KleinPipeline": "flux2:Flux2KleinGenerator",
    "Flux2Pipeline": "flux2:Flux2Generator",  # FLUX.2 [dev]
    "ZImagePipeline": "z_image:ZImageGenerator",
    "HunyuanVideo15Pipeline": "hunyuan_video15:HunyuanVideo15Generator",
    "LTX2Pipeline": "ltx2:LTX2Generator",  # video with its audio
}


def load_generator(name_or_path: str = "toy/digits", dtype: str | torch.dtype = "float32",
                   device: str | None = None, local_files_only: bool = False, **options) -> Generator:
    """``toy/digits`` (shipped), a toy folder, or a diffusers pipeline (hub id or local directory).
    ``options`` go to a pipeline adapter's constructor (``height``, ``num_frames``, ``train_expert``, ...).
    A folder with broken files (a truncated safetensors, invalid JSON) is one line naming the model."""
    try:
        Path(name_or_path).exists()
    except (OSError, ValueError) as err:  # too long to be a path, or a NUL byte
        raise FlowalignError(f"model '{name_or_path[:80]}': not a usable name or folder "
                             f"({getattr(err, 'strerror', None) or err})") from None
    try:
        return _load(name_or_path, DTYPES[dtype] if isinstance(dtype, str) else dtype, device, local_files_only,
                     **options)
    except (FlowalignError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - diffusers, safetensors and json each raise their own types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise FlowalignError(f"model '{name_or_path}': cannot load it ({type(err).__name__}: {first})") from None


def _load(name_or_path: str, dtype: torch.dtype, device: str | None, local_files_only: bool,
          **options) -> Generator:
    if name_or_path == "toy/video" or _toy_transformer(name_or_path) == "WanTransformer3DModel":
        from .toy_video import SHIPPED as VIDEO_WEIGHTS
        from .toy_video import ToyVideoGenerator

        if set(options) - {"num_frames", "size"}:
            raise FlowalignError(f"model '{name_or_path}': unknown option "
                                 f"'{sorted(set(options) - {'num_frames', 'size'})[0]}' "
                                 "for the toy video model (allowed: num_frames, size)")
        return ToyVideoGenerator.from_pretrained(VIDEO_WEIGHTS if name_or_path == "toy/video" else name_or_path,
                                                 device=device, dtype=dtype, **options)
    if name_or_path == "toy/music" or (Path(name_or_path) / "toy_music.json").is_file():  # the music build's marker
        from .toy_music import SHIPPED as MUSIC_WEIGHTS
        from .toy_music import ToyMusicGenerator

        if options:
            raise FlowalignError(f"model '{name_or_path}': the toy music model takes no options, got {sorted(options)}")
        return ToyMusicGenerator.from_pretrained(MUSIC_WEIGHTS if name_or_path == "toy/music" else name_or_path,
                                                 device=device, dtype=dtype)
    if name_or_path == "toy/digits" or (Path(name_or_path) / "text_encoder" / "config.json").is_file() \
            and not (Path(name_or_path) / "model_index.json").is_file():
        from .toy_digits import SHIPPED, ToyDigitsGenerator

        if options:
            raise FlowalignError(f"model '{name_or_path}': the toy model takes no options, got {sorted(options)}")

        return ToyDigitsGenerator.from_pretrained(SHIPPED if name_or_path == "toy/digits" else name_or_path,
                                                  device=device, dtype=dtype)
    if name_or_path.startswith("toy/"):
        raise FlowalignError(f"model '{name_or_path}': unknown toy model (available: toy/digits, toy/video, toy/music)")
    pipeline_class = _pipeline_class(name_or_path, local_files_only)
    if pipeline_class not in ADAPTERS:
        raise FlowalignError(f"model '{name_or_path}': pipeline class {pipeline_class} has no adapter yet "
                             f"(supported: {', '.join(sorted(ADAPTERS))}, toy/digits)")
    import importlib

    module_name, class_name = ADAPTERS[pipeline_class].split(":")
    adapter = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    _check_options(adapter, options, name_or_path)
    return adapter.from_pretrained(name_or_path, dtype=dtype, device=device, local_files_only=local_files_only,
                                   **options)


#: Pipelines that edit a source image: every prompt needs ``metadata["image"]``.
EDITING = {"FluxKontextPipeline", "QwenImageEditPipeline"}


def edits_images(name_or_path: str, local_files_only: bool = False) -> bool:
    """Whether a model edits source images (reads only its ``model_index.json``; False for toys and unreadable
    names, whose errors come when they load)."""
    if toy_world(name_or_path) is not None or name_or_path.startswith("toy/"):
        return False
    try:
        return _pipeline_class(name_or_path, local_files_only) in EDITING
    except FlowalignError:
        return False


def toy_world(name_or_path: str) -> str | None:
    """The toy world (``digits``, ``video``, ``music``) a model name or folder is, None for a real pipeline; reads
    only small files, so runs can be checked before any weights load."""
    if name_or_path in ("toy/digits", "toy/video", "toy/music"):
        return name_or_path.removeprefix("toy/")
    if (Path(name_or_path) / "toy_music.json").is_file():
        return "music"
    transformer = _toy_transformer(name_or_path)
    if transformer is not None:
        return "video" if transformer == "WanTransformer3DModel" else "digits"
    return None


def _check_options(adapter: type, options: dict, name_or_path: str) -> None:
    """One clear line for an option the adapter's constructor does not take."""
    import inspect

    allowed = [p for p in inspect.signature(adapter.__init__).parameters if p not in ("self", "pipe", "device")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FlowalignError(f"model '{name_or_path}': unknown option '{unknown[0]}' for {adapter.__name__} "
                             f"(allowed: {', '.join(allowed) or 'none'})")


def _toy_transformer(name_or_path: str) -> str | None:
    """The transformer class of a toy model folder (``text_encoder/``, no ``model_index.json``), else None."""

    folder = Path(name_or_path)
    config = folder / "transformer" / "config.json"
    if (folder / "model_index.json").is_file() or not (folder / "text_encoder" / "config.json").is_file() \
            or not config.is_file():
        return None
    return read_json(config, f"model '{name_or_path}'").get("_class_name")


def _pipeline_class(name_or_path: str, local_files_only: bool) -> str:
    """The ``_class_name`` in a pipeline's ``model_index.json`` (local folder or hub id)."""

    index = Path(name_or_path) / "model_index.json"
    if not index.is_file():
        if Path(name_or_path).exists() or name_or_path.startswith((".", "/")):
            raise FlowalignError(f"model '{name_or_path}': no model_index.json there "
                                 "(expected a diffusers pipeline folder, a hub id or toy/digits)")
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(name_or_path, "model_index.json", local_files_only=local_files_only))
        except Exception as err:  # network, missing repo, offline cache miss
            raise FlowalignError(f"model '{name_or_path}': cannot read model_index.json "
                                 f"({type(err).__name__})") from None
    return read_json(index, f"model '{name_or_path}'").get("_class_name", "?")
