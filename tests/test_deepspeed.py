"""Training and checkpoints under DeepSpeed ZeRO-2 on 2 CPU processes (``flowalign train`` under torchrun with
accelerate's DeepSpeed plugin; ``tests/deepspeed_cpu`` gives accelerate gloo, as it would get NCCL on GPUs).

ZeRO-2 partitions the optimizer state and the fp32 master weights across the processes. A checkpoint gathers both
into the name-keyed layout DDP and FSDP checkpoints have, so a run killed after its second checkpoint resumes to the
uninterrupted run's weights bit for bit (under bf16 too: the masters are saved, not their bf16 copies), and the same
checkpoint resumes on one process without DeepSpeed.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
RUN = ["configs/toy/digits_flow_grpo.yaml", "train.prompts_per_iteration=2", "flow_grpo.group_size=4",
       "train.steps=4", "train.eval_prompts=0", "train.iterations=4", "train.checkpoint_every=1",
       "train.updates_per_iteration=1", "train.ema_decay=0.9"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, processes: int, mixed_precision: str = "no", *extra: str) -> None:
    """``flowalign train`` on 2 processes under ZeRO-2 (``processes`` 1: one plain process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    cmd = [sys.executable]
    if processes > 1:
        env.update({"PYTHONPATH": f"{REPO / 'tests' / 'deepspeed_cpu'}{os.pathsep}{REPO}",
                    "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                    "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_MIXED_PRECISION": mixed_precision})
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run([*cmd, "-m", "flowalign", "train", *RUN, f"output_dir={out}", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]


def _resumed_from(run: Path, out: Path, processes: int, mixed_precision: str = "no") -> Path:
    """What a run killed after its second checkpoint leaves (its checkpoint-2), resumed to the end."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    _train(out, processes, mixed_precision, "--resume_from_checkpoint", "latest")
    return out


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2")
    _train(root / "run", 2)
    return root


def test_a_checkpoint_holds_the_whole_optimizer_state_and_the_ema(zero2):
    """Every trainable weight's Adam moments, gathered from both partitions, keyed by name; the EMA by name."""
    folder = zero2 / "run" / "checkpoints" / "checkpoint-2"
    weights = load_file(folder / "weights.safetensors")
    policy = torch.load(folder / "optimizer.pt", weights_only=True)["policy"]
    assert len(policy["state"]) == len(weights) > 0
    for name, entry in policy["state"].items():
        assert name.endswith(".weight") and ".default." in name  # the module's own names, no wrapper prefix
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"} and float(entry["step"]) == 2.0
        assert entry["exp_avg_sq"].min() >= 0
    moved = [name for name, entry in policy["state"].items() if entry["exp_avg"].abs().sum() > 0]
    assert len(moved) > len(weights) / 2  # (LoRA A matrices see no gradient while their B is still zero)
    ema = load_file(folder / "ema.safetensors")
    assert sum(not k.startswith("__") for k in ema) == len(weights)
    assert not any(k.startswith("module.") for k in ema)


def test_a_killed_zero2_run_resumes_to_the_uninterrupted_weights(zero2):
    resumed = _resumed_from(zero2 / "run", zero2 / "resumed", 2)
    uninterrupted, again = _final(zero2 / "run"), _final(resumed)
    assert uninterrupted.keys() == again.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], again[key]), key


def test_a_zero2_checkpoint_resumes_on_one_process_without_deepspeed(zero2):
    """The gathered state loads into a plain optimizer: the weights match the 2-process run to fp32 rounding."""
    resumed = _final(_resumed_from(zero2 / "run", zero2 / "one", 1))
    for key, value in _final(zero2 / "run").items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_bf16_resumes_from_the_fp32_master_weights(zero2, tmp_path):
    """DeepSpeed's bf16: the module computes in bf16 while the optimizer keeps fp32 masters; the checkpoint holds the
    masters (fp32, not bf16-representable in general), and the resumed run ends bit for bit where the other does."""
    _train(tmp_path / "run", 2, "bf16")
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "weights.safetensors")
    values = torch.cat([v.flatten() for v in saved.values()])
    assert values.dtype == torch.float32 and not torch.equal(values, values.bfloat16().float())
    resumed, bf16 = _final(_resumed_from(tmp_path / "run", tmp_path / "resumed", 2, "bf16")), _final(tmp_path / "run")
    for key, value in bf16.items():
        assert torch.equal(resumed[key], value), key
    assert any(not torch.equal(value, bf16[key]) for key, value in _final(zero2 / "run").items())  # bf16 was on
