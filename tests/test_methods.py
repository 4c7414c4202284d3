"""The recipe architecture: methods and modifiers found by name, each method's options under its own key,
combinations that used to be ignored now one-line errors, and every rule checked before weights load."""
import re
from pathlib import Path

import pytest
import torch

from flowalign.checks import check_training
from flowalign.config import ConfigError, load_config
from flowalign.methods import methods, modifiers

ROOT = Path(__file__).resolve().parents[1]
FLOW = "configs/toy/digits_flow_grpo.yaml"


def test_registry_finds_every_method_and_modifier():
    assert {"flow_grpo", "dance_grpo", "mix_grpo", "tempflow_grpo", "g2rpo", "tree_grpo", "ac_flow", "orw_cfm_w2",
            "dragon", "dr_grpo"} <= set(methods())
    assert {"kl", "grpo_guard", "cps", "fast", "flash", "layer_tuning"} <= set(modifiers())
    for name, cls in methods().items():
        assert cls.name == name and cls.family in ("policy_gradient", "flow_matching") and cls.title
        cfg = load_config(None, [f"method={name}"])  # the paper's defaults validate on their own
        assert isinstance(cfg.options, cls.Options)


@pytest.mark.parametrize("overrides, message", [
    # Dynamic-TreeRPO's groups are its 2^depth leaves: a group size used to be accepted and ignored
    (["method=tree_grpo", "flow_grpo=null", "tree_grpo.group_size=4"], "unknown key 'tree_grpo.group_size'"),
    # a window size with DanceGRPO used to replace its random step subset without a word
    (["method=dance_grpo", "flow_grpo=null", "dance_grpo.window_size=2"], "unknown key 'dance_grpo.window_size'"),
    (["method=dance_grpo", "flow_grpo=null", "modifiers.fast={}"], "modifiers.fast (Flow-GRPO-Fast window) does "
     "not combine with method dance_grpo (it combines with: flow_grpo)"),
    # TempFlow-GRPO's noise weight was accepted by every method
    (["flow_grpo.noise_weight=1.0"], "unknown key 'flow_grpo.noise_weight'"),
    # Flash with a tree passed the check and never ran
    (["method=tree_grpo", "flow_grpo=null", "modifiers.flash={}"], "modifiers.flash (MixGRPO-Flash) does not "
     "combine with method tree_grpo"),
    (["modifiers.flash={}"], "modifiers.flash (MixGRPO-Flash) with method flow_grpo needs modifiers.fast too"),
    (["modifiers.layer_tuning={}", "method=g2rpo", "flow_grpo=null"], "modifiers.layer_tuning (LayerTuning-RL) "
     "does not combine with method g2rpo"),
    (["modifiers.kl={}", "train.lora_rank=0"], "modifiers.kl compares with the LoRA-off base: it needs "
     "train.lora_rank > 0"),
    (["modifiers.grpo_guard={}", "method=ac_flow", "flow_grpo=null"], "modifiers.grpo_guard (GRPO-Guard) does not "
     "combine with method ac_flow"),
    (["method=ac_flow", "flow_grpo=null", "reward.aggregate=advantage"], "reward.aggregate=advantage"),
    (["dance_grpo.noise=dance"], "section 'dance_grpo' holds options of method dance_grpo, but the run's method "
     "is flow_grpo"),
    (["method=nope"], "method: unknown method 'nope' (available: ac_flow,"),
    (["modifiers.nope={}"], "modifiers: unknown modifier 'nope' (available: cps,"),
    (["reward.weights={toy/nope: 1.0}"], "reward.weights: unknown reward 'toy/nope'"),
    (["reward.weights={}"], "reward.weights: expected at least one reward"),
    (["flow_grpo.clip_range=.nan"], "flow_grpo.clip_range: expected a finite number, got nan"),
    (["train.lr=.inf"], "train.lr: expected a finite number, got inf"),
    (["reward.weights={toy/ink: .nan}"], "reward.weights.toy/ink: expected a finite number"),
    (["train.lora_rank=9223372036854775807"], "train.lora_rank: 9223372036854775807 is out of range"),
    (["train.lr=[1,"], "override 'train.lr=[1,': the value is not valid YAML"),
    (["train.cfg=false"], "train.cfg=false trains the conditional velocity: it needs train.guidance=1"),
    (["method=mix_grpo", "flow_grpo=null", "mix_grpo.window_size=12"], "mix_grpo.window_size: 12 must be in"),
])
def test_bad_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(FLOW, overrides)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_modifier_can_be_switched_off_from_the_command_line():
    cfg = load_config("configs/toy/digits_grpo_guard.yaml", ["modifiers.grpo_guard=null"])
    assert cfg.modifiers == {}
    assert load_config("configs/toy/digits_grpo_guard.yaml").modifiers.keys() == {"grpo_guard"}


def test_process_rules_are_checked_before_anything_loads():
    """Whole prompts per process where a part compares a prompt's samples: the prompts must divide evenly, and the
    error names the part and why; elsewhere the samples must."""
    tree = load_config("configs/toy/digits_tree_grpo.yaml")  # 4 prompts
    check_training(tree, 1)
    check_training(tree, 2)
    with pytest.raises(ConfigError, match=re.escape("train.prompts_per_iteration (4) must be divisible by the number "
                                                    "of processes (3): method tree_grpo keeps a prompt's samples on "
                                                    "one process (a prompt's tree shares its prefixes)")):
        check_training(tree, 3)
    with pytest.raises(ConfigError, match="reward toy/preference keeps a prompt's samples on one process"):
        check_training(load_config("configs/toy/digits_pref_grpo.yaml", ["train.prompts_per_iteration=3"]), 2)
    with pytest.raises(ConfigError, match="modifiers.layer_tuning keeps a prompt's samples on one process"):
        check_training(load_config(FLOW, ["modifiers.layer_tuning={}", "train.prompts_per_iteration=3"]), 2)
    with pytest.raises(ConfigError, match="must be divisible by the number of processes \\(3\\)"):
        check_training(load_config(FLOW), 3)
    check_training(load_config(FLOW), 2)
    check_training(load_config(FLOW, ["train.prompts_per_iteration=3"]), 2)  # 3 x 8 samples spread one by one


def test_a_real_model_needs_a_prompt_file_before_its_weights_load(tmp_path, monkeypatch):
    """A pipeline folder with no train.prompt_file used to train on toy digit prompts without a word."""
    import flowalign.training.trainer as trainer_module
    from flowalign.training import make_trainer

    def never(*args, **kwargs):
        raise AssertionError("the generator was loaded before the config was checked")

    monkeypatch.setattr(trainer_module, "load_generator", never)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    cfg = load_config(FLOW, [f"model.name={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="is not a toy model: set train.prompt_file"):
        make_trainer(cfg)


def test_the_trainers_know_no_method_by_name():
    """Outside the method files, the modifiers' declarations and the registry, no source names a method (Flow-GRPO
    is also a noise kind and the default method, so it is left out)."""
    sources = [p for folder in ("flowalign", "app", "rewards", "samplers") for p in (ROOT / folder).rglob("*.py")
               if p.parent.name not in ("methods", "modifiers")]
    for name in set(methods()) - {"flow_grpo"}:
        quoted = re.compile(rf"[\"']{name}[\"']")
        found = [str(p.relative_to(ROOT)) for p in sources if quoted.search(p.read_text())]
        assert not found, f"{name} named in {found}"


def test_dr_grpo_centres_within_groups_without_dividing():
    """By hand: groups {1, 2, 6} (mean 3) and {4, 4} (mean 4); weighted parts sum their centred values."""
    from flowalign.methods.dr_grpo import DrGRPO

    method = DrGRPO(load_config(None, ["method=dr_grpo"]).options, None)
    rewards, groups = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0]), torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(method.leaf_advantages(rewards, groups), torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0]))
    parts = {"a": rewards, "b": torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0])}
    combined = method.leaf_advantages(rewards, groups, parts, {"a": 1.0, "b": 0.5})
    assert torch.equal(combined, torch.tensor([-2.5, -1.0, 3.5, 0.0, 0.0]))


def test_every_tree_has_its_depth_even_where_the_window_ends():
    """The sliding window shrinks at the end of its range; the tree keeps tree_depth splits (2^depth leaves)."""
    import torch as _torch

    from flowalign.methods import build

    cfg = load_config("configs/toy/digits_tree_grpo.yaml", ["train.steps=8"])
    method = build(cfg.method, cfg.options, cfg.train, cfg.modifiers)
    sigmas = _torch.linspace(1, 0, 9)
    for iteration in range(40):
        window = method.sde_window(iteration)
        assert len(window) == 4 and max(window) < 7, (iteration, window)
        roots, _ = method.plan(sigmas, iteration, None)
        leaves = [n for n in _flatten(roots) if not n.children]
        assert len(leaves) == cfg.train.prompts_per_iteration * method.samples_per_prompt == 4 * 8


def _flatten(nodes):
    for node in nodes:
        yield node
        yield from _flatten(node.children)


def test_a_gpu_launch_on_a_machine_without_gpus_is_one_line():
    """accelerate launch with a GPU config and no GPU: each process comes up alone and would run the whole job into
    the same folder; the trainer stops first, saying why."""
    from flowalign.checks import check_launch

    check_launch(1, cuda=False, environ={})
    check_launch(2, cuda=False, environ={"WORLD_SIZE": "2"})  # a real 2-process run (gloo)
    with pytest.raises(ConfigError, match=re.escape("launched as 2 processes (WORLD_SIZE=2) but accelerate set up "
                                                    "one: the launch config asks for GPUs and this machine has none")):
        check_launch(1, cuda=False, environ={"WORLD_SIZE": "2"})
