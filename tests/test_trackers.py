"""Experiment trackers (``train.report_to``): which trackers a setting names, the one-line errors, the config as
hyperparameters, and a real ``flowalign train`` writing to tensorboard, an offline wandb run and trackio at once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowalign.config import ConfigError, load_config
from flowalign.training import trackers
from flowalign.training.run import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/toy/digits_flow_grpo.yaml"
TINY = ["train.iterations=1", "train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4",
        "train.eval_prompts=2", "train.eval_steps=4", "train.checkpoint_every=1"]


def test_report_to_names_the_trackers(monkeypatch):
    assert trackers.tracker_names("none") == [] and trackers.tracker_names("wandb") == ["wandb"]
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    assert trackers.tracker_names("all") == ["tensorboard", "trackio"]  # all: the installed ones
    with pytest.raises(ConfigError, match=r"^train.report_to: wandb is not installed \(pip install "
                                          r"'flowalign\[wandb\]', or report_to=tensorboard / none\)$"):
        trackers.check_trackers("wandb")
    trackers.check_trackers("all")


def test_an_unknown_tracker_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.report_to.*mlflow"):
        load_config(DEMO, ["train.report_to=mlflow", f"output_dir={tmp_path}"])


def test_the_config_is_stored_as_flat_hyperparameters(tmp_path):
    cfg = load_config(DEMO, ["modifiers={kl: {beta: 0.02}}", f"output_dir={tmp_path}"])
    flat = trackers.hyperparameters(cfg)
    assert flat["train.lr"] == cfg.train.lr and flat["flow_grpo.group_size"] == cfg.options.group_size
    assert flat["modifiers.kl.beta"] == 0.02 and flat["reward.weights.toy/bold_digit"] == 1.0
    assert flat["train.prompt_file"] == "None" and flat["train.report_to"] == "tensorboard"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_report_to_none_writes_no_tracker_files(tmp_path):
    train(DEMO, [*TINY, "train.report_to=none", f"output_dir={tmp_path}"], progress=False, print_fn=lambda _: None)
    assert (tmp_path / "final").is_dir() and not (tmp_path / "flowalign").exists()


@pytest.mark.slow
def test_flowalign_train_reports_to_every_tracker_offline(tmp_path):
    """``report_to=all`` from the command line, offline: tensorboard's events, a wandb offline run folder inside the
    output folder (its records hold the reward, the learning rate and the config; its media the sample grids of
    iterations 0 and 1 and the report's figures), and trackio's local database with the same metrics."""
    out, trackio_dir = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(trackio_dir),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flowalign", "train", DEMO, *TINY, "train.iterations=2",
                           "train.report_to=all",
                           f"output_dir={out}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from flowalign.app.runs import read_run
    view = read_run(out)  # tensorboard: the app's Train tab reads it; the report's figures are not shown twice
    assert {"reward/mean", "lr", "policy_loss"} <= set(view.scalars)
    assert [c for _, c in view.images if c.startswith("samples")] == ["samples · iteration 0",
                                                                        "samples · iteration 1"]
    assert [c for _, c in view.images if c.startswith("report")] == ["report/before.png", "report/after.png",
                                                                      "report/reward_curve.png"]

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = next(run_dir.glob("run-*.wandb")).read_bytes()
    for key in (b"reward/mean", b"lr", b"time/iteration"):  # protobuf: a history item's key, length-prefixed
        assert b"\x12" + bytes([len(key)]) + key in records, key
    assert b"train.report_to" in records and b"flow_grpo.group_size" in records
    media = sorted(p.relative_to(run_dir / "files" / "media" / "images").as_posix().rsplit("_", 2)[0]
                   for p in (run_dir / "files" / "media" / "images").rglob("*.png"))
    assert media == ["report/after", "report/before", "report/reward_curve", "samples", "samples"]

    import sqlite3
    with sqlite3.connect(trackio_dir / "flowalign.db") as db:
        rows = db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
    assert {name for name, _, _ in rows} == {"run"}
    assert any(b'"reward/mean"' in m and b'"lr"' in m for _, step, m in rows if step == 0)
    assert len(list((trackio_dir / "media").rglob("*.png"))) == 5
