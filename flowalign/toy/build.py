"""``flowalign toy build``: retrain every toy model from scratch with fixed seeds and write the weights."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..generators.toy_digits import SHIPPED as DIGITS_WEIGHTS
from ..generators.toy_music import SHIPPED as MUSIC_WEIGHTS
from ..generators.toy_video import SHIPPED as VIDEO_WEIGHTS
from ..rewards.toy import WEIGHTS as REWARD_WEIGHTS


def _replace(built: Path, target: Path) -> None:
    """Swap a freshly written folder into place, so a crash never leaves half a model behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    shutil.move(str(built), str(target))
    shutil.rmtree(old, ignore_errors=True)


def build_all(quick: bool = False, out: Path | None = None, seed: int = 0, print_fn=print) -> dict[str, Path]:
    """Train the digits flow model, the classifier and the tiny CLIP; ``quick`` trains a few steps only (tests).

    ``out`` writes everything under one folder instead of the shipped locations.
    """
    from ..rewards.toy.classifier import MEMBERS
    from .clip import train_clip
    from .digits_flow import FlowTrainConfig, train_digits_flow
    from .train_classifier import train_classifier
    from .train_preference import train_preference

    targets = {"digits": DIGITS_WEIGHTS, "classifier": REWARD_WEIGHTS / "classifier",
               "classifier_members": REWARD_WEIGHTS / "classifier_members", "clip": REWARD_WEIGHTS / "clip",
               "preference": REWARD_WEIGHTS / "preference", "video": VIDEO_WEIGHTS, "music": MUSIC_WEIGHTS}
    if out is not None:
        targets = {name: Path(out) / name for name in targets}
    steps = {"flow": 5000, "classifier": 1500, "clip": 1500, "preference": 800, "video": 15000, "music": 3000}
    if quick:
        steps = {"flow": 10, "classifier": 40, "clip": 40, "preference": 20, "video": 10, "music": 10}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        acc = train_classifier(tmp / "classifier", steps=steps["classifier"], seed=seed)
        print_fn(f"classifier: held-out accuracy {acc:.3f}")
        _replace(tmp / "classifier", targets["classifier"])
        for member in range(1, MEMBERS + 1):  # the same classifier, other seeds: an ensemble's members
            acc = train_classifier(tmp / "members" / f"seed{member}", steps=steps["classifier"], seed=seed + member)
            print_fn(f"classifier member {member}: held-out accuracy {acc:.3f}")
        _replace(tmp / "members", targets["classifier_members"])
        zero_shot = train_clip(tmp / "clip", steps=steps["clip"], seed=seed)
        print_fn(f"tiny CLIP: held-out zero-shot accuracy {zero_shot:.3f}")
        _replace(tmp / "clip", targets["clip"])
        agreement = train_preference(tmp / "preference", steps=steps["preference"], seed=seed)
        print_fn(f"preference model: held-out pairwise agreement {agreement:.3f}")
        _replace(tmp / "preference", targets["preference"])
        train_digits_flow(tmp / "digits", FlowTrainConfig(steps=steps["flow"], lr=5e-4, seed=seed))
        print_fn("digits flow model: trained")
        _replace(tmp / "digits", targets["digits"])
        _build_video(tmp / "video", steps["video"], seed, measure=not quick, print_fn=print_fn)
        _replace(tmp / "video", targets["video"])
        _build_music(tmp / "music", steps["music"], seed, measure=not quick, print_fn=print_fn)
        _replace(tmp / "music", targets["music"])
    return targets


def _build_video(out: Path, steps: int, seed: int, measure: bool, print_fn) -> None:
    """Train the moving-digits video model; a full build prints its figures (the classifier must exist)."""
    from ..generators.toy_video import ToyVideoGenerator
    from .video_flow import VideoFlowTrainConfig, measure_video_model, train_video_flow

    train_video_flow(out, VideoFlowTrainConfig(steps=steps, seed=seed), print_fn=print_fn)
    figures = measure_video_model(ToyVideoGenerator.from_pretrained(out, device="cpu")) if measure else {}
    print_fn("video flow model: trained" + "".join(f", {k} {v:.3f}" for k, v in figures.items()))


def _build_music(out: Path, steps: int, seed: int, measure: bool, print_fn) -> None:
    """Train the melody model; a full build prints its figures (toy music rewards on 200 prompts, CFG 3)."""
    from ..generators.toy_music import ToyMusicGenerator
    from .music_flow import MusicFlowTrainConfig, measure_music_model, train_music_flow

    train_music_flow(out, MusicFlowTrainConfig(steps=steps, seed=seed), print_fn=print_fn)
    if measure:
        figures = measure_music_model(ToyMusicGenerator.from_pretrained(out, device="cpu"), n=200)
        print_fn("music flow model: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
