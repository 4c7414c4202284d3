"""Reward registry: built-in names, third-party rewards through the ``flowalign.rewards`` entry points."""
from __future__ import annotations

import importlib
import inspect
import typing
from importlib.metadata import entry_points
from typing import Callable

from .base import CompositeReward, PairwiseReward, Reward, SetReward
from .errors import RewardError
from .groupwise import GroupwiseReward

ENTRY_POINT_GROUP = "flowalign.rewards"


def _toy_clipscore(**kw) -> Reward:
    """CLIPScore with the toy world's tiny CLIP (shipped weights): the prompt's fit, x100."""
    from .clip_score import OpenCLIPScore
    from .toy import WEIGHTS

    reward = OpenCLIPScore(model=str(kw.pop("path", WEIGHTS / "clip")), **kw)
    reward.name = "toy/clipscore"
    return reward


_toy_clipscore.returns = "flowalign.rewards.clip_score:OpenCLIPScore"
_toy_clipscore.loads = "the shipped tiny CLIP"


#: Built-in rewards: name -> "module:factory" (imported only when asked for) or a factory.
BUILTIN: dict[str, str | Callable[..., Reward]] = {
    "toy/classifier": "flowalign.rewards.toy.classifier:DigitClassifierReward",
    "toy/digit_match": "flowalign.rewards.toy.classifier:DigitMatchReward",
    "toy/judge_digit": "flowalign.rewards.toy.judge:JudgeDigitMatch",
    "toy/bold_digit": "flowalign.rewards.toy.classifier:BoldDigitReward",
    "toy/preference": "flowalign.rewards.toy.preference:ToyPreference",
    "toy/ink": "flowalign.rewards.toy.attributes:InkReward",
    "toy/bold": "flowalign.rewards.toy.attributes:InkReward",
    "toy/size": "flowalign.rewards.toy.attributes:SizeReward",
    "toy/centered": "flowalign.rewards.toy.attributes:CenteredReward",
    "toy/symmetry": "flowalign.rewards.toy.attributes:SymmetryReward",
    "toy/clipscore": _toy_clipscore,
    "clipscore": "flowalign.rewards.clip_score:OpenCLIPScore",
    # image plug-ins on real checkpoints
    "clipscore-hf": "flowalign.rewards.hf_clip:HFCLIPScore",
    "pickscore": "flowalign.rewards.pickscore:PickScore",
    "hpsv2": "flowalign.rewards.hps:HPSv2",
    "hpsv2.1": "flowalign.rewards.hps:HPSv21",
    "aesthetic": "flowalign.rewards.aesthetic:LaionAesthetic",
    "imagereward": "flowalign.rewards.imagereward:ImageReward",
    "hpsv3": "flowalign.rewards.hpsv3:HPSv3",
    "ocr": "flowalign.rewards.ocr:OCRReward",
    "edit/clip-i": "flowalign.rewards.source_similarity:SourceSimilarity",
    "dinov3": "flowalign.rewards.dinov3:DINOv3Encoder",  # an image encoder (embed_images), not a scorer
    # video
    "video/frames": "flowalign.rewards.video:FrameAggregatedReward",
    "video/temporal": "flowalign.rewards.video:TemporalConsistencyReward",
    "toy/motion": "flowalign.rewards.toy.motion:MotionReward",
    "toy/motion_match": "flowalign.rewards.toy.motion:MotionMatchReward",
    # audio
    "clap": "flowalign.rewards.clap:CLAPScore",
    "audio/loudness": "flowalign.rewards.audio_signal:LoudnessReward",
    "toy/pitch_accuracy": "flowalign.rewards.toy.music:PitchAccuracyReward",
    "toy/pitch": "flowalign.rewards.toy.music:PitchReward",
    "toy/key": "flowalign.rewards.toy.music:KeyReward",
    "toy/tempo": "flowalign.rewards.toy.music:TempoReward",
    "toy/music_encoder": "flowalign.rewards.toy.music:ToyMusicEncoder",
    "toy/music_fad": "flowalign.rewards.toy.music_exemplars:music_fad",
    "toy/music_exemplar": "flowalign.rewards.toy.music_exemplars:music_exemplar",
    "toy/music_vendi": "flowalign.rewards.toy.music_exemplars:music_vendi",
    # distributional
    "fd": "flowalign.rewards.distributional:FrechetReward",
    "vendi": "flowalign.rewards.distributional:VendiReward",
    "exemplar": "flowalign.rewards.distributional:ExemplarReward",
    # served elsewhere
    "http": "flowalign.rewards.remote:HTTPReward",
    "vlm-judge": "flowalign.rewards.remote:VLMJudge",
    "geneval": "flowalign.rewards.geneval:GenEvalReward",
    # groupwise
    "rank": "flowalign.rewards.groupwise:RankReward",
}


def _resolve(target: str | Callable[..., Reward]) -> Callable[..., Reward]:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every reward name ``load`` accepts: built-ins and installed plug-ins."""
    return sorted(set(BUILTIN) | set(_plugins()))


def registered(name: str) -> str:
    """The registered reward a name stands for: ``pickscore#2`` is another ``pickscore`` with its own options
    (a second member of an ensemble, another checkpoint)."""
    return name.split("#", 1)[0]


def known(name: str) -> bool:
    """Whether ``load`` accepts ``name`` (a registered reward, optionally tagged ``#...``)."""
    return registered(name) in available()


def reward_class(name: str) -> Callable[..., Reward]:
    """The class (or factory) ``load(name)`` calls, imported but not called: what a run can check about a
    reward (pairwise? differentiable?) before any weights load."""
    base = registered(name)
    if base in BUILTIN:
        return _resolve(BUILTIN[base])
    if base in (plugins := _plugins()):
        return plugins[base].load()
    raise RewardError(f"reward '{name}': unknown (available: {', '.join(available())})")


def describe(name: str) -> dict[str, str]:
    """What ``flowalign rewards list`` shows of a reward, read from its class without loading it: its kind,
    modality, whether gradients reach the pixels, what it loads, and the first line of its docstring."""
    target = reward_class(name)
    if isinstance(target, type):
        cls = target
    else:  # a factory: the class it returns (``returns`` names one imported only when called)
        cls = _resolve(target.returns) if hasattr(target, "returns") else typing.get_type_hints(target)["return"]
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        return {"kind": "-", "modality": "-", "differentiable": "-", "loads": "-",
                "description": "not a reward: an encoder other rewards embed with"}
    kinds = [(PairwiseReward, "pairwise"), (GroupwiseReward, "groupwise"), (SetReward, "set")]
    kind = next((kind for base, kind in kinds if issubclass(cls, base)), "pointwise")
    doc = (target.__doc__ or cls.__doc__ or "").strip().splitlines()
    differentiable = getattr(target, "differentiable", cls.differentiable)
    return {"kind": kind, "modality": getattr(target, "modality", cls.modality),
            "differentiable": "differentiable" if differentiable else "-", "loads": _loads(target, cls),
            "description": doc[0] if doc else ""}


def _loads(target, cls) -> str:
    """The checkpoint or service a reward's defaults name (toy rewards: the shipped weights, or nothing)."""
    if hasattr(target, "loads"):  # a factory that says so
        return target.loads
    params = inspect.signature(target if not isinstance(target, type) else cls.__init__).parameters
    default = lambda key: params[key].default if key in params else inspect.Parameter.empty  # noqa: E731
    if "url" in params:
        return "a server (url)"
    if isinstance(default("path"), str):
        return default("path")
    if "model" in params and "pretrained" in params:
        return f"open_clip {default('model')} ({default('pretrained')})"
    for key in ("encoder", "image_reward"):
        if isinstance(default(key), str):
            return f"{key}: {default(key)}"
    if "reward" in params:  # a reward built on another one (rank)
        return "what its reward loads"
    if cls.__module__.startswith(f"{__package__}.toy"):
        return "the shipped toy weights" if "path" in params or "member" in params else "nothing (the media)"
    return "a checkpoint (path)" if "path" in params else "nothing"


def load(name: str, **kwargs) -> Reward:
    """A reward by name (``rewards.load("toy/classifier")``); keyword arguments go to its constructor."""
    factory = reward_class(name)
    try:
        reward = factory(**kwargs)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise RewardError(f"reward '{name}': cannot load "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if getattr(reward, "name", "reward") == "reward" or registered(name) != name:
        reward.name = name
    return reward


def load_weighted(weights: dict[str, float], normalize: str = "none", objective: str = "weighted_sum",
                  penalty: float = 0.5, **kwargs) -> CompositeReward:
    """A composite of named rewards, e.g. ``{"toy/classifier": 1.0, "toy/ink": 0.2}`` (a weighted sum, or an
    ensemble ``objective``); ``kwargs[name]`` holds each reward's constructor arguments."""
    return CompositeReward({n: load(n, **kwargs.get(n, {})) for n in weights}, weights, normalize,
                           objective=objective, penalty=penalty)
