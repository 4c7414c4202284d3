"""Configs: typed loading, overrides, and one clear line for every kind of bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from flowalign.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    from flowalign.optimize_config import OptimizeConfig, load_optimize_config

    for path in (ROOT / "configs").rglob("*.yaml"):
        if "reno" in path.parts:  # `flowalign optimize` configs
            assert isinstance(load_optimize_config(path), OptimizeConfig), path
        elif "accelerate" not in path.parts:
            assert isinstance(load_config(path), RunConfig)


def test_optimize_config_file(tmp_path, capsys):
    from flowalign.cli import main

    out = tmp_path / "out"
    code = main(["optimize", "configs/reno/toy_digits.yaml", "--prompt", "a handwritten seven",
                 "reno.iterations=2", "reno.steps=2", "reno.render_steps=2", "--out", str(out)])
    assert code == 0 and (out / "best.png").is_file()
    bad = write(tmp_path, "method: reno\nlearning_rate: 3\n")
    assert main(["optimize", str(bad), "--prompt", "seven"]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "sample:\n  steps: 10\n"),
                      ["sample.steps=30", "sample.guidance=1e-1", "eval.rewards=toy/ink,toy/size",
                       "model.dtype=bfloat16"])
    assert cfg.sample.steps == 30 and cfg.sample.guidance == pytest.approx(0.1)
    assert cfg.eval.rewards == ["toy/ink", "toy/size"] and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("text, overrides, expected", [
    ("sample:\n  stepz: 3\n", [], "unknown key 'sample.stepz'"),
    ("bogus: 1\n", [], "unknown key 'bogus'"),
    ("sample:\n  steps: abc\n", [], "sample.steps: expected an integer, got 'abc'"),
    ("sample:\n  steps: 2.5\n", [], "sample.steps: expected an integer"),
    ("model:\n  local_files_only: 3\n", [], "model.local_files_only: expected true or false"),
    ("sample:\n  steps: 0\n", [], "sample.steps: 0 is out of range (allowed: in [1, 1000])"),
    ("model:\n  dtype: fp8\n", [], "model.dtype: expected one of 'float32', 'bfloat16', 'float16'"),
    ("eval:\n  prompt_file: no/such/file.txt\n", [], "eval.prompt_file: file 'no/such/file.txt' not found"),
    ("sample: 3\n", [], "sample: expected a section"),
    ("sample: [1, 2\n", [], "is not valid YAML"),
    ("", ["sample.guidance=-1"], "sample.guidance: -1.0 is out of range"),
    ("", ["justakey"], "override 'justakey': expected key=value"),
    ("", ["reward.options={toy/bold_digit: 7}"],
     "reward.options.toy/bold_digit: expected a mapping of constructor arguments, got 7"),
])
def test_bad_input_names_the_field(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, expected a YAML file"):
        load_config(tmp_path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError):
        load_config(deep)


def test_flags_config_and_overrides_in_any_order(tmp_path):
    """Every command parses its flags, its config and its overrides intermixed."""
    from flowalign.cli import _config_and_overrides, build_parser, parse

    parser = build_parser()
    for argv in (["train", "train.lr=1e-3", "configs/toy/digits_flow_grpo.yaml", "--resume-from-checkpoint", "latest",
                  "train.iterations=2"],
                 ["train", "--resume-from-checkpoint", "latest", "configs/toy/digits_flow_grpo.yaml", "train.lr=1e-3",
                  "train.iterations=2"]):
        args = parse(parser, argv)
        assert args.resume_from_checkpoint == "latest"
        config, overrides = _config_and_overrides(args)
        assert config == "configs/toy/digits_flow_grpo.yaml" and set(overrides) == {"train.lr=1e-3",
                                                                                   "train.iterations=2"}
    args = parse(parser, ["optimize", "reno.iterations=2", "--prompt", "a", "configs/reno/toy_digits.yaml",
                          "--prompt", "b", "--out", str(tmp_path)])
    assert args.prompt == ["a", "b"] and _config_and_overrides(args) == ("configs/reno/toy_digits.yaml",
                                                                         ["reno.iterations=2"])
    with pytest.raises(ConfigError, match="expected one config file"):
        _config_and_overrides(parse(parser, ["evaluate", "a.yaml", "b.yaml"]))


@pytest.mark.parametrize("args, expected", [
    (["evaluate", "{tmp}/c.yaml"], "unknown key 'sample.stepz'"),
    (["evaluate", "configs/toy/digits_demo.yaml", "sample.steps=many"], "sample.steps: expected an integer"),
    (["evaluate", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["generate", "--prompt", "a seven", "--model", "/no/such/model"], "no model_index.json there"),
])
def test_cli_prints_one_line_not_a_traceback(tmp_path, args, expected):
    write(tmp_path, "sample:\n  stepz: 3\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "flowalign", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flowalign: error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
