"""Loading helpers the checkpoint plug-ins share: one-line load errors, finding a checkpoint file in a
folder or a hub repo, safe tensor loading, and pooled CLIP features (transformers 5 returns
``BaseModelOutputWithPooling`` from ``get_*_features``)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import InputSpec
from .errors import RewardError
from .preprocess import clip_preprocess


@contextmanager
def load_errors(name: str, path: str):
    """Turn any failure while loading into one RewardError line that names the reward and the path."""
    try:
        yield
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - every load failure reads the same way
        text = " ".join(str(err).split()) or type(err).__name__
        text = text if len(text) <= 300 else text[:297] + "..."
        raise RewardError(f"reward {name}: cannot load {path}: {text}") from err


def check_local(path: str) -> None:
    """Fail early, with a plain message, for a local path that does not exist (rather than a hub-id error)."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix in (".pt", ".pth",
                                                                                                 ".safetensors")
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError("no such file or folder")


def resolve_file(path: str, filename: str, local_files_only: bool) -> str:
    """A checkpoint file: ``path`` itself, ``path/filename`` for a folder, else ``filename`` from hub repo ``path``."""
    check_local(path)
    local = Path(path).expanduser()
    if local.is_file():
        return str(local)
    if local.is_dir():
        if not (local / filename).is_file():
            raise FileNotFoundError(f"no {filename} in {local}")
        return str(local / filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename, local_files_only=local_files_only)


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch pickle (``weights_only=True``: no code runs)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file, device="cpu")
    return torch.load(file, map_location="cpu", weights_only=True)


def load_clip(path: str, local_files_only: bool):
    """A frozen transformers ``CLIPModel`` on the CPU, in float32."""
    from transformers import CLIPModel

    check_local(path)
    model = CLIPModel.from_pretrained(path, local_files_only=local_files_only, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def pooled(output) -> torch.Tensor:
    """The projected features: ``.pooler_output`` in transformers 5, the tensor itself before."""
    return getattr(output, "pooler_output", output)


def clip_image_features(model, media: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of ``[B,3,H,W]`` media in [0,1] (tensor-only preprocessing)."""
    pixels = clip_preprocess(media, model.config.vision_config.image_size)
    return F.normalize(pooled(model.get_image_features(pixel_values=pixels)), dim=-1)


def clip_text_features(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings, prompts truncated to the text model's context."""
    length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=length, return_tensors="pt")
    tokens = {k: v.to(model.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return F.normalize(pooled(model.get_text_features(**tokens)), dim=-1)


def square_spec(size: int) -> InputSpec:
    """Media in [0,1], ``[B,3,H,W]``, best at ``size`` x ``size``."""
    return InputSpec(range=(0.0, 1.0), layout="BCHW", size=(size, size))
