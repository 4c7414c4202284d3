"""A fault-injection reward in training: it raises an ordinary exception, returns the wrong number of scores, a
NaN, or hangs, on one sample. ``reward.on_error=stop``: one line; ``skip``: only that sample is NaN (advantage 0),
the others train."""
import threading

import pytest
import torch

from flowalign import rewards
from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.training import make_trainer

SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
         "train.checkpoint_every=0", "train.iterations=1", "train.updates_per_iteration=1", "reward.timeout_s=2"]
BAD = 5  # the sample the plug-in fails on (its input is marked by an all-ones image)
released = threading.Event()


def faulty(kind: str):
    """A reward whose ``_score`` misbehaves whenever the marked sample is in its batch."""
    reward = rewards.load("toy/bold_digit")
    real = reward._score

    def score(media, prompts, metadata):
        if bool((media.flatten(1) == 1).all(dim=1).any()):
            if kind == "raises":
                raise ValueError("plug-in bug")
            if kind == "wrong_length":
                return real(media, prompts, metadata)[:-1] if len(media) > 1 else torch.zeros(2)
            if kind == "nan":
                return real(media, prompts, metadata) * float("nan")
            released.wait(30)  # hangs (released at the end of the test)
        return real(media, prompts, metadata)

    reward._score = score
    return reward


def _trainer(tmp_path, kind: str, policy: str):
    tr = make_trainer(load_config("configs/toy/digits_flow_grpo.yaml", [*SMALL, f"reward.on_error={policy}",
                                                                         f"output_dir={tmp_path / kind / policy}"]))
    tr.reward.parts["toy/bold_digit"] = faulty(kind)
    decode = tr.decode

    def marked(batch):  # the BAD-th sample decodes to an all-ones image
        decode(batch)
        batch.media[BAD] = 1.0
    tr.decode = marked
    return tr


@pytest.mark.parametrize("kind", ["raises", "wrong_length", "nan", "hangs"])
def test_a_failing_plug_in_follows_on_error(tmp_path, kind):
    released.clear()
    try:
        with pytest.raises(FlowalignError, match=r"^reward failed at iteration 0 \(.+\); stopping \(set "
                                                 r"reward.on_error=skip") as err:
            _trainer(tmp_path, kind, "stop").run_iteration(0)
        assert "\n" not in str(err.value)
        _, batch = _trainer(tmp_path, kind, "skip").run_iteration(0)
        nan = torch.isnan(batch.rewards)
        assert nan.tolist() == [i == BAD for i in range(len(nan))], batch.rewards
        assert batch.leaf_advantages[BAD] == 0 and bool((batch.leaf_advantages[~nan] != 0).any())
    finally:
        released.set()


def test_the_report_leaves_out_held_out_samples_whose_reward_failed(tmp_path, monkeypatch, capsys):
    """``skip`` at evaluation: the held-out samples of one digit fail; the report's means are over the others and
    say how many were skipped; the run ends normally (it used to exit with status 2)."""
    import json

    import flowalign.training.run as run

    real_make, real_score = run.make_trainer, None

    def make(cfg):
        nonlocal real_score
        tr = real_make(cfg)
        part = tr.reward.parts["toy/bold_digit"]
        real_score = part._score

        def fails_on_threes(media, prompts, metadata):
            if any(m.get("digit") == 3 for m in metadata or []):
                raise ValueError("cannot score a three")
            return real_score(media, prompts, metadata)
        part._score = fails_on_threes
        return tr

    monkeypatch.setattr(run, "make_trainer", make)
    metrics = run.train("configs/toy/digits_flow_grpo.yaml",
                        [*SMALL, "train.eval_prompts=20", "train.eval_steps=4", "reward.on_error=skip",
                         f"output_dir={tmp_path}"], progress=False)
    threes = sum(m["digit"] == 3 for m in run.heldout_prompts(20, None)[1])
    assert threes > 0
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["reward_before_skipped"] == saved["reward_after_skipped"] == threes
    assert torch.isfinite(torch.tensor([saved["reward_before"], saved["reward_after"]])).all()
    assert metrics["reward_after"] == saved["reward_after"]
    assert "skipping" in capsys.readouterr().out
