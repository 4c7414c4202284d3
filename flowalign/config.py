"""The run config: sectioned YAML (model, sample, eval, reward, train, the method and its modifiers) with
``key.sub=value`` overrides from the command line, every value checked before anything loads.

A run names one training method (``method: flow_grpo``) and carries that method's options under a key of
the same name; modifiers that combine with several methods go under ``modifiers:``::

    method: flow_grpo
    flow_grpo: {group_size: 8, clip_range: 1.0e-3}
    modifiers: {grpo_guard: {}, kl: {beta: 0.04}}

Bad input raises ``ConfigError`` with one line that names the field and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import FlowalignError
from .typed import ConfigError, bounded, from_dict

__all__ = ["ConfigError", "EvalConfig", "ModelConfig", "RewardConfig", "RunConfig", "SampleConfig", "TrainConfig",
           "bounded", "from_dict", "load_config"]


@dataclass
class ModelConfig:
    name: str = bounded("toy/digits", doc="toy/digits, a hub id or a local diffusers folder")
    dtype: Literal["float32", "bfloat16", "float16"] = bounded("float32", doc="the weights' dtype (bfloat16 on GPUs; "
                                                                              "log-probs stay fp32)")
    local_files_only: bool = bounded(False, doc="never touch the network: the model must be a local folder or in the "
                                                "hub cache")
    options: dict[str, Any] = bounded({}, doc="adapter options: height, width, num_frames, embedded_guidance, "
                                      "train_expert, audio_end_in_s, ...")


@dataclass
class SampleConfig:
    steps: int = bounded(20, min=1, max=1000, doc="sampling steps of flowalign evaluate")
    guidance: float = bounded(3.0, min=0.0, max=100.0, doc="CFG scale of flowalign evaluate")
    negative_prompt: str = bounded("", doc="the negative prompt of CFG (\"\": the empty prompt)")
    batch_size: int = bounded(250, min=1, doc="samples per model pass")
    seed: int = bounded(0, min=0, doc="the first sample's seed")


@dataclass
class EvalConfig:
    prompts: list[str] = bounded([], doc="explicit prompts")
    prompt_file: str | None = bounded(None, must_exist=True, doc="one prompt per line, or .jsonl with metadata for "
                                      "the rewards")
    toy_prompts: int = bounded(0, min=0, max=100_000, doc="N toy digit prompts, digits balanced, templates seeded")
    samples_per_prompt: int = bounded(1, min=1, max=10_000, doc="seeds per prompt")
    rewards: list[str] = bounded(["toy/digit_match", "toy/classifier"], doc="the rewards flowalign evaluate reports")
    grid_size: int = bounded(100, min=0, doc="how many samples the PNG grid shows")


@dataclass
class RewardConfig:
    weights: dict[str, float] = bounded({"toy/bold_digit": 1.0}, doc="reward name -> weight")
    options: dict[str, dict] = bounded({}, doc="reward name -> constructor arguments (path, local_files_only, ...)")
    normalize: Literal["none", "batch", "running"] = bounded("none", doc="batch or running z-scores of each reward "
                                                                         "before they are combined (running "
                                                                         "statistics are checkpointed)")
    objective: Literal["weighted_sum", "mean", "uncertainty_weighted", "worst_case"] = bounded(
        "weighted_sum", doc="the weighted sum of the rewards, or a conservative objective over them as an ensemble's "
        "members (normalised each): their mean, mean - penalty x variance, or the smallest")
    penalty: float = bounded(0.5, min=0.0, doc="uncertainty_weighted: the weight of the members' variance (lambda)")
    #: ``reward``: z-score the weighted sum; ``advantage``: z-score each reward, then sum (MixGRPO); ``marble``:
    #: each reward's advantages balanced by their gradients (MARBLE).
    aggregate: Literal["reward", "advantage", "marble"] = bounded("reward", doc="reward: the method normalises the "
                                                                                "combined reward; advantage: each "
                                                                                "reward within its groups, then "
                                                                                "weighted and summed (MixGRPO); "
                                                                                "marble: each reward's advantages "
                                                                                "balanced by their gradients (MARBLE)")
    marble_momentum: float = bounded(0.9, min=0.0, max=1.0, doc="marble: the smoothing ρ of the rewards' weights "
                                     "(ᾱ ← ρ·ᾱ + (1-ρ)·α*)")
    marble_every: int = bounded(1, min=1, doc="marble: iterations between refreshes of the weights (each costs one "
                                            "pass over the iteration's transitions per reward)")
    #: A reward that fails (raises, NaN, times out): ``stop`` the run, or ``skip`` the affected samples.
    on_error: Literal["stop", "skip"] = bounded("stop", doc="a reward that raises, returns a wrong number of scores "
                                                            "or a NaN, or times out: stop the run, or skip the "
                                                            "samples it fails on")
    timeout_s: float = bounded(600.0, min=0.0, doc="seconds a reward call may take before it counts as failed (0: "
                                                  "no limit)")
    overlap_prompts: int = bounded(0, min=0, doc="score while sampling: prompts per part sent to the reward as "
                                               "they finish (0: sample everything, then score)")
    concurrency: int = bounded(2, min=1, doc="parts scored at once while sampling goes on")


@dataclass
class TrainConfig:
    """What every training method shares: the loop, the prompts, sampling, the optimizer, LoRA, memory, checkpoints."""

    iterations: int = bounded(40, min=1, doc="sample-score-update rounds")
    prompts_per_iteration: int = bounded(8, min=1, max=100_000, doc="prompts (groups) per iteration, all processes "
                                                                  "together")
    prompt_file: str | None = bounded(None, must_exist=True, doc="one prompt per line, or .jsonl: one JSON object per "
                                      "line with \"prompt\" and metadata for the rewards (required for real models)")
    eval_prompt_file: str | None = bounded(None, must_exist=True, doc="the held-out prompts of the report and the "
                                           "monitor, .txt or .jsonl (default: the first of train.prompt_file)")
    steps: int = bounded(10, min=2, max=1000, doc="sampling steps of the rollouts")
    guidance: float = bounded(3.0, min=0.0, max=100.0, doc="CFG scale while sampling")
    cfg: bool = bounded(True, doc="train the guided velocity (false: the conditional one; needs guidance 1)")
    rollout_batch: int = bounded(64, min=1, doc="samples per model pass while sampling (per process)")
    train_batch: int = bounded(64, min=1, doc="training points per forward (per process)")
    updates_per_iteration: int = bounded(2, min=1, doc="optimizer steps per iteration")
    lr: float = bounded(3e-4, min=0.0, doc="AdamW learning rate")
    weight_decay: float = bounded(1e-4, min=0.0, doc="AdamW weight decay")
    max_grad_norm: float = bounded(1.0, min=0.0, doc="0: no clipping")
    lora_rank: int = bounded(32, min=0, max=4096, doc="0: full fine-tuning")
    lora_alpha: float = bounded(64.0, min=0.0, doc="LoRA scale alpha (the update is scaled by alpha / rank)")
    ema_decay: float = bounded(0.0, min=0.0, max=1.0, doc="0: no EMA; else the EMA weights are saved as final")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = bounded(None, doc="None: accelerate's config decides")
    gradient_checkpointing: bool = bounded(False, doc="recompute activations in the backward pass (less memory, more "
                                                      "time)")
    cache_prompts: bool = bounded(False, doc="encode each distinct prompt once, keep its embeddings on the CPU")
    prompt_embeds: str | None = bounded(None, must_exist=True, doc="precomputed prompt embeddings "
                                        "(flowalign embed-prompts)")
    text_encoders: Literal["device", "offload", "drop"] = bounded(
        "device", doc="frozen text encoders: on the device, CPU-offloaded between uses, or freed (needs prompt_embeds)")
    checkpoint_every: int = bounded(10, min=0, doc="iterations between checkpoints (0: none)")
    checkpoints_total_limit: int = bounded(3, min=1, doc="checkpoints kept (the oldest are removed)")
    eval_prompts: int = bounded(50, min=0, max=100_000, doc="held-out prompts for the before/after report (0: no "
                                                              "report)")
    eval_steps: int = bounded(20, min=1, max=1000, doc="sampling steps of the held-out evaluation before and after "
                                                       "training")
    seed: int = bounded(0, min=0, max=2 ** 62, doc="every random draw of the run derives from it (LoRA init, noise, "
                                                   "prompt order)")
    report_to: Literal["tensorboard", "wandb", "trackio", "all", "none"] = bounded(
        "tensorboard", doc="experiment trackers: the metrics, the config and sample grids (all: each of the three "
        "that is installed)")
    tracker_project: str = bounded("flowalign", doc="the trackers' project name (a run is named after output_dir)")
    hub_model_id: str | None = bounded(None, doc="push the final LoRA with its model card to this Hub repo "
                                       "(owner/name) at the end; None: the card is written in final/ only")


@dataclass
class MonitorConfig:
    """The reward-hacking monitor: guards the run does not optimise, measured on fixed held-out prompts and seeds."""

    every: int = bounded(0, min=0, doc="iterations between guard evaluations (0: off)")
    prompts: int = bounded(16, min=1, max=10_000, doc="held-out prompts the guards are measured on")
    samples_per_prompt: int = bounded(1, min=1, max=64, doc="seeds per prompt (2 or more: diversity per prompt)")
    guards: dict[str, float] = bounded({}, doc="rewards the run does not optimise -> the relative drop that "
                                       "raises the alarm, e.g. {toy/judge_digit: 0.1}")
    diversity_drop: float | None = bounded(None, min=0.0, doc="guard the per-prompt diversity (pixel Vendi score "
                                           "over samples_per_prompt seeds): the relative drop that raises the alarm")
    distance_to_base: bool = bounded(True, doc="log the mean |sample - base model's sample| on the same seeds")
    on_alarm: Literal["warn", "checkpoint", "stop"] = bounded(
        "warn", doc="when a guard drops past its limit while the reward rises: warn, also checkpoint, or "
        "checkpoint and stop training (the report is still written)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    output_dir: str = bounded("outputs/run", doc="checkpoints, the final LoRA, the report and the logs go here")
    method: str = bounded("flow_grpo", doc="the training method (flowalign methods lists them)")
    #: the method's options (its dataclass, read from the section named after the method)
    options: Any = field(default=None, init=False)
    #: modifier name -> its options (read from ``modifiers:``)
    modifiers: dict[str, Any] = field(default_factory=dict, init=False)


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a one-line ConfigError (missing, unreadable, not YAML, not a mapping)."""
    from .files import MAX_CONFIG_BYTES, read_text

    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a folder, expected a YAML file")
        if not path.exists():
            raise ConfigError(f"config file '{path}' not found")
    except (OSError, ValueError):  # not even a name the system can look up
        raise ConfigError(f"config file '{str(path)[:200]}' not found") from None
    try:
        text = read_text(path, "config file", MAX_CONFIG_BYTES)
    except FlowalignError as err:
        raise ConfigError(str(err)) from None
    try:
        data = yaml.safe_load(text) or {}
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` overrides (values read as YAML) applied onto ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value, e.g. sample.steps=30")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML (quote it if it is text)") from None
        _set_dotted(data, key.strip(), value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig):
    """Read a YAML file (or start from defaults), apply ``a.b=value`` overrides, and validate everything,
    the method's options and the cross-field rules included, before anything loads."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    apply_overrides(data, list(overrides))
    if cls is not RunConfig:
        return from_dict(cls, data, where)
    from .methods import parse_method_sections

    method, options, modifiers = parse_method_sections(data, where)
    cfg = from_dict(RunConfig, data, where)
    cfg.method, cfg.options, cfg.modifiers = method, options, modifiers
    from .checks import check_run

    check_run(cfg, where)
    return cfg


def config_dict(cfg: RunConfig) -> dict:
    """A run's whole config as the mapping a config file holds (the method's options under the method's name):
    ``load_config`` of its YAML gives the same config back."""
    import dataclasses
    import json

    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    data.pop("options"), data.pop("modifiers")
    data[cfg.method] = json.loads(json.dumps(dataclasses.asdict(cfg.options), default=str))
    if cfg.modifiers:
        data["modifiers"] = {name: json.loads(json.dumps(dataclasses.asdict(options), default=str))
                             for name, options in cfg.modifiers.items()}
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[last] = value
