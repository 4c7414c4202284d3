"""Checkpoints under damage and full disks: manifests, `latest` skipping a corrupt folder, one-line errors for a
named corrupt or mismatched checkpoint, and writes that fail cleanly."""
import errno
import json

import pytest
import torch
from test_grpo import SMALL, trainer

from flowalign.cli import main
from flowalign.training import checkpoint as ckpt
from flowalign.training.lora import trainable_state


def three_checkpoints(root):
    for i in (1, 2, 3):
        ckpt.save_checkpoint(root, i, {"w": torch.full((3,), float(i))}, {"step": i}, {"history": []},
                             config={"shape": {"train.lora_rank": 8}})
    return [root / f"checkpoint-{i}" for i in (1, 2, 3)]


def test_a_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    import hashlib

    newest = three_checkpoints(tmp_path)[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["optimizer.pt", "state.json", "weights.safetensors"]
    for name, entry in manifest["files"].items():
        data = (newest / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["config"] == {"shape": {"train.lora_rank": 8}}
    assert ckpt.problem(newest) is None


@pytest.mark.parametrize("damage, why", [
    (lambda c: (c / "weights.safetensors").write_bytes((c / "weights.safetensors").read_bytes()[:40]),
     r"weights.safetensors has 40 bytes, the manifest says \d+"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"\0" * (c / "optimizer.pt").stat().st_size),
     "optimizer.pt does not match its checksum"),
    (lambda c: (c / "state.json").write_text('{"iteration": 99, "history": []}'[:len((c / "state.json").read_text())]),
     "state.json does not match its checksum"),
    (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    (lambda c: (c / "manifest.json").write_text("{broken"), "manifest.json is not readable"),
])
def test_latest_skips_a_damaged_checkpoint_with_one_warning_and_a_named_one_is_one_line(tmp_path, damage, why):
    first, second, third = three_checkpoints(tmp_path)
    damage(third)
    warnings = []
    assert ckpt.resolve(tmp_path, "latest", warn=warnings.append) == second
    assert len(warnings) == 1 and warnings[0].startswith(f"flowalign: warning: skipping {third}: ")
    assert pytest.importorskip("re").search(why, warnings[0])
    with pytest.raises(ckpt.CheckpointError, match=f"^resume_from_checkpoint: {third}: {why}$"):
        ckpt.resolve(tmp_path, str(third))


def test_when_no_checkpoint_is_intact_latest_is_one_line_and_starts_nothing(tmp_path):
    for folder in three_checkpoints(tmp_path):
        (folder / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"^no intact checkpoint under .* \(checkpoint-3, checkpoint-2, "
                                                   r"checkpoint-1 skipped\); move them away to start from scratch$"):
        ckpt.resolve(tmp_path, "latest", warn=lambda _: None)


def test_weights_that_are_not_finite_do_not_load(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, float("nan")])}, {}, {"history": []})
    with pytest.raises(ckpt.CheckpointError, match="weight 'w' is not finite"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-1")


def test_a_full_disk_leaves_no_temporary_folder_and_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = three_checkpoints(tmp_path)[-1]
    real = ckpt.torch.save

    def disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match=f"^could not write checkpoint {tmp_path / 'checkpoint-4'}: No "
                                                   f"space left on device \\({first} is intact\\)$"):
        ckpt.save_checkpoint(tmp_path, 4, {"w": torch.ones(3)}, {}, {"history": []})
    monkeypatch.setattr(ckpt.torch, "save", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert ckpt.resolve(tmp_path, "latest") == first


# ---------------------------------------------------------------------------------------------- through training

def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, capsys):
    straight = trainer(tmp_path, "train.iterations=3", name="straight")
    straight.fit(progress=False)
    first = trainer(tmp_path, "train.iterations=2", "train.checkpoint_every=1")
    first.fit(progress=False)
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    (newest / "weights.safetensors").write_bytes((newest / "weights.safetensors").read_bytes()[:100])
    resumed = trainer(tmp_path, "train.iterations=3", "train.checkpoint_every=1")
    resumed.fit(resume="latest", progress=False)
    assert f"skipping {newest}: weights.safetensors has 100 bytes" in capsys.readouterr().out
    a = trainable_state(straight.gen.trainable_module, True)
    b = trainable_state(resumed.gen.trainable_module, True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(tmp_path, capsys, *args) -> tuple[int, str]:
    code = main(["train", "configs/toy/digits_flow_grpo.yaml", *SMALL, f"output_dir={tmp_path / 'run'}",
                 "train.eval_prompts=0", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""  # the progress bar writes above it


@pytest.fixture
def two_iterations(tmp_path, capsys):
    assert cli(tmp_path, capsys, "train.iterations=2", "train.checkpoint_every=1")[0] == 0
    return tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("args, message", [
    (["train.lora_rank=4"], r"checkpoint-2 does not fit this run: weight '.*lora_A.*' has shape \(8, \d+\), this "
                            r"run's \(4, \d+\) \(the checkpoint was made with train.lora_rank=8 there, 4 here\)$"),
    (["train.iterations=1"], r"checkpoint-2: holds 2 iterations, more than this run's train.iterations \(1\)$"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_one_line(tmp_path, capsys, two_iterations, args, message):
    code, err = cli(tmp_path, capsys, "train.iterations=3", "--resume_from_checkpoint", "latest", *args)
    assert code == 2 and len(err.splitlines()) == 1 and pytest.importorskip("re").search(message, err), err


def test_a_named_corrupt_checkpoint_is_one_line(tmp_path, capsys, two_iterations):
    named = two_iterations / "checkpoint-1"
    (named / "optimizer.pt").write_bytes(b"garbage")
    code, err = cli(tmp_path, capsys, "train.iterations=3", "--resume_from_checkpoint", str(named))
    size = json.loads((named / "manifest.json").read_text())["files"]["optimizer.pt"]["bytes"]
    assert (code, err) == (2, f"flowalign: error: resume_from_checkpoint: {named}: optimizer.pt has 7 bytes, the "
                              f"manifest says {size}")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_output_dir_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, where):
    import flowalign.training.trainer as trainer_module

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker if where == "a file" else blocker / "run"
    monkeypatch.setattr(trainer_module, "load_generator", lambda *a, **k: pytest.fail("loaded a model"))
    code = main(["train", "configs/toy/digits_flow_grpo.yaml", f"output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"flowalign: error: output_dir: cannot write to '{out}' (") and \
        len(err.splitlines()) == 1, err


def test_a_full_disk_at_a_checkpoint_stops_with_one_line_and_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    real, calls = ckpt.torch.save, []

    def full_on_the_second_checkpoint(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", full_on_the_second_checkpoint)
    code, err = cli(tmp_path, capsys, "train.iterations=3", "train.checkpoint_every=1")
    root = tmp_path / "run" / "checkpoints"
    assert (code, err) == (2, f"flowalign: error: could not write checkpoint {root / 'checkpoint-2'}: No space left "
                              f"on device ({root / 'checkpoint-1'} is intact)")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1"] and ckpt.problem(root / "checkpoint-1") is None


def test_an_interrupt_mid_write_leaves_no_temporary_folder(tmp_path, monkeypatch):
    three_checkpoints(tmp_path)

    def interrupted(obj, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, {"w": torch.ones(3)}, {}, {"history": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
