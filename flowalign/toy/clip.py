"""The tiny digits CLIP: an open_clip ``CLIP`` trained on digit image-caption pairs, saved as an open_clip
checkpoint folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with ``local-dir:``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .data import augment, load_digits
from .prompts import TEMPLATES, caption, random_caption

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def to_clip_input(images: torch.Tensor) -> torch.Tensor:
    """Grey digits in [-1,1] -> normalised RGB for the tiny CLIP."""
    rgb = ((images + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
    return clip_preprocess(rgb, MODEL_CFG["vision_cfg"]["image_size"])


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       template: str = "a handwritten {w}") -> float:
    """How often the matching caption ranks first among the ten digits' captions."""
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer([caption(d, template) for d in range(10)])), dim=-1)
        image = F.normalize(model.encode_image(to_clip_input(images)), dim=-1)
        return ((image @ text.T).argmax(-1) == labels).float().mean().item()


def train_clip(out_dir: str | Path, steps: int = 1500, batch_size: int = 128, seed: int = 0) -> float:
    """Contrastive training with class-aware targets (captions of the same digit all count as matches)."""
    import open_clip

    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    images, labels = load_digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="toy CLIP", mininterval=5):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        y = labels[idx]
        texts = tokenizer([random_caption(int(d), rng, TEMPLATES) for d in y])
        img = F.normalize(model.encode_image(to_clip_input(augment(images[idx], gen))), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = (y[:, None] == y[None, :]).float()
        target = target / target.sum(-1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    model.eval()
    save_open_clip(model, out_dir)
    return zero_shot_accuracy(model, tokenizer, *load_digits("test"))


def save_open_clip(model, out_dir: str | Path) -> None:
    """Write the folder layout open_clip reads with ``create_model('local-dir:PATH')``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors")


