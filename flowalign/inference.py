"""Sampling with a Generator: ODE (Euler) sampling with classifier-free guidance, seeded and batched."""
from __future__ import annotations

from pathlib import Path

import torch

from .generators.base import Generator
from .rewards.media import cat_media, pictures
from .samplers import euler_ode


@torch.no_grad()
def generate(generator: Generator, prompts: list[str] | str, *, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, negative_prompt: str = "",
             batch_size: int = 250, metadata: list[dict] | None = None) -> torch.Tensor:  # or AudioVideo
    """Decoded media for ``prompts`` (one sample each; ``metadata`` row for row, e.g. an editing model's source
    image). Sample i's noise depends only on ``seed`` and i, so the same seed gives the same media whatever the
    batch size."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    steps = steps or generator.default_steps
    guidance = generator.default_guidance if guidance is None else guidance
    sigmas = generator.sigmas(steps)
    noise = generator.initial_state(generator.initial_noise(len(prompts), torch.Generator().manual_seed(seed)),
                                    sigmas[0])
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = generator.with_sources(generator.encode(batch, negative_prompt if guidance != 1.0 else None),
                                      None if metadata is None else metadata[start:start + batch_size])
        x = euler_ode(lambda x, s: generator.velocity(x, s, cond, guidance), noise[start:start + len(batch)], sigmas)
        out.append(generator.decode(x))
    return cat_media(out)


def save_grid(media: torch.Tensor, path, nrow: int = 10, min_size: int = 64) -> None:
    """Save images ``[B,3,H,W]`` in [0,1] as one PNG grid (small images upscaled, nearest, for viewing);
    video ``[B,F,3,H,W]`` as one row of frames per clip (audio+video media: their clips)."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    media = pictures(media)
    if media.ndim == 5:
        media, nrow = media.flatten(0, 1), media.shape[1]
    if media.shape[-1] < min_size:
        media = F.interpolate(media, scale_factor=min_size // media.shape[-1], mode="nearest")
    save_image(media, path, nrow=nrow, padding=2, pad_value=0.3)


def save_video(media: torch.Tensor, path, nrow: int = 8, min_size: int = 64, fps: int = 4) -> Path:
    """Save video ``[B,F,3,H,W]`` in [0,1] as one animation whose frame t is the grid of every clip's frame t:
    an animated GIF (Pillow), or an MP4 when ``path`` ends in .mp4 (needs imageio with imageio-ffmpeg)."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid

    from .errors import FlowalignError

    path, media = Path(path), pictures(media)
    if media.shape[-1] < min_size:
        media = F.interpolate(media.flatten(0, 1), scale_factor=min_size // media.shape[-1],
                              mode="nearest").unflatten(0, media.shape[:2])
    frames = [(make_grid(media[:, t], nrow=nrow, padding=2, pad_value=0.3).permute(1, 2, 0) * 255).round()
              .to(torch.uint8).cpu().numpy() for t in range(media.shape[1])]
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v3 as iio
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise FlowalignError(f"{path}: MP4 export needs imageio and imageio-ffmpeg "
                                 "(pip install imageio imageio-ffmpeg); write a .gif instead") from None
        iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)
        return path
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return path


def sample_rate_of(generator: Generator) -> int:
    """An audio generator's sample rate: its ``sample_rate``, else its diffusers audio VAE's ``sampling_rate``."""
    from .errors import FlowalignError

    vae = getattr(getattr(generator, "pipe", None), "vae", None)
    rate = getattr(generator, "sample_rate", None) or getattr(getattr(vae, "config", None), "sampling_rate", None)
    if not rate:
        raise FlowalignError(f"{type(generator).__name__}: an audio generator must declare its sample_rate")
    return int(rate)


def save_wav(media: torch.Tensor, path, sample_rate: int) -> list[Path]:
    """Save audio ``[B,C,L]`` in [-1,1] as 16-bit PCM WAV files (stdlib ``wave``): ``path`` itself for one
    clip, else ``<stem>_000.wav``, ``<stem>_001.wav``, ... beside it."""
    import wave

    path = Path(path).with_suffix(".wav")
    pcm = (media.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).cpu()
    paths = [path] if len(pcm) == 1 else [path.with_name(f"{path.stem}_{i:03d}.wav") for i in range(len(pcm))]
    for clip, target in zip(pcm, paths):
        with wave.open(str(target), "wb") as fh:
            fh.setnchannels(clip.shape[0])
            fh.setsampwidth(2)
            fh.setframerate(int(sample_rate))
            fh.writeframes(clip.T.contiguous().numpy().tobytes())  # [L, C]: channels interleaved
    return paths
