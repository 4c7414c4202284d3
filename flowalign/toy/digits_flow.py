"""Train the toy text-to-image rectified-flow model: a tiny SD3 transformer on 16x16 digits in pixel space."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from .data import IMAGE_SIZE, augment, load_digits
from .prompts import DIGIT_WORDS, TEMPLATES, caption, random_caption
from .text_encoder import ToyTextEncoder, known_token_ids

TEXT_WIDTH = 64
CONTEXT_LENGTH = 16


@dataclass
class FlowTrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0


def build_transformer(width: int = 64, layers: int = 4, head_dim: int = 32) -> SD3Transformer2DModel:
    """The tiny SD3 transformer: 1 pixel channel, patch 2 (an 8x8 token grid)."""
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=2, in_channels=1, out_channels=1, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=width, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=IMAGE_SIZE // 2)


def all_captions() -> list[str]:
    from .prompts import HELD_OUT_TEMPLATES

    return [caption(d, t) for d in range(len(DIGIT_WORDS)) for t in TEMPLATES + HELD_OUT_TEMPLATES]


def train_digits_flow(out_dir: str | Path, cfg: FlowTrainConfig = FlowTrainConfig()) -> Path:
    """Train text encoder + transformer end to end with the flow-matching loss; save a diffusers-style folder."""
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits("train")
    text = ToyTextEncoder(known_token_ids(all_captions(), CONTEXT_LENGTH), width=TEXT_WIDTH,
                          context_length=CONTEXT_LENGTH)
    transformer = build_transformer()
    params = list(text.parameters()) + list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    ema = EMAModel(params, decay=cfg.ema_decay)
    for _ in tqdm(range(cfg.steps), desc="toy digits flow", mininterval=5):
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=gen)
        x0 = augment(images[idx], gen)
        prompts = ["" if rng.random() < cfg.caption_dropout else random_caption(int(d), rng) for d in labels[idx]]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(cfg.batch_size, generator=gen)
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        embeds, pooled = text(prompts)
        v = transformer(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                        timestep=sigma * 1000).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
    ema.copy_to(params)
    out_dir = Path(out_dir)
    transformer.save_pretrained(out_dir / "transformer")
    text.save_pretrained(out_dir / "text_encoder")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(out_dir / "scheduler")
    return out_dir
