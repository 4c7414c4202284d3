"""Typed configs loaded from YAML, with ``key.sub=value`` overrides from the command line.

Every field is a dataclass field with a type hint; ``field(metadata=...)`` adds ``min`` / ``max`` bounds,
``choices`` or ``must_exist`` (a path). Bad input raises ``ConfigError`` with one line that names the
field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import FlowalignError


class ConfigError(FlowalignError):
    """A config value, key or file is wrong; the message names it."""


def bounded(default, *, min=None, max=None, must_exist: bool = False, doc: str = ""):  # noqa: A002
    """A dataclass field with validation metadata."""
    factory = isinstance(default, (list, dict))
    kw = {"default_factory": (lambda: type(default)(default))} if factory else {"default": default}
    return field(metadata={"min": min, "max": max, "must_exist": must_exist, "doc": doc}, **kw)


@dataclass
class ModelConfig:
    name: str = bounded("toy/digits", doc="toy/digits, a hub id or a local diffusers folder")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    local_files_only: bool = False
    options: dict[str, Any] = bounded({}, doc="adapter options: height, width, num_frames, embedded_guidance, "
                                      "train_expert, audio_end_in_s, ...")


@dataclass
class SampleConfig:
    steps: int = bounded(20, min=1, max=1000)
    guidance: float = bounded(3.0, min=0.0, max=100.0)
    negative_prompt: str = ""
    batch_size: int = bounded(250, min=1)
    seed: int = bounded(0, min=0)


@dataclass
class EvalConfig:
    prompts: list[str] = bounded([], doc="explicit prompts")
    prompt_file: str | None = bounded(None, must_exist=True, doc="a text file, one prompt per line")
    toy_prompts: int = bounded(0, min=0, doc="N toy digit prompts, digits balanced, templates seeded")
    samples_per_prompt: int = bounded(1, min=1)
    rewards: list[str] = bounded(["toy/digit_match", "toy/classifier"])
    grid_size: int = bounded(100, min=0, doc="how many samples the PNG grid shows")


@dataclass
class RewardConfig:
    weights: dict[str, float] = bounded({"toy/bold_digit": 1.0}, doc="reward name -> weight")
    options: dict[str, dict] = bounded({}, doc="reward name -> constructor arguments (path, local_files_only, ...)")
    normalize: Literal["none", "batch", "running"] = "none"
    #: ``reward``: z-score the weighted sum; ``advantage``: z-score each reward, then sum (MixGRPO).
    aggregate: Literal["reward", "advantage"] = "reward"
    #: A reward that fails (raises, NaN, times out): ``stop`` the run, or ``skip`` the affected samples.
    on_error: Literal["stop", "skip"] = "stop"


@dataclass
class GRPOConfig:
    algorithm: Literal["flow_grpo", "dance_grpo", "mix_grpo", "tempflow_grpo", "g2rpo", "tree_grpo", "ac_flow",
                       "dragon"] = "flow_grpo"
    iterations: int = bounded(40, min=1)
    prompts_per_iteration: int = bounded(8, min=1, doc="groups per iteration (all processes together)")
    group_size: int = bounded(8, min=2)
    prompt_file: str | None = bounded(None, must_exist=True)
    steps: int = bounded(10, min=2, max=1000, doc="sampling steps of the rollouts")
    guidance: float = bounded(3.0, min=0.0, max=100.0)
    cfg: bool = True
    noise: Literal["flow_grpo", "dance", "cps", "ddim"] = "flow_grpo"
    cps_logp: Literal["gaussian", "flow_grpo"] = bounded(
        "flow_grpo", doc="CPS log-prob: Flow-GRPO's -mean((x'-mu)^2) (every step weighted alike) or the exact "
        "Gaussian (its 1/std^2 lets the last, least noisy steps dominate)")
    noise_level: float = bounded(0.7, min=0.0, max=10.0)
    window_size: int = bounded(0, min=0, doc="0: all steps SDE; >0: a random SDE window (Flow-GRPO-Fast)")
    window_high: int | None = bounded(None, min=1, doc="the window starts below this step (default steps // 2)")
    window_kind: Literal["random", "progressive", "decay", "exp_decay", "fixed"] = "progressive"
    window_dwell: int = bounded(25, min=1, doc="MixGRPO: iterations before the window moves")
    window_stride: int = bounded(1, min=1, doc="MixGRPO: how far it moves (1: overlapping)")
    window_roll_back: bool = True
    window_max_steps: int | None = bounded(None, min=1, doc="MixGRPO: the window stays below this step (steps - 2)")
    flash: bool = bounded(False, doc="MixGRPO-Flash: finish after the SDE window with DPM-Solver++ on fewer steps")
    flash_fraction: float = bounded(0.4, min=0.0, max=1.0, doc="MixGRPO-Flash: tail steps = max(int(rest*f), 1)")
    flash_order: int = bounded(2, min=1, max=2, doc="MixGRPO-Flash: DPM-Solver++ order")
    timestep_fraction: float = bounded(0.99, min=0.0, max=1.0)
    random_timesteps: bool = False
    share_noise: bool = False
    rollout_batch: int = bounded(64, min=1, doc="samples per model pass while sampling (per process)")
    train_batch: int = bounded(64, min=1, doc="transitions per training forward (per process)")
    updates_per_iteration: int = bounded(2, min=1)
    inner_epochs: int = bounded(1, min=1)
    old_logp: Literal["rollout", "recompute"] = "rollout"
    shuffle: bool = True
    lr: float = bounded(3e-4, min=0.0)
    weight_decay: float = bounded(1e-4, min=0.0)
    max_grad_norm: float = bounded(1.0, min=0.0)
    clip_range: float = bounded(1e-4, min=0.0)
    adv_clip: float = bounded(5.0, min=0.0)
    std: Literal["global", "group"] = "global"
    std_eps: float = bounded(1e-4, min=0.0)
    unbiased_std: bool = False
    branch_steps: list[int] = bounded([], doc="TempFlow-GRPO: steps that branch (empty: all but the last)")
    noise_weight: float = bounded(2.25, min=0.0, doc="TempFlow-GRPO: loss weight c*std per step (0: off)")
    sde_steps: list[int] = bounded([], doc="G2RPO: steps taking the single SDE step (empty: the first half)")
    strides: list[int] = bounded([1, 2, 3], doc="G2RPO: ODE strides each branch is finished at")
    tree_depth: int = bounded(3, min=1, max=8, doc="Dynamic-TreeRPO: binary splits at the window's first steps")
    depth_noise_beta: float = bounded(0.5, min=0.0, doc="Dynamic-TreeRPO: noise x (1 + beta*depth/d), paper-approximate")
    clip_dynamic: bool = bounded(False, doc="Dynamic-TreeRPO: reward-conditioned clip bounds (paper-approximate)")
    clip_low: float = bounded(1e-4, min=0.0)
    clip_high: float = bounded(1e-3, min=0.0)
    clip_eta: float = bounded(1.0, min=0.0)
    layer_tuning: float = bounded(0.0, min=0.0, doc="Dynamic-TreeRPO LayerTuning-RL: weight of the regression "
                                  "toward the best path's velocity (0: off; paper-approximate)")
    layer_tuning_weight: Literal["advantage", "uniform"] = bounded(
        "advantage", doc="LayerTuning-RL per-group weight: the best leaf's positive advantage, or 1")
    ratio_norm: bool = bounded(False, doc="GRPO-Guard: normalised, centred ratios and the loss divided by mean(sqrt dt)^2")
    # AC-Flow / ORW-CFM-W2 and DRAGON (on-policy flow matching; noise_critics_distributional.md §3-§4)
    fm_draws: int = bounded(4, min=1, doc="noise levels drawn per sample for the flow-matching loss")
    fm_sigma: Literal["uniform", "logit_normal"] = "uniform"
    critic: bool = bounded(True, doc="AC-Flow's critic; false: ORW-CFM-W2 (w = exp(weight_beta * raw reward))")
    critic_width: int = bounded(32, min=4)
    critic_lr: float = bounded(1e-3, min=0.0)
    critic_updates: int = bounded(2, min=1, doc="passes over the iteration's points per critic update")
    critic_warmup: int = bounded(3, min=0, doc="iterations that train the critic only")
    shape_per_group: bool = bounded(False, doc="reward shaping per prompt group instead of per batch")
    reward_bound: Literal["none", "tanh", "clip"] = bounded("none", doc="shaped-reward bound (paper-approximate)")
    reward_bound_value: float = bounded(3.0, min=0.0)
    weight_beta: float = bounded(0.5, min=0.0, doc="AC-Flow / ORW: weights exp(weight_beta * A)")
    weight_norm: bool = bounded(True, doc="divide the weights by their batch mean")
    w2_weight: float = bounded(1.0, min=0.0, doc="alpha of the W2 bound ||v - v_ref||^2 to the LoRA-off base")
    dragon_sets: Literal["paired", "unpaired", "greedy"] = "paired"
    dragon_loss: Literal["dpo", "kto"] = "dpo"
    dragon_beta: float = bounded(500.0, min=0.0, doc="DRAGON: the preference loss's beta")
    beta: float = bounded(0.0, min=0.0, doc="KL weight to the LoRA-off base")
    kl_denominator: Literal["flow_grpo", "gaussian"] = "flow_grpo"
    lora_rank: int = bounded(32, min=0, doc="0: full fine-tuning")
    lora_alpha: float = bounded(64.0, min=0.0)
    ema_decay: float = bounded(0.0, min=0.0, max=1.0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = bounded(None, doc="None: accelerate's config decides")
    gradient_checkpointing: bool = False
    cache_prompts: bool = bounded(False, doc="encode each distinct prompt once, keep its embeddings on the CPU")
    prompt_embeds: str | None = bounded(None, must_exist=True, doc="precomputed prompt embeddings "
                                        "(flowalign embed-prompts)")
    text_encoders: Literal["device", "offload", "drop"] = bounded(
        "device", doc="frozen text encoders: on the device, CPU-offloaded between uses, or freed (needs prompt_embeds)")
    checkpoint_every: int = bounded(10, min=0)
    checkpoints_total_limit: int = bounded(3, min=1)
    eval_prompts: int = bounded(50, min=0, doc="held-out toy prompts for the before/after report")
    eval_steps: int = bounded(20, min=1)
    seed: int = bounded(0, min=0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: GRPOConfig = field(default_factory=GRPOConfig)
    output_dir: str = "outputs/run"


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig):
    """Read a YAML file (or start from defaults), apply ``a.b=value`` overrides, and validate."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. sample.steps=30")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data, where)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[last] = value


def from_dict(cls: type, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, checking keys, types and bounds."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a section (mapping), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown[0]}' (allowed in "
                          f"{prefix.rstrip('.') or 'top level'}: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = from_dict(typ, value, where, key + ".")
        else:
            values[name] = _check(_convert(value, typ, where, key), fields[name].metadata, where, key)
    return cls(**values)


def _describe(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))


def _convert(value, typ, where: str, key: str):
    """``value`` as ``typ``, or a ConfigError naming ``key`` and the expected type."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    fail = ConfigError(f"{where}: {key}: expected {_describe(typ)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, key)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value in args:
            return value
        raise fail
    if origin is list:
        if isinstance(value, str) and args[0] is str:  # a comma-separated override: a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail
        return [_convert(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        return {_convert(k, args[0], where, key): _convert(v, args[1], where, f"{key}.{k}") for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        raise fail
    if typ is str:
        if isinstance(value, str):
            return value
        raise fail
    return value


def _check(value, meta, where: str, key: str):
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            raise ConfigError(f"{where}: {key}: {value} is out of range (allowed: {allowed})")
    if meta.get("must_exist") and value is not None and not Path(value).exists():
        raise ConfigError(f"{where}: {key}: file '{value}' not found")
    return value
