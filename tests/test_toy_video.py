"""The video toy world: moving-digits data, the shipped tiny-Wan generator, the motion rewards, GIF export,
and Flow-GRPO raising a video reward on held-out prompts and seeds (see the module constants for the bars)."""
import pytest
import torch
from PIL import Image

import flowalign
from flowalign import rewards
from flowalign.rewards.toy.motion import ink_centroids
from flowalign.toy.video_data import DIRECTIONS, FRAMES, load_moving_digits
from flowalign.toy.video_prompts import HELD_OUT_TEMPLATES, caption, parse_direction, sample_prompts


@pytest.fixture(scope="module")
def real_clips():
    """Test-split moving digits as media ``[N,F,3,16,16]`` in [0,1], with prompts naming digit and direction."""
    videos, labels, dirs = load_moving_digits("test", seed=1)
    media = ((videos[:120] + 1) / 2).transpose(1, 2).expand(-1, -1, 3, -1, -1).contiguous()
    names = list(DIRECTIONS)
    return media, [caption(int(label), names[int(d)]) for label, d in zip(labels[:120], dirs[:120])], dirs[:120]


@pytest.fixture(scope="module")
def gen():
    return flowalign.load_generator("toy/video", device="cpu")


def frame_reward(image_reward: str = "toy/digit_match") -> rewards.Reward:
    """Every frame, equally weighted, through the digit-reading image reward (ink-centred crop)."""
    return rewards.load("video/frames", image_reward=image_reward, crop=0.5, segments=FRAMES, sampler="uniform",
                        tar_lambda=0.0)


def test_data_slides_the_digit_two_pixels_a_frame(real_clips):
    media, prompts, dirs = real_clips
    assert media.shape[1:] == (FRAMES, 3, 16, 16)
    steps = ink_centroids(media).diff(dim=1) * 16  # pixels
    unit = torch.tensor([DIRECTIONS[list(DIRECTIONS)[int(d)]] for d in dirs], dtype=torch.float32)
    assert torch.allclose(steps, 2 * unit[:, None].expand_as(steps), atol=1e-4)
    again = load_moving_digits("test", seed=1)[0][:120]
    assert torch.equal(((again + 1) / 2).transpose(1, 2).expand(-1, -1, 3, -1, -1), media)  # seeded


def test_prompts_parse_and_balance():
    assert parse_direction("a seven moving to the right") == "right"
    assert parse_direction("the digit 3 sliding upwards") == "up"
    assert parse_direction("a seven") is None
    prompts, meta = sample_prompts(40, seed=3, templates=HELD_OUT_TEMPLATES)
    assert sorted(m["digit"] for m in meta) == sorted(list(range(10)) * 4)
    assert all(parse_direction(p) == m["direction"] for p, m in zip(prompts, meta))


def test_motion_rewards_on_real_clips(real_clips):
    """Real clips score 1 (direction match 100%); told the wrong direction, -1 (perpendicular) and 0."""
    media, prompts, _ = real_clips
    motion, match = rewards.load("toy/motion"), rewards.load("toy/motion_match")
    assert torch.allclose(motion.score(media, prompts), torch.ones(len(prompts)), atol=1e-4)
    assert match.score(media, prompts).mean() == 1.0
    turned = [p.replace("right", "up").replace("left", "down") if "right" in p or "left" in p
              else p.replace("up", "left").replace("down", "right") for p in prompts]
    assert motion.score(media, turned).max() < -0.9 and match.score(media, turned).max() == 0
    reversed_clips = media.flip(1)
    assert match.score(reversed_clips, prompts).max() == 0 and motion.score(reversed_clips, prompts).max() < -0.9
    assert frame_reward().score(media, prompts).mean() > 0.97  # the crop lets the classifier read small digits


def test_motion_reward_is_differentiable_and_penalises_jerky_motion(real_clips):
    media, prompts, _ = real_clips
    x = media[:8].clone().requires_grad_(True)
    rewards.load("toy/motion").score(x, prompts[:8]).sum().backward()
    assert x.grad.abs().sum() > 0
    jerky = media[:8][:, [0, 0, 2, 3]]  # stands still, then jumps
    assert (rewards.load("toy/motion").score(jerky, prompts[:8]) < 0.5).all()


def test_generate_writes_an_animated_gif(tmp_path):
    """`flowalign generate --model toy/video` writes one GIF: F frames, each the grid of the clips' frames."""
    from flowalign.cli import main

    out = tmp_path / "clips.png"  # a video model swaps the suffix for .gif
    assert main(["generate", "--model", "toy/video", "--prompt", "a seven moving to the right", "--num", "3",
                 "--steps", "4", "--out", str(out)]) == 0
    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == FRAMES
        assert gif.size == (3 * 66 + 2, 66 + 2)  # three 64x64 clips (16x16 upscaled), 2-pixel padding
        frames = []
        for t in range(gif.n_frames):
            gif.seek(t)
            frames.append(torch.frombuffer(bytearray(gif.convert("L").tobytes()), dtype=torch.uint8))
    assert not torch.equal(frames[0], frames[-1])  # it moves


def test_shipped_model_loads_and_decodes_video(gen):
    from flowalign.generators.toy_video import ToyVideoGenerator

    assert isinstance(gen, ToyVideoGenerator) and gen.modality == "video"
    assert type(gen.transformer).__name__ == "WanTransformer3DModel"
    assert gen.latent_shape == (1, FRAMES, 16, 16)
    media = flowalign.generate(gen, ["a seven moving to the right", "number 3 going up"], steps=2)
    assert media.shape == (2, FRAMES, 3, 16, 16) and 0 <= media.min() and media.max() <= 1
    names = [n for n, _ in gen.transformer.named_modules() if n.endswith(tuple(gen.lora_target_modules))]
    assert len(names) == 4 * 2 * 4  # 4 blocks x (attn1, attn2) x (q, k, v, out)


def test_a_built_folder_loads_by_path(tmp_path):
    """What `flowalign toy build` writes (here 3 steps) loads through load_generator as a toy video model."""
    from flowalign.toy.video_flow import VideoFlowTrainConfig, train_video_flow

    train_video_flow(tmp_path / "video", VideoFlowTrainConfig(steps=3, batch_size=2, image_batch_size=2),
                     print_fn=lambda *_: None)
    gen = flowalign.load_generator(str(tmp_path / "video"), device="cpu")
    assert gen.modality == "video" and flowalign.generate(gen, ["a two moving up"], steps=1).shape[1] == FRAMES
    with pytest.raises(flowalign.FlowalignError, match="num_frame"):
        flowalign.load_generator("toy/video", device="cpu", num_frame=4)


def test_shipped_model_draws_the_digit_and_moves_it_the_prompted_way(gen):
    """On held-out phrasings and seeds (60 prompts, 10 steps, CFG 3). Measured (200 prompts, 20 steps): 82% of
    frames read as the prompted digit (chance 10%), 100% of clips move the prompted way, motion reward 0.88."""
    from flowalign.toy.video_flow import measure_video_model

    figures = measure_video_model(gen, n=60, held_out=True, steps=10)
    assert figures["frame_digit_accuracy"] > 0.7, figures
    assert figures["motion_direction_accuracy"] >= 0.95, figures
    assert figures["motion"] > 0.7, figures


def test_a_trained_video_lora_loads_into_the_wan_pipeline(tmp_path):
    """Flow-GRPO on the video toy (its learning is in tests/test_learning.py) saves a LoRA WanPipeline reads."""
    from diffusers import WanPipeline

    from flowalign.config import load_config
    from flowalign.training import make_trainer

    tr = make_trainer(load_config("configs/toy/video_flow_grpo.yaml", [
        "train.iterations=1", "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.eval_prompts=0",
        "train.checkpoint_every=0", f"output_dir={tmp_path}"]))
    tr.fit(progress=False)
    final = tr.save_final()
    lora = WanPipeline.lora_state_dict(final)
    assert lora and all(k.startswith("transformer.") for k in lora)
