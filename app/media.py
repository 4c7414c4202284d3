"""Generated media to what a page shows: images as uint8 arrays, videos as MP4 files, audio as WAV files.

One sample is ``[3,H,W]`` (image, [0,1]), ``[F,3,H,W]`` (video, [0,1]) or ``[C,L]`` (audio, [-1,1]),
as ``Generator.decode`` documents. Video generators may set ``fps``, audio generators ``sample_rate``.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlowalignError

DEFAULT_FPS = 8
DEFAULT_SAMPLE_RATE = 16_000


def upscale(frames: torch.Tensor, min_side: int) -> torch.Tensor:
    """``[N,3,H,W]`` enlarged by a whole factor (nearest) so the short side reaches ``min_side``: tiny toy
    images stay crisp instead of blurring in the browser."""
    factor = max(1, -(-min_side // min(frames.shape[-2:])))
    return F.interpolate(frames.float(), scale_factor=factor, mode="nearest") if factor > 1 else frames.float()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[N,3,H,W]`` in [0,1] -> ``[N,H,W,3]`` uint8."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def display_image(image: torch.Tensor, min_side: int = 192) -> np.ndarray:
    """One image ``[3,H,W]`` as an ``[H',W',3]`` uint8 array for ``gr.Image`` / ``gr.Gallery``."""
    return to_uint8(upscale(image[None], min_side))[0]


def write_video(frames: torch.Tensor, path: str | Path, fps: int = DEFAULT_FPS, min_side: int = 192) -> Path:
    """``[F,3,H,W]`` in [0,1] as an H.264 MP4 (browsers play it in ``gr.Video``); needs PyAV."""
    try:
        import av
    except ImportError:
        raise FlowalignError("video output needs PyAV: pip install 'flowalign[app]'") from None
    pixels = to_uint8(upscale(frames, min_side))
    pixels = pixels[:, : pixels.shape[1] // 2 * 2, : pixels.shape[2] // 2 * 2]  # H.264 wants even sides
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_wav(audio: torch.Tensor, path: str | Path, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Path:
    """``[C,L]`` (or ``[L]``) in [-1,1] as a 16-bit PCM WAV file (``gr.Audio`` plays it)."""
    data = audio.detach().float().cpu()
    data = data[None] if data.ndim == 1 else data
    pcm = (data.clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().numpy()  # [L, C] interleaved
    path = Path(path)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(pcm.shape[1])
        fh.setsampwidth(2)
        fh.setframerate(int(sample_rate))
        fh.writeframes(pcm.tobytes())
    return path


def write_media(sample: torch.Tensor, modality: str, stem: str | Path, *, fps: int = DEFAULT_FPS,
                sample_rate: int = DEFAULT_SAMPLE_RATE, min_side: int = 192) -> Path:
    """One sample as a file: ``stem.png`` (native size), ``stem.mp4`` or ``stem.wav``."""
    stem = Path(stem)
    if modality == "image":
        from PIL import Image

        path = stem.with_suffix(".png")
        Image.fromarray(to_uint8(sample[None])[0]).save(path)
        return path
    if modality == "video":
        return write_video(sample, stem.with_suffix(".mp4"), fps, min_side)
    if modality == "audio":
        return write_wav(sample, stem.with_suffix(".wav"), sample_rate)
    raise FlowalignError(f"modality '{modality}': the app shows image, video or audio")


def media_settings(generator) -> dict:
    """The frame rate / sample rate a generator declares (``fps``, ``sample_rate``, or a diffusers audio
    VAE's ``sampling_rate``); defaults when it declares none."""
    vae = getattr(getattr(generator, "pipe", None), "vae", None)
    rate = getattr(generator, "sample_rate", None) or getattr(getattr(vae, "config", None), "sampling_rate", None)
    return {"fps": int(getattr(generator, "fps", None) or DEFAULT_FPS), "sample_rate": int(rate or DEFAULT_SAMPLE_RATE)}
