"""The ``dinov3`` encoder on a tiny random DINOv3 ViT saved in the real layout (weights, config, preprocessor
config): its embeddings equal the model's forward on the image processor's own preprocessing; GARDO's
diversity-aware advantages on the toy take their features from it."""
from __future__ import annotations

import pytest
import torch

from flowalign import rewards
from flowalign.config import load_config
from flowalign.modifiers.gardo import diversity_advantages, encoder_features, pixel_features
from flowalign.rewards.registry import describe
from flowalign.training import make_trainer

CONFIG = "configs/toy/digits_uncapped_gardo.yaml"
REGISTERS = 2  # the tiny model's register tokens: CLS and these precede the patch tokens


@pytest.fixture(scope="module")
def tiny_dinov3(tmp_path_factory):
    """A 1-layer DINOv3 ViT (hidden 16, patch 4) for 16x16 images, with its image processor (bilinear)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("dinov3")
    torch.manual_seed(0)
    config = DINOv3ViTConfig(patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=16, num_register_tokens=REGISTERS)
    DINOv3ViTModel(config).save_pretrained(folder)
    DINOv3ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def test_embeddings_equal_the_models_forward_on_its_processors_preprocessing(tiny_dinov3):
    """24x24 images (resized to 16 by both): the processor's pixel values to 1e-5, the mean of the patch tokens
    (after CLS and the registers) and the pooled CLS output to 1e-5. ``size=24`` (no resize): ImageNet's
    mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) alone."""
    from transformers import AutoImageProcessor, DINOv3ViTModel

    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    processor = AutoImageProcessor.from_pretrained(tiny_dinov3, local_files_only=True)
    pixel_values = processor(images=list(images), return_tensors="pt").pixel_values
    out = DINOv3ViTModel.from_pretrained(tiny_dinov3, local_files_only=True).eval()(pixel_values=pixel_values)
    media = images.float() / 255
    encoder = rewards.load("dinov3", path=str(tiny_dinov3), local_files_only=True)
    assert torch.allclose(encoder.preprocess(media), pixel_values, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(encoder.embed_images(media), out.last_hidden_state[:, 1 + REGISTERS:].mean(1), atol=1e-5)
        cls = rewards.load("dinov3", path=str(tiny_dinov3), local_files_only=True, pooling="cls")
        assert torch.allclose(cls.embed_images(media), out.pooler_output, atol=1e-5)
    unresized = rewards.load("dinov3", path=str(tiny_dinov3), local_files_only=True, size=24).preprocess(media)
    imagenet = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(unresized, (media - imagenet[0]) / imagenet[1], atol=1e-6)
    assert describe("dinov3")["description"] == "not a reward: an encoder other rewards embed with"
    with pytest.raises(rewards.RewardError, match="reward dinov3: cannot load .*missing: no such file or folder"):
        rewards.load("dinov3", path=str(tiny_dinov3 / "missing"), local_files_only=True)


@pytest.mark.slow
def test_gardo_on_the_toy_takes_its_diversity_features_from_the_encoder(tmp_path, tiny_dinov3):
    """One toy iteration with ``features: dinov3``: the advantages are the diversity-aware ones of the encoder's
    normalised embeddings (not of the pixels); with ``reset_test: optimizer_step`` the reset test holds one mean
    per optimizer step (2)."""
    encoder = [f"reward.options.dinov3.path={tiny_dinov3}", "reward.options.dinov3.local_files_only=true"]
    cfg = load_config(CONFIG, ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=3",
                               "train.eval_prompts=0", "monitor.every=0", "train.updates_per_iteration=2",
                               "train.iterations=1", "train.checkpoint_every=0", "modifiers.gardo.features=dinov3",
                               *encoder, "modifiers.gardo.reset_test=optimizer_step", f"output_dir={tmp_path}"])
    trainer = make_trainer(cfg)
    _, batch = trainer.run_iteration(0)
    gardo = trainer.modifiers[0]
    groups, position = trainer.gathered(batch.leaf_groups, batch)
    valid = torch.isfinite(batch.all_rewards)
    embedded = diversity_advantages(batch.all_rewards, groups, encoder_features(gardo.encoder.embed_images,
                                                                                batch.media), valid)
    assert torch.allclose(batch.leaf_advantages, embedded[position], atol=1e-6)
    on_pixels = diversity_advantages(batch.all_rewards, groups, pixel_features(batch.media), valid)
    assert not torch.allclose(embedded, on_pixels, atol=1e-4)
    assert len(gardo.reset_test.step_means) == 2 and all(float(m) >= 0 for m in gardo.reset_test.step_means)
