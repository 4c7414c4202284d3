"""Train the toy text-to-video rectified-flow model: a tiny Wan transformer on moving digits in pixel space.

``python -m flowalign.toy.video_flow`` prints the shipped model's figures (per-frame digit accuracy,
motion direction accuracy, motion reward, temporal consistency) on training and held-out phrasings.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.training_utils import EMAModel

from ..generators.toy_video import position_channels
from .data import load_digits
from .text_encoder import ToyTextEncoder, known_token_ids
from .video_data import DIGIT_SIZE, DIRECTIONS, render_videos
from .video_prompts import HELD_OUT_TEMPLATES, TEMPLATES, all_captions, random_caption, sample_prompts

TEXT_WIDTH = 64
CONTEXT_LENGTH = 16
EVAL_SEED = 20_011


@dataclass
class VideoFlowTrainConfig:
    steps: int = 15000
    batch_size: int = 8  # small batches, many updates: the most learning per CPU second at this scale
    lr: float = 2e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    width: int = 64
    layers: int = 4
    #: Every ``image_every``-th step trains on ``image_batch_size`` one-frame clips (first frames) instead, as
    #: video models train on images too: four times cheaper a sample, and the digit shapes are per frame.
    image_every: int = 2
    image_batch_size: int = 32


def build_transformer(width: int = 64, layers: int = 4, head_dim: int = 32) -> WanTransformer3DModel:
    """The tiny Wan transformer: 1 pixel channel (+ 3 coordinate channels in), patch (1,2,2) (an 8x8 token grid
    per frame), 3D RoPE."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=4,
        out_channels=1, text_dim=TEXT_WIDTH, freq_dim=64, ffn_dim=4 * width, num_layers=layers, rope_max_seq_len=32)


def _lr_factor(step: int, cfg: VideoFlowTrainConfig) -> float:
    """Linear warmup, then a cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_video_flow(out_dir: str | Path, cfg: VideoFlowTrainConfig = VideoFlowTrainConfig(),
                     print_fn=print) -> Path:
    """Train text encoder + transformer end to end with the flow-matching loss; save a diffusers-style folder."""
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    digits, labels = load_digits("train", size=DIGIT_SIZE)
    text = ToyTextEncoder(known_token_ids(all_captions(), CONTEXT_LENGTH), width=TEXT_WIDTH,
                          context_length=CONTEXT_LENGTH)
    transformer = build_transformer(cfg.width, cfg.layers)
    params = list(text.parameters()) + list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True)
    names, start, running = list(DIRECTIONS), time.perf_counter(), 0.0
    for step in range(cfg.steps):
        image_step = cfg.image_every > 0 and step % cfg.image_every == cfg.image_every - 1
        n = cfg.image_batch_size if image_step else cfg.batch_size
        idx = torch.randint(0, len(labels), (n,), generator=gen)
        directions = torch.randint(0, len(names), (n,), generator=gen)
        x0 = render_videos(digits[idx], directions, gen)
        x0 = x0[:, :, :1] if image_step else x0
        prompts = ["" if rng.random() < cfg.caption_dropout else random_caption(int(d), names[int(m)], rng)
                   for d, m in zip(labels[idx], directions)]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(n, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        embeds, _ = text(prompts)
        v = transformer(hidden_states=position_channels(x_t), timestep=sigma * 1000,
                        encoder_hidden_states=embeds).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            print_fn(f"toy video flow: step {step + 1}/{cfg.steps} loss {running / cfg.log_every:.4f} "
                     f"({time.perf_counter() - start:.0f} s)")
            running = 0.0
    ema.copy_to(params)
    out_dir = Path(out_dir)
    transformer.save_pretrained(out_dir / "transformer")
    text.save_pretrained(out_dir / "text_encoder")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(out_dir / "scheduler")
    return out_dir


@torch.no_grad()
def measure_video_model(gen, n: int = 200, held_out: bool = False, steps: int | None = None,
                        guidance: float | None = None, seed: int = EVAL_SEED) -> dict[str, float]:
    """The figures of a video generator on ``n`` balanced prompts: the share of frames the classifier reads as
    the prompted digit, motion direction accuracy, the mean motion reward and temporal consistency."""
    from .. import rewards
    from ..inference import generate

    prompts, meta = sample_prompts(n, seed=seed, templates=HELD_OUT_TEMPLATES if held_out else TEMPLATES)
    media = generate(gen, prompts, steps=steps, guidance=guidance, seed=seed)
    frames = rewards.load("video/frames", image_reward="toy/digit_match", crop=0.5, segments=media.shape[1],
                          sampler="uniform", tar_lambda=0.0)
    scorers = {"frame_digit_accuracy": frames, "motion_direction_accuracy": rewards.load("toy/motion_match"),
               "motion": rewards.load("toy/motion"), "temporal": rewards.load("video/temporal")}
    return {name: r.score(media, prompts, meta).mean().item() for name, r in scorers.items()}


def main() -> None:
    """Print the shipped model's figures (CFG default and 1, training and held-out phrasings)."""
    from ..generators import load_generator

    gen = load_generator("toy/video", device="cpu")
    for held_out in (False, True):
        for guidance in (None, 1.0):
            figures = measure_video_model(gen, held_out=held_out, guidance=guidance)
            label = f"{'held-out' if held_out else 'training'} phrasings, guidance {guidance or gen.default_guidance}"
            print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
