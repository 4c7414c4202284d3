"""The shipped toy models' own figures (the headroom alignment has to work with).  Run:
``python -m benchmarks.toy_models``; writes ``benchmarks/results/toy_models.json``.

- digits generator: 500 balanced prompts, 20 steps, read by the toy classifier and by the second judge, with
  and without CFG, in training and held-out phrasings;
- digit classifier and second judge: accuracy on the 360 held-out real digits; tiny CLIP: the share of those
  digits whose own caption scores highest of the ten;
- video generator (200 prompts): frames read as the prompted digit, clips moving the prompted way, ``toy/motion``;
- music generator (200 prompts): pitch accuracy, key, exact tempo; and random latents decoded as a baseline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def digits_generator() -> dict:
    import flowalign
    from flowalign import rewards
    from flowalign.toy.prompts import HELD_OUT_TEMPLATES, TEMPLATES, sample_prompts

    gen = flowalign.load_generator("toy/digits", device="cpu")
    match, judge = rewards.load("toy/digit_match"), rewards.load("toy/judge_digit")
    out = {}
    for label, templates in (("training phrasings", TEMPLATES), ("held-out phrasings", HELD_OUT_TEMPLATES)):
        prompts, digits = sample_prompts(500, seed=0, templates=templates)
        meta = [{"digit": d} for d in digits]
        for guidance in (3.0, 1.0):
            media = flowalign.generate(gen, prompts, steps=20, guidance=guidance, seed=0)
            out[f"{label}, CFG {guidance:g}"] = {"classifier": match.score(media, prompts, meta).mean().item(),
                                                 "judge": judge.score(media, prompts, meta).mean().item()}
    return out


@torch.no_grad()
def judges() -> dict:
    from flowalign import rewards
    from flowalign.rewards.toy.digits import DIGIT_WORDS
    from flowalign.toy.data import load_digits

    images, labels = load_digits("test")
    media = ((images + 1) / 2).expand(-1, 3, -1, -1)
    prompts = [DIGIT_WORDS[int(d)] for d in labels]
    clip = rewards.load("toy/clipscore")
    captions = [f"a handwritten {w}" for w in DIGIT_WORDS]
    scores = torch.stack([clip.score(media, [c] * len(media)) for c in captions], dim=1)  # [N, 10]
    return {"held_out_digits": len(labels),
            "classifier": rewards.load("toy/digit_match").score(media, prompts).mean().item(),
            "judge": rewards.load("toy/judge_digit").score(media, prompts).mean().item(),
            "clip_retrieval": (scores.argmax(1) == labels).float().mean().item()}


def video_generator() -> dict:
    from flowalign.generators import load_generator
    from flowalign.toy.video_flow import measure_video_model

    gen = load_generator("toy/video", device="cpu")
    return {f"{'held-out' if held_out else 'training'} phrasings, CFG {guidance or gen.default_guidance:g}":
            measure_video_model(gen, held_out=held_out, guidance=guidance)
            for held_out in (False, True) for guidance in (None, 1.0)}


def music_generator() -> dict:
    from flowalign.generators import load_generator
    from flowalign.toy.music_flow import measure_music_model, score_music
    from flowalign.toy.music_prompts import sample_prompts

    gen = load_generator("toy/music", device="cpu")
    runs = {"training phrasings, CFG 3": {}, "training phrasings, CFG 1": {"guidance": 1.0},
            "held-out phrasings, CFG 3": {"held_out": True}}
    out = {label: measure_music_model(gen, n=200, **options) for label, options in runs.items()}
    prompts, _ = sample_prompts(200, seed=0)
    out["random latents decoded"] = score_music(gen.decode(gen.initial_noise(200, torch.Generator().manual_seed(0))),
                                                prompts)
    return out


def main() -> dict:
    result = {"command": "python -m benchmarks.toy_models", "digits": digits_generator(), "judges": judges(),
              "video": video_generator(), "music": music_generator()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "toy_models.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
