"""Share a trained LoRA: a Hugging Face model card in its ``final/`` folder, and a push to the Hub.

The card is the one diffusers' training scripts write (YAML metadata with ``base_model``, ``library_name:
diffusers``, tags and a ``widget`` of sample images, then prose), plus a ``flowalign`` block with what shaped the
weights: the method and its options, the rewards, the held-out reward before and after. ``final/`` is then a
folder that ``pipe.load_lora_weights`` reads, locally or from the Hub.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .config import ConfigError, RunConfig, config_dict
from .errors import FlowalignError
from .training.lora import LORA_FILE

CARD = "README.md"
FIGURES = ("before", "after", "reward_curve", "monitor")  # report/NAME.png, in the card's order
TRAIN_SETTINGS = ("prompts_per_iteration", "steps", "guidance", "lr", "updates_per_iteration", "seed")


@dataclasses.dataclass
class CardFacts:
    """What a model card states about one run (kept in the card's metadata, so a later push can rewrite it)."""

    base_model: str
    model_options: dict
    pipeline_class: str
    component: str
    method: str
    options: dict
    modifiers: dict
    rewards: dict[str, float]
    train: dict
    iterations: int
    lora_rank: int
    lora_alpha: float
    reward_before: float | None = None
    reward_after: float | None = None
    eval_prompts: int = 0


def facts_of(cfg: RunConfig, lora_format: tuple[str, str], metrics: dict) -> CardFacts:
    """The card's facts from a run's config, its generator's LoRA format and its report's metrics."""
    written = config_dict(cfg)  # the options as the run's YAML holds them
    return CardFacts(
        base_model=cfg.model.name, model_options=written["model"]["options"], pipeline_class=lora_format[0],
        component=lora_format[1], method=cfg.method, options=written[cfg.method],
        modifiers=written.get("modifiers", {}),
        rewards=dict(cfg.reward.weights), train={k: getattr(cfg.train, k) for k in TRAIN_SETTINGS},
        iterations=cfg.train.iterations, lora_rank=cfg.train.lora_rank,
        lora_alpha=cfg.train.lora_alpha, reward_before=metrics.get("reward_before"),
        reward_after=metrics.get("reward_after"), eval_prompts=cfg.train.eval_prompts if "reward_after" in metrics
        else 0)


def write_model_card(run_dir: str | Path, facts: CardFacts, repo_id: str | None = None) -> Path:
    """``final/README.md`` and ``final/images/*.png`` (the report's figures) for a run's final LoRA; returns the
    card's path. ``repo_id`` is what the card's code loads (default: the folder itself)."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / LORA_FILE).is_file():
        raise FlowalignError(f"share: {final / LORA_FILE} not found (a LoRA run's final weights: flowalign train "
                             f"writes them at the end)")
    images = _copy_figures(run_dir / "report", final / "images")
    if (run_dir / "config.yaml").is_file():  # the whole run, to train it again: flowalign train CONFIG
        shutil.copyfile(run_dir / "config.yaml", final / "flowalign_config.yaml")
    toy = facts.base_model.startswith("toy/")
    widget = [{"text": f"{facts.method} samples after training", "output": {"url": f"images/{name}.png"}}
              for name in ("after",) if name in images]
    data = ModelCardData(
        base_model=None if toy else facts.base_model, library_name="diffusers", license=None,
        tags=["flowalign", "lora", "diffusers", "reinforcement-learning", facts.method,
              *(["text-to-image"] if facts.component in ("transformer", "unet") and not toy else [])],
        widget=widget or None, flowalign=dataclasses.asdict(facts))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts, images, repo_id or str(final))}")
    card.save(final / CARD)
    return final / CARD


def read_facts(final: str | Path) -> CardFacts:
    """The facts a card in ``final/`` was written with (its ``flowalign`` metadata)."""
    from huggingface_hub import ModelCard

    path = Path(final) / CARD
    if not path.is_file():
        raise FlowalignError(f"share: {path} not found (flowalign train writes the card with the final LoRA)")
    stored = ModelCard.load(path).data.to_dict().get("flowalign")
    if not isinstance(stored, dict):
        raise FlowalignError(f"share: {path} has no flowalign metadata (not a card flowalign wrote)")
    return CardFacts(**{f.name: stored[f.name] for f in dataclasses.fields(CardFacts) if f.name in stored})


def share(run_dir: str | Path, repo_id: str | None = None, private: bool = False, token: str | None = None) -> str:
    """Rewrite the run's card for ``repo_id`` and push ``final/`` there (a model repo, created if needed); without
    ``repo_id`` the card is rewritten in place. Returns the repo's URL or the folder."""
    final = Path(run_dir) / "final"
    facts = read_facts(final)
    write_model_card(run_dir, facts, repo_id)
    if repo_id is None:
        return str(final)
    check_push(repo_id)
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    upload_folder(repo_id=repo_id, folder_path=str(final), token=token, repo_type="model",
                  commit_message=f"flowalign: {facts.method} LoRA for {facts.base_model}")
    return str(url)


def check_push(repo_id: str, field: str = "--push-to-hub") -> None:
    """A repo id the Hub accepts (``name`` or ``owner/name``) and a network to push over; one line otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"{field}: '{repo_id}' is not a Hub repo id (expected owner/name)") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{field}: pushing needs the network and HF_HUB_OFFLINE is set (flowalign share RUN_DIR "
                          f"writes the card offline; push it later)")


def _copy_figures(report: Path, images: Path) -> list[str]:
    """The report's PNG figures into the card's ``images/``; returns the names copied."""
    images.mkdir(parents=True, exist_ok=True)
    copied = [name for name in FIGURES if (report / f"{name}.png").is_file()]
    for name in copied:
        shutil.copyfile(report / f"{name}.png", images / f"{name}.png")
    return copied


def _body(facts: CardFacts, images: list[str], repo: str) -> str:
    """The card's prose: what was trained, how to load it, the evidence, the settings."""
    rewards = ", ".join(f"`{name}` × {weight:g}" for name, weight in facts.rewards.items())
    lines = [f"# {facts.method} LoRA for {facts.base_model}", "",
             f"A LoRA (rank {facts.lora_rank}, alpha {facts.lora_alpha:g}) on the {facts.component} of "
             f"`{facts.base_model}`, trained with flowalign's "
             f"`{facts.method}` for {facts.iterations} iterations against the reward {rewards}.", ""]
    if facts.reward_after is not None:
        lines += [f"Reward on {facts.eval_prompts} held-out prompts and fixed seeds: "
                  f"**{facts.reward_before:.4f} → {facts.reward_after:.4f}** (before → after training).", ""]
    lines += ["## How to use", "", "```python", *_loading_code(facts, repo), "```", ""]
    shown = {"before": "Before training (held-out prompts, fixed seeds)", "after": "After training (the same prompts "
             "and seeds)", "reward_curve": "Training reward", "monitor": "The hacking monitor's guards"}
    if images:
        lines += ["## Samples and curves", ""]
        lines += [f"**{shown[name]}**\n\n![{name}](images/{name}.png)\n" for name in images]
    settings = {**{f"train.{k}": v for k, v in facts.train.items()},
                **{f"{facts.method}.{k}": v for k, v in facts.options.items()},
                **{f"modifiers.{m}.{k}": v for m, opts in facts.modifiers.items() for k, v in opts.items()}}
    lines += ["## Training settings", "", "| option | value |", "|---|---|",
              *(f"| `{k}` | `{v}` |" for k, v in settings.items()), "",
              "The whole config is in `flowalign_config.yaml` (`flowalign train flowalign_config.yaml` trains it "
              "again).", ""]
    return "\n".join(lines)


def _loading_code(facts: CardFacts, repo: str) -> list[str]:
    """Python that loads the LoRA into the base model: the pipeline's LoRA loader where it has one."""
    if facts.base_model.startswith("toy/"):
        return ["from flowalign.generators import load_generator",
                "from flowalign.inference import generate, save_grid", "",
                f"gen = load_generator({facts.base_model!r})",
                f"gen.trainable_module.load_lora_adapter({repo!r}, prefix={facts.component!r}, "
                f"weight_name={LORA_FILE!r})",
                "save_grid(generate(gen, ['a handwritten seven'] * 8, steps=20, guidance=3.0), 'sevens.png')"]
    import diffusers

    pipeline = getattr(diffusers, facts.pipeline_class, None)
    head = ["import torch", f"from diffusers import {facts.pipeline_class}", "",
            f"pipe = {facts.pipeline_class}.from_pretrained({facts.base_model!r}, torch_dtype=torch.bfloat16)",
            "pipe.to('cuda')"]
    if pipeline is not None and hasattr(pipeline, "load_lora_weights"):
        second = facts.model_options.get("train_expert") == "low"  # Wan 2.2's low-noise expert
        return [*head, f"pipe.load_lora_weights({repo!r}{', load_into_transformer_2=True' if second else ''})"]
    return [*head, f"pipe.{facts.component}.load_lora_adapter({repo!r}, prefix={facts.component!r}, "
                   f"use_safetensors=True)"]
