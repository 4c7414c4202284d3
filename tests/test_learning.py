"""Every learning recipe raises its held-out reward well above the spread between *training* seeds, and a judge
the run does not optimise still reads the prompted digits.

The spreads are recorded by ``python -m benchmarks.learning_seeds`` (each recipe on three training seeds,
``benchmarks/results/learning_seeds.json``); a test here reruns seed 0 and asserts its gain is at least the
recipe's floor and three times the recorded std. The judge is ``toy/judge_digit``: a logistic regression on 8x8
pixels, a different model on different inputs from the CNN inside every digit reward (at least 75% read right);
for the video recipe, whose reward sees frames only, ``toy/motion_match`` (at least 95% of clips moving the
prompted way).
"""
import pytest

from benchmarks.learning_seeds import RECIPES, recorded, run_recipe


def test_every_recipe_has_a_recorded_spread_that_its_gain_clears():
    """The JSON behind the bars: three or more training seeds per recipe, every seed's gain above the floor, and
    the mean gain at least three stds above zero (fast: reads the file only)."""
    for name, recipe in RECIPES.items():
        spread = recorded(name)
        gains = [run["gain"] for run in spread["runs"]]
        assert len(gains) >= 3 and spread["config"] == recipe.config, name
        assert min(gains) >= recipe.floor, (name, gains)
        assert spread["gain_mean"] >= 3 * spread["gain_std"], (name, spread["gain_mean"], spread["gain_std"])
        assert spread["judge_after_min"] >= recipe.judge_floor, (name, spread["judge_after_min"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_gain_is_well_above_the_training_seed_spread(name, tmp_path):
    spread = recorded(name)
    run = run_recipe(name, 0, tmp_path)
    bar = max(RECIPES[name].floor, 3 * spread["gain_std"])
    print(f"{name}: {run['before']:.4f} -> {run['after']:.4f} (gain {run['gain']:.4f}, bar {bar:.4f}); "
          f"judge {run['judge_before']:.3f} -> {run['judge_after']:.3f}")
    assert run["gain"] >= bar, (run["gain"], bar)
    assert run["judge_after"] >= RECIPES[name].judge_floor, run["judge_after"]
