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
