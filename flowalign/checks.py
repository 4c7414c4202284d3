"""Cross-field rules of a run, checked before any weights load: the method's and modifiers' own rules,
the combinations they declare, what a real model needs, and what runs on more than one process."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .config import RunConfig
from .methods import combines, get_method, modifiers
from .typed import ConfigError

#: Samples one iteration makes at most, all processes together (each keeps its trajectories in memory).
MAX_SAMPLES_PER_ITERATION = 1_000_000


def check_run(cfg: RunConfig, where: str = "config") -> None:
    """Every rule that does not depend on the machine; a one-line ConfigError naming the fields."""
    t = cfg.train
    method = get_method(cfg.method)
    known = modifiers()
    try:
        method.check(cfg.options, t, cfg.modifiers)
        for name, options in cfg.modifiers.items():
            modifier = known[name]
            if not combines(modifier, method):
                raise ConfigError(f"modifiers.{name} ({modifier.title}) does not combine with method {cfg.method}")
            needed = modifier.requires.get(cfg.method)
            if needed and needed not in cfg.modifiers:
                raise ConfigError(f"modifiers.{name} ({modifier.title}) with method {cfg.method} needs "
                                  f"modifiers.{needed} too")
            modifier.check(options, cfg.method, cfg.options, t, cfg.modifiers)
        if not t.cfg and t.guidance != 1.0 and not method.guided_rollouts:
            raise ConfigError("train.cfg=false trains the conditional velocity: it needs train.guidance=1")
        if cfg.reward.aggregate == "advantage" and method.family != "policy_gradient":
            raise ConfigError(f"reward.aggregate=advantage normalises each reward within its groups' advantages: "
                              f"method {cfg.method} has none (use reward.aggregate=reward)")
        if cfg.reward.aggregate == "marble" and not method.balances_rewards:
            raise ConfigError(f"reward.aggregate=marble balances rewards through a loss linear in each sample's "
                              f"advantage: method {cfg.method}'s is not (the GRPO family, diffusion_nft and awm's are)")
        check_marble(cfg.reward)
        if cfg.reward.on_error == "skip" and not method.skips_failed_samples:
            raise ConfigError(f"reward.on_error=skip: method {cfg.method} cannot train around skipped samples yet "
                              "(use reward.on_error=stop)")
        if not cfg.reward.weights:
            raise ConfigError("reward.weights: expected at least one reward")
        check_ensemble(cfg.reward)
        check_reward_options(cfg.reward.options)
        if not cfg.output_dir.strip():
            raise ConfigError("output_dir: expected a folder name, got ''")
        from .rewards.registry import known

        unknown = [n for n in cfg.reward.weights if not known(n)]
        if unknown:
            raise ConfigError(f"reward.weights: unknown reward '{unknown[0]}' (flowalign rewards list shows them)")
        unknown = [n for n in cfg.monitor.guards if not known(n)]
        if unknown:
            raise ConfigError(f"monitor.guards: unknown reward '{unknown[0]}' (flowalign rewards list shows them)")
        if cfg.monitor.diversity_drop is not None and cfg.monitor.samples_per_prompt < 2:
            raise ConfigError("monitor.diversity_drop measures diversity among a prompt's samples: set "
                              "monitor.samples_per_prompt to 2 or more")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def check_reward_options(options: Mapping) -> None:
    """Each reward's constructor arguments are a mapping (``{path: ..., local_files_only: true}``)."""
    for name, value in options.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"reward.options.{name}: expected a mapping of constructor arguments, got {value!r:.60}")


def check_ensemble(reward) -> None:
    """An ensemble objective compares normalised members with positive weights (equal ones for worst_case)."""
    if reward.objective == "weighted_sum":
        return
    what = f"reward.objective={reward.objective}"
    if reward.aggregate != "reward":
        raise ConfigError(f"{what} forms one score per sample from its members: use reward.aggregate=reward")
    if reward.normalize == "none":
        raise ConfigError(f"{what} compares its members after per-member normalisation: set reward.normalize to "
                          "batch or running")
    if len(reward.weights) < 2:
        raise ConfigError(f"{what}: reward.weights names the ensemble's members, expected 2 or more")
    if any(w <= 0 for w in reward.weights.values()):
        raise ConfigError(f"{what}: reward.weights are the members' shares, expected each above 0")
    if reward.objective == "worst_case" and len(set(reward.weights.values())) > 1:
        raise ConfigError(f"{what} takes the smallest member score: give every member the same weight")


def check_marble(reward) -> None:
    """MARBLE balances two or more rewards' own advantages, each needing every sample's score."""
    if reward.aggregate != "marble":
        return
    if len(reward.weights) < 2:
        raise ConfigError("reward.aggregate=marble balances several rewards: reward.weights names one")
    if any(w <= 0 for w in reward.weights.values()):
        raise ConfigError("reward.aggregate=marble: reward.weights are the starting balance, expected each above 0")
    if reward.on_error != "stop":
        raise ConfigError("reward.aggregate=marble needs every reward's score of every sample: use "
                          "reward.on_error=stop")
    if reward.objective != "weighted_sum":
        raise ConfigError("reward.aggregate=marble balances the rewards itself: leave reward.objective at "
                          "weighted_sum")


def check_training(cfg: RunConfig, num_processes: int) -> None:
    """Rules for a training run on ``num_processes`` processes: a prompt source for real models, and an
    iteration's samples dividing evenly over the processes (whole prompts where a part keeps them together)."""
    from .generators import toy_world

    t = cfg.train
    if toy_world(cfg.model.name) is None and not t.prompt_file:
        raise ConfigError(f"model '{cfg.model.name}' is not a toy model: set train.prompt_file (one prompt per line)")
    together = whole_prompt_reasons(cfg)
    if together and t.prompts_per_iteration % num_processes:
        what, why = together[0]
        raise ConfigError(f"train.prompts_per_iteration ({t.prompts_per_iteration}) must be divisible by the number "
                          f"of processes ({num_processes}): {what} keeps a prompt's samples on one process ({why})")
    method = get_method(cfg.method)(cfg.options, t)
    total = t.prompts_per_iteration * method.samples_per_prompt
    if total > MAX_SAMPLES_PER_ITERATION:
        raise ConfigError(f"train.prompts_per_iteration ({t.prompts_per_iteration}) x samples per prompt "
                          f"({method.samples_per_prompt}) = {total} samples per iteration, over the cap of "
                          f"{MAX_SAMPLES_PER_ITERATION}")
    if cfg.reward.overlap_prompts and not getattr(method, "scores_pointwise", True):
        raise ConfigError(f"reward.overlap_prompts: method {cfg.method} scores whole sets of samples after sampling "
                          "(set reward.overlap_prompts=0)")
    if not together and total % num_processes:
        raise ConfigError(f"train.prompts_per_iteration x samples per prompt = {total} must be divisible by the "
                          f"number of processes ({num_processes})")


def check_launch(num_processes: int, cuda: bool, environ: Mapping[str, str] = os.environ) -> None:
    """A launcher started several processes but accelerate set up each as a lone one (a GPU launch config on a
    machine without GPUs): every process would run the whole job into the same folder. One line instead."""
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes == 1:
        why = ("the launch config asks for GPUs and this machine has none (to run the processes on the CPU over "
               "gloo, set ACCELERATE_USE_CPU=1)") if not cuda else "check the launch config's distributed_type"
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE={launched}) but accelerate set up one: "
                          f"{why}")


def check_engine(engine: str, t, zero_stage: int | None = None) -> None:
    """What the distributed engine (accelerate's ``DistributedType`` name; DeepSpeed's ZeRO stage) cannot do with
    this run's options."""
    if engine == "DEEPSPEED" and zero_stage not in (1, 2) and t.checkpoint_every:
        raise ConfigError(f"train.checkpoint_every: checkpoints under DeepSpeed need ZeRO stage 1 or 2, got stage "
                          f"{zero_stage} (ZeRO-3 partitions the weights too); use ZeRO-2 or FSDP, or set "
                          "train.checkpoint_every=0")


def check_sources(model: str, local_files_only: bool, prompt_sets: Mapping) -> None:
    """An image-editing model needs a source image on every prompt row (``field -> PromptSet``); read from the
    model's ``model_index.json`` only, before any weights load."""
    from .generators import edits_images

    prompt_sets = {field: rows for field, rows in prompt_sets.items() if rows is not None}
    if not prompt_sets or not edits_images(model, local_files_only):
        return
    for field, rows in prompt_sets.items():
        missing = next((i for i, meta in enumerate(rows.metadata) if not meta.get("image")), None)
        if missing is not None:
            raise ConfigError(f"{field}: prompt {missing + 1} ({rows.prompts[missing][:60]!r}) has no \"image\": "
                              f"'{model}' edits images, so each .jsonl line needs a source image")


def check_output_dir(path: str | Path, field: str = "output_dir") -> None:
    """The folder exists or can be made, and a file can be written in it; one line otherwise (before anything
    loads, so a run never trains only to fail at its first checkpoint)."""
    if not str(path).strip():
        raise ConfigError(f"{field}: expected a folder name, got '{path}'")
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-") as probe:
            probe.write(b"flowalign")
            probe.flush()
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to '{path}' ({err.strerror or err})") from None


def whole_prompt_reasons(cfg: RunConfig) -> list[tuple[str, str]]:
    """``(part, why)`` for every part of the run that needs a prompt's samples on one process (empty: they may
    be spread one by one)."""
    reasons = [(f"method {cfg.method}", get_method(cfg.method).whole_prompts)]
    reasons += [(f"modifiers.{n}", modifiers()[n].whole_prompts) for n in cfg.modifiers]
    reasons += [(f"reward {n}", "it judges a prompt's samples against each other") for n in cfg.reward.weights
                if _judges_groups(n)]
    return [(what, why) for what, why in reasons if why]


def _judges_groups(name: str) -> bool:
    """Whether a reward scores a group's samples against each other (pairwise, groupwise: ``whole_groups``)."""
    from .rewards import Reward
    from .rewards.registry import reward_class

    cls = reward_class(name)
    return isinstance(cls, type) and issubclass(cls, Reward) and cls.whole_groups
