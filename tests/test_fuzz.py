"""Hostile input through the CLI, in-process with a time limit: every case is status 0, or status 2 with one
``flowalign: error:`` line; none raises a traceback or runs without bound (see ``tests/fuzz.py``)."""
import collections

import pytest
from fuzz import cli_cases, hostile_files, mutated_configs, run_case

CONFIG = "configs/toy/digits_flow_grpo.yaml"
SMALL = ["train.iterations=1", "train.prompts_per_iteration=2", "train.steps=4", "train.eval_prompts=2",
         "train.eval_steps=2", "flow_grpo.group_size=2"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from a scratch folder: a mutated config's relative output lands there, not in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _report(cases, outcomes) -> str:
    bad = [(case, o) for case, o in zip(cases, outcomes) if o.kind not in ("ok", "long")]
    return "\n".join(f"{o.kind}: {case}\n{o.detail[-800:]}" for case, o in bad[:5])


@pytest.mark.slow
def test_two_hundred_mutated_shipped_configs(in_tmp):
    cases = mutated_configs(seed=0, count=220, folder=in_tmp)
    outcomes = [run_case([command, str(path)], limit_s=15) for command, path, _ in cases]
    kinds = collections.Counter(o.kind for o in outcomes)
    assert kinds["traceback"] == kinds["many-lines"] == kinds["unbounded"] == 0, (kinds, _report(
        [what for *_, what in cases], outcomes))
    assert kinds["ok"] >= 200 and sum(o.code == 0 for o in outcomes) >= 5, kinds  # some stay valid and run


def test_a_hundred_and_fifty_hostile_command_lines(in_tmp):
    cases = cli_cases(seed=0, count=150, folder=in_tmp)
    outcomes = [run_case(argv, limit_s=15) for argv in cases]
    kinds = collections.Counter(o.kind for o in outcomes)
    assert kinds["traceback"] == kinds["many-lines"] == kinds["unbounded"] == 0, (kinds, _report(cases, outcomes))
    assert sum(o.code == 0 for o in outcomes) >= 10, kinds


def listed_cases(files: dict) -> list[tuple[list[str], str]]:
    """Each case the reliability review listed, with the one line it now gets."""
    gen = ["generate", "--prompt", "a 3", "--num", "2", "--steps", "2"]
    train = ["train", CONFIG, *SMALL, "output_dir=run"]
    return [
        ([*train, "train.lr=.nan"], "train.lr: expected a finite number, got nan"),
        ([*train, "flow_grpo.timestep_fraction=.nan"], "flow_grpo.timestep_fraction: expected a finite number"),
        ([*train, "reward.weights={toy/bold_digit: .nan}"], "reward.weights.toy/bold_digit: expected a finite number"),
        ([*gen, "--guidance", "nan"], "--guidance: expected a number in [0, 100], got nan"),
        (["train", files["latin1"]], "is not UTF-8 text"),
        (["train", files["binary"]], "is not UTF-8 text"),
        (["train", files["deep"]], "nested too deeply"),
        ([*train, "reward.weights={}"], "reward.weights: expected at least one reward"),
        ([*train, f"train.lora_rank={2 ** 63}"], "train.lora_rank: 9223372036854775808 is out of range"),
        ([*train, "train.lr=[1,"], "override 'train.lr=[1,': the value is not valid YAML"),
        ([*train, f"train.prompt_file={files['folder']}"], "is a folder, expected a text file"),
        ([*gen, "--out", files["folder"]], "--out: expected a file name ending in .png"),
        ([*gen, "--out", "grid.xyz"], "--out: unknown file type '.xyz'"),
        ([*gen, "--seed", str(2 ** 70)], "--seed: expected a number in [0, 4611686018427387904]"),
        ([*gen, "--model", files["toy-truncated"]], "cannot load it (OSError: Unable to load weights"),
        ([*gen, "--model", files["toy-badjson"]], "config.json' is not valid JSON"),
        ([*gen, "--model", files["model-badjson"]], "model_index.json' is not UTF-8 text"),
        ([*gen, "--prompt-file", "/dev/zero"], "'/dev/zero' is not a regular file"),
        ([*gen, "--prompt-file", files["big"]], "is larger than the limit of 16 MiB"),
        ([*gen, "--num", "100000"], "--num: expected a number in [1, 1024], got 100000"),
        (["evaluate", CONFIG, "eval.toy_prompts=1000000000000", "output_dir=ev"],
         "eval.toy_prompts: 1000000000000 is out of range (allowed: in [0, 100000])"),
        ([*train, "output_dir="], "output_dir: expected a folder name"),
        ([*train, f"output_dir={files['under-file']}"], "output_dir: cannot write to"),
    ]


def test_each_listed_case_is_one_line_with_status_2(in_tmp):
    files = hostile_files(in_tmp / "files")
    deep = in_tmp / "deep.yaml"
    deep.write_text("a: " + "[" * 1000 + "]" * 1000 + "\n")
    files["deep"] = str(deep)
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parent.parent / "configs", in_tmp / "configs")
    for argv, message in listed_cases(files):
        outcome = run_case(argv, limit_s=30)
        assert (outcome.kind, outcome.code) == ("ok", 2) and message in outcome.detail, (argv[-3:], outcome)


def test_a_config_path_holding_an_equals_sign_is_the_config(in_tmp):
    files = hostile_files(in_tmp / "files")
    outcome = run_case(["train", files["equals"], *SMALL, "train.eval_prompts=0", "output_dir=run"], limit_s=60)
    assert (outcome.kind, outcome.code) == ("ok", 0), outcome
