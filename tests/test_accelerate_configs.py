"""configs/accelerate/*.yaml: valid for ``accelerate launch --config_file`` (no GPU needed to check)."""
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
EXPECTED = {"single_gpu": (DistributedType.NO, 1), "multi_gpu": (DistributedType.MULTI_GPU, 8),
            "multi_node": (DistributedType.MULTI_GPU, None), "fsdp": (DistributedType.FSDP, 8),
            "zero2": (DistributedType.DEEPSPEED, 8), "zero3": (DistributedType.DEEPSPEED, 8)}


def test_the_expected_files_exist():
    assert {p.stem for p in ROOT.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_as_accelerate_cluster_config(name, monkeypatch):
    path = ROOT / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    config = ClusterConfig.from_yaml_file(str(path))  # raises on keys accelerate does not know
    kind, processes = EXPECTED[name]
    assert config.distributed_type == kind
    if processes is not None:
        assert config.num_processes == processes
    # the launcher's own reading of the file: nested keys must be launch options too
    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    for key in raw.get("deepspeed_config", {}):
        assert key in options, f"{name}: unknown deepspeed_config key {key}"
    for key in raw.get("fsdp_config", {}):
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in options, f"{name}: unknown fsdp_config key {key}"
    for var in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    assert args.multi_gpu == (kind == DistributedType.MULTI_GPU)
    assert args.use_fsdp == (kind == DistributedType.FSDP)
    assert args.use_deepspeed == (kind == DistributedType.DEEPSPEED)
    assert args.num_processes == config.num_processes


def test_multi_node():
    c = ClusterConfig.from_yaml_file(str(ROOT / "multi_node.yaml"))
    assert c.num_machines > 1 and c.num_processes % c.num_machines == 0 and c.machine_rank == 0
    assert c.main_process_ip and isinstance(c.main_process_port, int)
    assert c.rdzv_backend == "static" and c.same_network is True


def test_zero_configs_load_frozen_models_normally():
    for stage in (2, 3):
        ds = ClusterConfig.from_yaml_file(str(ROOT / f"zero{stage}.yaml")).deepspeed_config
        assert ds["zero_stage"] == stage and ds["zero3_init_flag"] is False


def test_fsdp_wraps_the_diffusers_blocks(toy_generator):
    """FULL_SHARD, orig params (LoRA), bf16, transformer auto-wrap. No class list: accelerate falls back to
    the model's ``_no_split_modules`` (a listed class the model lacks is an error), which are the blocks."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    c = ClusterConfig.from_yaml_file(str(ROOT / "fsdp.yaml"))
    fsdp = c.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and c.mixed_precision == "bf16"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert SD3Transformer2DModel._no_split_modules == ["JointTransformerBlock"]
    assert FluxTransformer2DModel._no_split_modules == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert WanTransformer3DModel._no_split_modules == ["WanTransformerBlock"]
    module = toy_generator.trainable_module  # a tiny SD3 transformer
    assert all(get_module_class_from_name(module, n) is not None for n in module._no_split_modules)


def test_deepspeed_checkpoints_need_zero_stage_1_or_2():
    """ZeRO-1/2 checkpoints gather the partitioned optimizer (tests/test_deepspeed.py); ZeRO-3 also partitions the
    weights: one line before anything loads."""
    from types import SimpleNamespace

    from flowalign.checks import check_engine
    from flowalign.typed import ConfigError

    with pytest.raises(ConfigError, match=r"^train.checkpoint_every: checkpoints under DeepSpeed need ZeRO stage 1 "
                                          r"or 2, got stage 3"):
        check_engine("DEEPSPEED", SimpleNamespace(checkpoint_every=5), 3)
    check_engine("DEEPSPEED", SimpleNamespace(checkpoint_every=0), 3)
    check_engine("DEEPSPEED", SimpleNamespace(checkpoint_every=5), 2)
    check_engine("FSDP", SimpleNamespace(checkpoint_every=5))
