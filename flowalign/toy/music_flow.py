"""Train the toy text-to-music rectified-flow model: a tiny SD3 transformer on piano rolls.

Why ``SD3Transformer2DModel`` and not ``StableAudioDiTModel``: with the roll laid out as Stable Audio lays
out its latent (pitches as channels, one token per frame: ``[24, 1, 32]``, patch 1) both cost about the
same per step here, but diffusers' Stable Audio DiT has no ``PeftAdapterMixin`` (the Stable Audio adapter
has to graft one on), while the SD3 class runs, unchanged, the LoRA and sampling code the digits model and
real SD3 checkpoints run. One token per frame, rather than 4x4 patches of a ``[1, 24, 32]`` image, lets
each token place its note directly: after 300 steps it had 34% pitch accuracy and 0.94 key against 6%
and 0.67 for the patches.

``python -m flowalign.toy.music_flow`` prints the shipped model's figures (README).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from ..generators.toy_music import MARKER
from ..rewards.toy.melody import FRAMES, LOWEST, PITCHES, SAMPLE_RATE
from .music_data import training_batch
from .music_prompts import HELD_OUT_TEMPLATES, TEMPLATES, all_captions, sample_prompts
from .text_encoder import ToyTextEncoder, known_token_ids

TEXT_WIDTH = 64
CONTEXT_LENGTH = 16


@dataclass
class MusicFlowTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0


def build_transformer(width: int = 64, layers: int = 4, head_dim: int = 32) -> SD3Transformer2DModel:
    """The tiny SD3 transformer on rolls laid out as ``[24 pitch channels, 1, 32 frames]``, patch 1: one
    token per frame holding the whole pitch column (as Stable Audio's DiT takes its latent)."""
    return SD3Transformer2DModel(
        sample_size=FRAMES, patch_size=1, in_channels=PITCHES, out_channels=PITCHES, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=width, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=FRAMES)


def train_music_flow(out_dir: str | Path, cfg: MusicFlowTrainConfig = MusicFlowTrainConfig(), print_fn=print) -> Path:
    """Train text encoder + transformer end to end with the flow-matching loss; save a diffusers-style folder."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    text = ToyTextEncoder(known_token_ids(all_captions(), CONTEXT_LENGTH), width=TEXT_WIDTH,
                          context_length=CONTEXT_LENGTH)
    transformer = build_transformer()
    params = list(text.parameters()) + list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    ema = EMAModel(params, decay=cfg.ema_decay)
    for step in tqdm(range(cfg.steps), desc="toy music flow", mininterval=10):
        x0, prompts = training_batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step,
                                     caption_dropout=cfg.caption_dropout)
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
        if (step + 1) % 250 == 0:
            print_fn(f"toy music flow: step {step + 1}/{cfg.steps}, loss {loss.item():.4f}")
    ema.copy_to(params)
    return save_music_model(out_dir, transformer, text)


def save_music_model(out_dir: str | Path, transformer: SD3Transformer2DModel, text: ToyTextEncoder) -> Path:
    """Write the diffusers-style folder, weights in float16 (half the size; loading casts them to the dtype
    asked for), plus the scheduler and the marker ``load_generator`` recognises."""
    out_dir = Path(out_dir)
    transformer.half().save_pretrained(out_dir / "transformer")
    text.half().save_pretrained(out_dir / "text_encoder")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(out_dir / "scheduler")
    (out_dir / MARKER).write_text(json.dumps({"sample_rate": SAMPLE_RATE, "pitches": PITCHES, "frames": FRAMES,
                                              "lowest_midi": LOWEST}))
    return out_dir


@torch.no_grad()
def score_music(audio: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Mean toy music rewards of clips for their prompts, plus the share at exactly the prompted tempo."""
    from .. import rewards
    tempo = rewards.load("toy/tempo").score(audio, prompts)
    return {"pitch_accuracy": rewards.load("toy/pitch_accuracy").score(audio, prompts).mean().item(),
            "key": rewards.load("toy/key").score(audio, prompts).mean().item(),
            "tempo_exact": (tempo == 0).float().mean().item(), "tempo": tempo.mean().item()}


@torch.no_grad()
def measure_music_model(generator, n: int = 40, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                        held_out: bool = False) -> dict[str, float]:
    """``score_music`` of the generator's samples for ``n`` balanced prompts (every key x pattern x tempo);
    ``held_out``: in the phrasings held out of training."""
    from ..inference import generate

    prompts, _ = sample_prompts(n, seed=seed, templates=HELD_OUT_TEMPLATES if held_out else TEMPLATES)
    return score_music(generate(generator, prompts, steps=steps, guidance=guidance, seed=seed), prompts)


def _main() -> None:
    """Print the shipped model's figures on 200 prompts (CFG 3, no CFG, held-out phrasings) and a baseline:
    random latents decoded."""
    from ..generators import load_generator

    generator = load_generator("toy/music", device="cpu")
    runs = {"CFG 3": {}, "CFG 1": {"guidance": 1.0}, "held-out phrasings, CFG 3": {"held_out": True}}
    for label, options in runs.items():
        figures = measure_music_model(generator, n=200, **options)
        print(f"toy/music, 200 prompts, 20 steps, {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    prompts, _ = sample_prompts(200, seed=0)
    noise = generator.decode(generator.initial_noise(200, torch.Generator().manual_seed(0)))
    baseline = score_music(noise, prompts)
    print("random latents decoded (baseline): " + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()))


if __name__ == "__main__":
    _main()
