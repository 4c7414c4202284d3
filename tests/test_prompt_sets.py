"""Prompt files with metadata (.jsonl): parsing, one-line errors, the metadata reaching the rewards and the report."""
import json

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import FlowalignError
from flowalign.prompt_sets import read_prompt_set
from flowalign.training import make_trainer
from flowalign.training.prompts import iteration_prompts
from flowalign.training.report import heldout_prompts

SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3", "train.eval_prompts=0",
         "train.rollout_batch=8", "train.train_batch=8", "train.checkpoint_every=0", "train.iterations=1"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_jsonl_rows_are_prompts_and_metadata(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes(b"png")
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"prompt": " edit: make it red ", "image": "img/cat.png"}])
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    rows = read_prompt_set(path, "train.prompt_file")
    assert rows.prompts == ["a photo of a cat", "edit: make it red"]
    assert rows.metadata == [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
                             {"image": str(tmp_path / "img" / "cat.png")}]  # relative to the file's folder
    prompts, meta = rows.rows([1, 1])
    meta[0]["group"] = 3
    assert prompts == ["edit: make it red"] * 2 and "group" not in rows.metadata[1] and "group" not in meta[1]


def test_plain_text_files_keep_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('{"prompt": "not parsed"}\n\n a cat \n')
    rows = read_prompt_set(path, "train.prompt_file")
    assert rows.prompts == ['{"prompt": "not parsed"}', "a cat"] and rows.metadata == [{}, {}]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"train.prompt_file: '.*bad.jsonl' line 2 is not valid JSON"),
    ('["a cat"]', r"line 2 holds list, expected a JSON object with a \"prompt\""),
    ('{"text": "hello"}', r"line 2 has no \"prompt\" string \(the fields are \['text'\]\)"),
    ('{"prompt": "  "}', r"line 2 has no \"prompt\" string"),
    ('{"prompt": "x", "image": "missing.png"}', r"line 2: \"image\": 'missing.png' is not a file"),
    ('{"prompt": "x", "image": 3}', r"line 2: \"image\" must be a file path, got 3"),
])
def test_bad_jsonl_lines_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(FlowalignError, match=message) as err:
        read_prompt_set(path, "train.prompt_file")
    assert "\n" not in str(err.value)


def test_the_draws_are_those_of_the_same_prompts_in_a_text_file(tmp_path):
    """A .jsonl file draws the same prompts per iteration as the .txt of its prompts (same seeds, same rows)."""
    prompts = [f"prompt {i}" for i in range(7)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "row": i} for i, p in enumerate(prompts)])
    cfg = load_config("configs/toy/digits_flow_grpo.yaml", ["train.prompts_per_iteration=5"]).train
    for iteration in range(3):
        text, _ = iteration_prompts(cfg, iteration, read_prompt_set(tmp_path / "p.txt", "f"))
        drawn, meta = iteration_prompts(cfg, iteration, read_prompt_set(jsonl, "f"))
        assert drawn == text and [m["row"] for m in meta] == [prompts.index(p) for p in drawn]


def test_the_metadata_reaches_the_rewards_and_the_held_out_file_the_report(tmp_path):
    """Prompts that name no digit: the toy digit reward finds its target only in the rows' metadata. The report's
    and the monitor's prompts come from train.eval_prompt_file."""
    rows = [{"prompt": f"a handwritten numeral, style {i}", "digit": i % 10} for i in range(6)]
    train = write_jsonl(tmp_path / "train_metadata.jsonl", rows)
    held_out = write_jsonl(tmp_path / "test_metadata.jsonl", [{"prompt": "the held-out numeral", "digit": 4}])
    cfg = load_config("configs/toy/digits_flow_grpo.yaml", SMALL + [
        f"train.prompt_file={train}", f"train.eval_prompt_file={held_out}", "reward.weights={toy/digit_match: 1.0}",
        f"output_dir={tmp_path / 'run'}"])
    trainer = make_trainer(cfg)
    batch = trainer.rollout(0)
    trainer.score(batch)
    prompts, meta = trainer.prompts(0)
    assert [m["digit"] for m in meta] == [int(p.split()[-1]) % 10 for p in prompts]
    assert torch.isfinite(batch.rewards).all()
    assert heldout_prompts(5, trainer.heldout_file) == (["the held-out numeral"], [{"digit": 4}])
    trainer.acc.end_training()


def test_without_the_metadata_the_same_run_fails_on_the_missing_target(tmp_path):
    (tmp_path / "p.txt").write_text("a handwritten numeral\n")
    cfg = load_config("configs/toy/digits_flow_grpo.yaml", SMALL + [
        f"train.prompt_file={tmp_path / 'p.txt'}", "reward.weights={toy/digit_match: 1.0}",
        f"output_dir={tmp_path / 'run'}", "reward.on_error=stop"])
    trainer = make_trainer(cfg)
    with pytest.raises(Exception, match="names no digit"):
        trainer.score(trainer.rollout(0))
    trainer.acc.end_training()
