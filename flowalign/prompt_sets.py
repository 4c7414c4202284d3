"""Prompt files: one prompt per line (``.txt``), or one JSON object per line (``.jsonl``) carrying the prompt and the
fields rewards and editing models need (GenEval's object list, OCR's target text, a source image), as the anchors'
``train_metadata.jsonl`` / ``test_metadata.jsonl`` do. Everything but ``prompt`` is passed on as metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlowalignError
from .files import MAX_PROMPT_FILE_BYTES, read_text

#: Metadata fields that name files: resolved against the prompt file's folder, checked to exist when read.
PATH_FIELDS = ("image",)


@dataclass
class PromptSet:
    """Prompts and, row for row, their metadata (``{}`` for a plain prompt)."""

    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, indices: list[int]) -> tuple[list[str], list[dict]]:
        """The prompts and (copies of the) metadata at ``indices``."""
        return [self.prompts[i] for i in indices], [dict(self.metadata[i]) for i in indices]


def is_jsonl(path: str | Path) -> bool:
    return str(path).lower().endswith(".jsonl")


def read_prompt_set(path: str | Path, what: str) -> PromptSet:
    """The prompts of a ``.txt`` or ``.jsonl`` file (at most 16 MiB of UTF-8); empty lines are skipped. ``what``
    names the option in errors (``train.prompt_file``)."""
    text = read_text(path, what, MAX_PROMPT_FILE_BYTES)
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not is_jsonl(path):
        return PromptSet([line for _, line in lines])
    rows = [_json_row(line, n, path, what) for n, line in lines]
    return PromptSet([prompt for prompt, _ in rows], [meta for _, meta in rows])


def _json_row(line: str, number: int, path: str | Path, what: str) -> tuple[str, dict]:
    where = f"{what}: '{path}' line {number}"
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise FlowalignError(f"{where} is not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(row, dict):
        raise FlowalignError(f"{where} holds {type(row).__name__}, expected a JSON object with a \"prompt\"")
    prompt = row.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise FlowalignError(f"{where} has no \"prompt\" string (the fields are {sorted(row) or 'none'})")
    for key in PATH_FIELDS:
        if key in row:
            row[key] = _existing_file(row[key], Path(path).parent, f"{where}: \"{key}\"")
    return prompt.strip(), row


def _existing_file(value, folder: Path, where: str) -> str:
    """A path from a prompt file, relative to the file's folder unless absolute; it must be a file."""
    if not isinstance(value, str) or not value:
        raise FlowalignError(f"{where} must be a file path, got {value!r}")
    resolved = Path(value) if Path(value).is_absolute() else folder / value
    if not resolved.is_file():
        raise FlowalignError(f"{where}: '{value}' is not a file (relative paths start at the prompt file's folder)")
    return str(resolved)
