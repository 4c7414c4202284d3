"""DiffusionNFT, AWM and DGPO with every reward kind and another generator family."""
import math

import pytest

from flowalign.config import load_config
from flowalign.training import make_trainer


@pytest.mark.parametrize("method", ["diffusion_nft", "awm", "dgpo"])
def test_every_reward_kind_and_another_generator_family(method, tmp_path):
    """A pairwise judge's win rates (whole prompts per process) and a set reward's per-sample scores on the music
    toy (toy/music_fad: each clip against the exemplar set) train each forward-process method for an iteration."""
    config = f"configs/toy/digits_{method}.yaml"
    common = ["train.prompts_per_iteration=2", f"{method}.group_size=4", "train.steps=6", f"{method}.fm_draws=2",
              "train.eval_prompts=0", "train.checkpoint_every=0", "train.iterations=1"]
    common += ["dgpo.trunc_steps=3"] if method == "dgpo" else []
    pairwise = make_trainer(load_config(config, [*common, "reward.weights={toy/preference: 1.0}",
                                                 f"output_dir={tmp_path / 'pairwise'}"]))
    history = pairwise.fit(progress=False)
    assert math.isfinite(history[0]["policy_loss"]) and 0.0 <= history[0]["reward/mean"] <= 1.0
    music = make_trainer(load_config(config, [*common, "model.name=toy/music", "reward.weights={toy/music_fad: 1.0}",
                                              "train.guidance=1.0", f"output_dir={tmp_path / 'music'}"]))
    history = music.fit(progress=False)
    assert math.isfinite(history[0]["policy_loss"]) and math.isfinite(history[0]["reward/mean"])


@pytest.mark.parametrize("method", ["diffusion_nft", "awm", "dgpo"])
def test_samples_whose_reward_failed_are_skipped(method, tmp_path):
    """``reward.on_error: skip``: a prompt whose reward fails leaves its samples out (weight 0); the iteration
    trains on the others. When every reward fails nothing is learned (only AdamW's weight decay moves)."""
    import torch

    from flowalign.training.lora import trainable_state

    def run(name: str, failing):
        tr = make_trainer(load_config(f"configs/toy/digits_{method}.yaml", [
            "train.prompts_per_iteration=2", f"{method}.group_size=4", "train.steps=6", f"{method}.fm_draws=2",
            "train.eval_prompts=0", "train.checkpoint_every=0", "train.iterations=1", "reward.on_error=skip",
            *(["dgpo.trunc_steps=3"] if method == "dgpo" else []), f"output_dir={tmp_path / name}"]))
        part = tr.reward.parts["toy/bold_digit"]
        real = part._score
        first = tr.prompts(0)[0][0]
        part._score = lambda media, prompts, metadata: torch.where(
            torch.tensor([failing(p, first) for p in prompts]), torch.full((len(prompts),), float("nan")),
            real(media, prompts, metadata))
        before = {k: v.clone() for k, v in trainable_state(tr.gen.trainable_module, True).items()}
        history = tr.fit(progress=False)
        after = trainable_state(tr.gen.trainable_module, True)
        return history[0], any(not torch.allclose(before[k], after[k]) for k in before)

    metrics, moved = run("some", lambda p, first: p == first)
    assert math.isfinite(metrics["policy_loss"]) and math.isfinite(metrics["reward/mean"]) and moved
    metrics, moved = run("all", lambda p, first: True)
    assert not moved


def test_methods_that_cannot_skip_failed_samples_say_so(tmp_path):
    from flowalign.config import ConfigError

    with pytest.raises(ConfigError, match="method ac_flow cannot train around skipped samples"):
        load_config("configs/toy/digits_ac_flow.yaml", ["reward.on_error=skip", f"output_dir={tmp_path}"])
