"""The commands end to end: generate (PNG, seeded), evaluate (table + JSON), toy build (quick), rewards list."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import flowalign
from flowalign import rewards
from flowalign.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_generate_is_seeded(tmp_path):
    args = ["generate", "--prompt", "a handwritten seven", "--prompt", "the digit 4", "--num", "3", "--steps", "6"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = ((tmp_path / f"{n}.png").read_bytes() for n in "abc")
    assert a == b and a != c


def test_generate_bad_input(tmp_path, capsys):
    assert main(["generate", "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert main(["generate", "--prompt", "a one", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flowalign: error: --prompt-file: file '{tmp_path / 'none.txt'}' not found",
                   "flowalign: error: --steps: expected a number in [1, 1000], got 0"]


def test_evaluate_prints_a_table_and_writes_results(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 1\n")
    code = main(["evaluate", "configs/toy/digits_demo.yaml", "eval.toy_prompts=20", f"eval.prompt_file={prompts}",
                 "eval.rewards=toy/digit_match,toy/ink", "sample.steps=8", f"output_dir={tmp_path / 'out'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "toy/digit_match" in out and "toy/ink" in out and "22 samples" in out
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["samples"] == 22 and 0 <= summary["rewards"]["toy/digit_match"]["mean"] <= 1
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0


def test_evaluate_unknown_reward_is_one_line(tmp_path, capsys):
    code = main(["evaluate", "eval.toy_prompts=2", "eval.rewards=toy/nothing", f"output_dir={tmp_path}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("flowalign: error: reward 'toy/nothing': unknown")


def test_rewards_list():
    proc = subprocess.run([sys.executable, "-m", "flowalign", "rewards", "list"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert "toy/classifier" in proc.stdout.split()
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    # each with its modality, kind, differentiability, what it loads and its docstring's first line, read from
    # the class without loading any weights
    assert lines["pickscore"].split()[1:5] == ["image", "pointwise", "differentiable", "yuvalkirstain/PickScore_v1"]
    assert lines["toy/preference"].split()[1:4] == ["image", "pairwise", "differentiable"]
    assert lines["toy/music_fad"].split()[1:4] == ["audio", "set", "-"]
    assert "toy music encoder" in lines["toy/music_fad"]
    assert lines["http"].split()[1:4] == ["image", "pointwise", "-"] and "a server (url)" in lines["http"]
    assert "Probability the classifier gives to the prompted digit" in lines["toy/classifier"]
    assert "cannot be imported" not in proc.stdout


@pytest.mark.slow
def test_toy_build_quick_writes_loadable_models(tmp_path):
    """`flowalign toy build --quick` runs every training script and writes what the loaders read."""
    assert main(["toy", "build", "--quick", "--out", str(tmp_path)]) == 0
    gen = flowalign.load_generator(str(tmp_path / "digits"), device="cpu")
    media = flowalign.generate(gen, ["a handwritten two"], steps=2)
    assert media.shape == (1, 3, 16, 16)
    assert rewards.load("toy/classifier", path=tmp_path / "classifier").score(media, ["a two"]).shape == (1,)
    assert rewards.load("toy/clipscore", path=tmp_path / "clip").score(media, ["a two"]).shape == (1,)
