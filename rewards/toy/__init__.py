"""Toy rewards for the embedded digits world: a classifier, measurable attributes, a tiny CLIP."""
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
