"""Flow-GRPO and DanceGRPO learn on the toy world: "bold digits" (classifier probability x capped ink)
rises on held-out prompts (phrasings never trained on) and held-out seeds, far above the seed spread.

Measured (2 CPU cores, 15-30 s each): base 0.664; Flow-GRPO -> 0.876 (+0.212), DanceGRPO -> 0.819 (+0.156)
after 16 iterations of 4 groups x 8; the std of the base model's mean over 4 evaluation seeds is 0.004.
"""
import pytest
import torch

import flowalign
import rewards
from flowalign.training.report import EVAL_SEED, heldout_prompts
from flowalign.training.run import train

BUDGET = ["train.iterations=16", "train.prompts_per_iteration=4", "train.group_size=8", "train.steps=8",
          "train.eval_prompts=60", "train.eval_steps=10", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def seed_spread():
    """Std of the base model's mean reward over 4 evaluation seeds (same prompts, steps, CFG)."""
    gen = flowalign.load_generator("toy/digits", device="cpu")
    reward = rewards.load("toy/bold_digit")
    prompts, meta = heldout_prompts(60, None)
    means = [reward.score(flowalign.generate(gen, prompts, steps=10, guidance=3.0, seed=EVAL_SEED + k),
                          prompts, meta).mean() for k in range(4)]
    return torch.stack(means).std().item()


@pytest.mark.parametrize("config, min_gain", [("configs/toy/digits_flow_grpo.yaml", 0.1),
                                              ("configs/toy/digits_dance_grpo.yaml", 0.08)])
def test_reward_rises_well_above_seed_spread(tmp_path, seed_spread, config, min_gain):
    metrics = train(config, BUDGET + [f"output_dir={tmp_path}"], progress=False, print_fn=lambda *_: None)
    gain = metrics["reward_after"] - metrics["reward_before"]
    assert seed_spread < 0.01
    assert gain > min_gain and gain > 5 * seed_spread, (gain, seed_spread)
