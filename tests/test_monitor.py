"""The reward-hacking monitor: guard metrics on fixed held-out prompts and seeds, the alarm rule, its actions, and
that it fires on a run hacking its reward (the uncapped bold digits). That it stays quiet on the defended demo is
tested on ``make demo``'s own run (tests/test_readme.py)."""
import pytest
import torch

from flowalign.app.runs import read_run
from flowalign.config import ConfigError, load_config
from flowalign.training import make_trainer
from flowalign.training.monitor import monitor_summary, per_prompt_diversity
from flowalign.training.run import train

UNCAPPED = "configs/toy/digits_uncapped_flow_grpo.yaml"


def test_diversity_by_hand():
    """Two prompts x 2 samples: identical samples have Vendi score 1, samples orthogonal after centring score 2."""
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    media = torch.stack([a, a, a, b]).view(4, 1, 2, 2)  # prompt 1: a, a; prompt 2: a, b
    # centred, a - 1/4 and b - 1/4 have dot -1/4 and squared norms 3/4: cosine -1/3. The kernel [[1, -1/3],
    # [-1/3, 1]]/2 has eigenvalues 2/3 and 1/3: Vendi exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8898816
    assert abs(per_prompt_diversity(media, 2) - (1.0 + 1.8898816) / 2) < 1e-5


def test_alarm_rule_by_hand(tmp_path):
    """The first evaluation is the reference. A guard falling 10% or less, or the reward not rising, raises
    nothing; a guard falling 20% while the reward rose raises the alarm once, naming the guard and both values."""
    only_judge = ["monitor.guards={toy/judge_digit: 0.1}", "train.eval_prompts=0"]
    m = make_trainer(load_config(UNCAPPED, [*only_judge, f"output_dir={tmp_path}"])).monitor
    first = {"monitor/reward": 0.5, "monitor/toy/judge_digit": 1.0, "monitor/diversity": 1.5}
    assert m.check(first, -1) is None
    assert m.check({**first, "monitor/reward": 0.9, "monitor/toy/judge_digit": 0.9}, 4) is None  # within 10%
    assert m.check({**first, "monitor/reward": 0.4, "monitor/toy/judge_digit": 0.5}, 9) is None  # reward fell
    alarm = m.check({**first, "monitor/reward": 0.9, "monitor/toy/judge_digit": 0.8}, 14)
    assert alarm and "toy/judge_digit fell 1.000 -> 0.800 (-20%, tolerance 10%)" in alarm and "iteration 14" in alarm
    assert m.check({**first, "monitor/reward": 0.95, "monitor/toy/judge_digit": 0.1}, 19) is None  # once
    diverse = make_trainer(load_config(UNCAPPED, [*only_judge, f"output_dir={tmp_path / 'd'}"])).monitor
    diverse.check(first, -1)
    assert "diversity fell" in diverse.check({**first, "monitor/reward": 0.9, "monitor/diversity": 1.1}, 4)


def test_the_summary_line_by_hand():
    """The last line of a monitored run: alarm or not, each guard from before training to the last evaluation."""
    first = {"monitor/reward": 0.3, "monitor/toy/clipscore": 73.0, "monitor/diversity": 1.305}
    history = [{"iteration": 0}, {"iteration": 9, "monitor/reward": 0.5, "monitor/toy/clipscore": 71.4,
                                  "monitor/diversity": 1.25}]
    assert monitor_summary(first, history, None) == ("monitor: no alarm over 1 evaluations (reward 0.3 -> 0.5, "
                                                     "toy/clipscore 73 -> 71.4, diversity 1.3 -> 1.25)")
    assert monitor_summary(first, history, "fell").startswith("monitor: alarm over 1 evaluations")
    assert monitor_summary(None, [], None) == "monitor: no evaluation"


def test_bad_monitor_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="monitor.guards: unknown reward 'toy/nope'"):
        load_config(UNCAPPED, ["monitor.guards={toy/nope: 0.1}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="monitor.samples_per_prompt to 2 or more"):
        load_config(UNCAPPED, ["monitor.samples_per_prompt=1", f"output_dir={tmp_path}"])


@pytest.mark.slow
def test_the_monitor_fires_on_the_uncapped_run(tmp_path):
    """The uncapped bold reward floods the frame with ink: the toy CLIP score of the prompt falls while the reward
    rises, the monitor warns once, checkpoints at the alarm, and draws its guards in the report (measured: CLIP
    score 73.0 -> 56.8, the judge 1.0 -> 0.97; the capped demo keeps 73 -> 72.9 and 1 -> 1)."""
    budget = ["train.iterations=20", "train.eval_prompts=8", "train.eval_steps=10", "train.checkpoint_every=0"]
    lines = []
    hacked = train(UNCAPPED, [*budget, f"output_dir={tmp_path / 'uncapped'}"], progress=False, print_fn=lines.append)
    alarms = [h for h in hacked["history"] if h.get("monitor/alarm")]
    assert len(alarms) == 1 and "toy/clipscore fell" in hacked["monitor"]["alarm"]
    assert [h["iteration"] for h in hacked["history"] if "monitor/reward" in h] == [4, 9, 14, 19]
    at = alarms[0]["iteration"] + 1
    assert (tmp_path / "uncapped" / "checkpoints" / f"checkpoint-{at}").is_dir()
    assert (tmp_path / "uncapped" / "report" / "monitor.png").is_file()
    assert any(line.startswith("monitor: alarm over 4 evaluations") for line in lines)
    view = read_run(tmp_path / "uncapped")  # the app's Train tab: the guard plot and the monitor's scalars
    assert "report/monitor.png" in [caption for _, caption in view.images]
    assert {"monitor/toy/clipscore", "monitor/alarm"} <= set(view.scalars)


@pytest.mark.slow
def test_on_alarm_stop_ends_training_and_resume_keeps_the_reference(tmp_path):
    """``on_alarm: stop`` checkpoints and ends the loop at the alarm (a 1% tolerance fires early); the report is
    still written. The reference evaluation and the alarm travel in the checkpoint: a resumed run does not
    measure its start again, and stops at once."""
    out = tmp_path / "stop"
    settings = ["train.iterations=10", "monitor.every=2", "monitor.guards={toy/clipscore: 0.01}",
                "monitor.diversity_drop=null", "monitor.on_alarm=stop", "train.checkpoint_every=0"]
    metrics = train(UNCAPPED, [*settings, "train.eval_prompts=8", "train.eval_steps=10", f"output_dir={out}"],
                    progress=False)
    stopped = len(metrics["history"])
    assert stopped < 10 and metrics["history"][-1].get("monitor/alarm") == 1.0
    assert (out / "report" / "metrics.json").is_file() and (out / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    resumed = make_trainer(load_config(UNCAPPED, [*settings, "train.eval_prompts=0", f"output_dir={out}"]))
    history = resumed.fit(resume="latest", progress=False)
    assert len(history) == stopped and resumed.monitor.first == metrics["monitor"]["first"]
