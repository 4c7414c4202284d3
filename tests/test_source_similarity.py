"""edit/clip-i: the CLIP image-image cosine between each edit and its source, on the toy's tiny open_clip model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowalign import rewards
from flowalign.rewards.errors import RewardError
from flowalign.rewards.source_similarity import SourceSimilarity
from flowalign.rewards.toy import WEIGHTS


@pytest.fixture(scope="module")
def reward():
    return SourceSimilarity(model=str(WEIGHTS / "clip"))


def save(path, pixels: torch.Tensor) -> str:
    Image.fromarray((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)
    return str(path)


def test_the_score_is_the_cosine_of_the_two_image_embeddings(reward, tmp_path):
    """Expected values from the model's own encode_image, written out here: 100 · cos, clamped at 0; an edit
    equal to its source scores 100."""
    torch.manual_seed(0)
    sources = torch.rand(2, 3, 16, 16).mul(255).round().div(255)  # exactly representable as 8-bit PNGs
    paths = [save(tmp_path / f"s{i}.png", s) for i, s in enumerate(sources)]
    edits = torch.rand(2, 3, 16, 16)
    meta = [{"image": p} for p in paths]
    scores = reward.score(edits, ["a", "b"], meta)
    with torch.no_grad():
        embed = lambda x: F.normalize(reward.model.encode_image(reward_pixels(reward, x)), dim=-1)  # noqa: E731
        expected = 100 * (embed(edits) * embed(sources)).sum(-1).clamp_min(0)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    assert reward.score(sources, ["a", "b"], meta) == pytest.approx([100.0, 100.0], abs=1e-3)


def reward_pixels(reward, images):
    from flowalign.rewards.preprocess import clip_preprocess

    return clip_preprocess(images, reward.image_size, reward.mean, reward.std)


def test_gradients_reach_the_edit_and_rows_without_a_source_are_one_line(reward, tmp_path):
    torch.manual_seed(1)
    path = save(tmp_path / "s.png", torch.rand(3, 16, 16))
    edit = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert reward.score(edit.detach(), ["a"], [{"image": path}]) > 0  # not clamped: the gradient is the cosine's
    reward.score(edit, ["a"], [{"image": path}]).sum().backward()
    assert edit.grad is not None and edit.grad.abs().sum() > 0
    with pytest.raises(RewardError, match=r"reward edit/clip-i: sample 0 \('a'\) has no source image"):
        reward.score(edit.detach(), ["a"], [{}])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(RewardError, match=r"source image '.*bad.png' cannot be read"):
        reward.score(edit.detach(), ["a"], [{"image": str(tmp_path / "bad.png")}])


def test_registered_by_name():
    loaded = rewards.load("edit/clip-i", model=str(WEIGHTS / "clip"))
    assert isinstance(loaded, SourceSimilarity) and loaded.differentiable
    assert np.isclose(loaded.weight, 100.0)
