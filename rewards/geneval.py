"""GenEval's compositional check as a reward (Flow-GRPO's GenEval reward): each image is sent with its prompt's GenEval
metadata to a server in GenEval's own environment (``scripts/geneval_server.py``: Mask2Former + CLIP colours), over the
JSON protocol of ``HTTPReward``, and the score named by ``score`` is read back.

``score``: ``partial`` (default; Flow-GRPO trains on it: the mean of per-clause count, colour and position terms),
``strict`` (1 when every count is exact and every colour and position right, else 0: Flow-GRPO's accuracy), or
``correct`` (GenEval's own 0/1 check: at least the count, exclude clauses). The server computes all three.
"""
from __future__ import annotations

import torch

from .errors import RewardError
from .remote import HTTPReward

SCORES = ("partial", "strict", "correct")
#: GenEval's six tasks (``tag``).
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def metadata_problem(meta: object) -> str | None:
    """What keeps ``meta`` from being a line of GenEval's ``evaluation_metadata.jsonl`` (None when it is one)."""
    if not isinstance(meta, dict) or meta.get("tag") not in TAGS:
        return f'"tag" must be one of {", ".join(TAGS)}'
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        return '"include" must be a non-empty list of {"class", "count", "color"?, "position"?}'
    for i, clause in enumerate(include):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or \
                not isinstance(clause.get("count"), int) or clause["count"] < 1:
            return f'include[{i}] needs a "class" string and a "count" >= 1'
        position = clause.get("position")
        if position is not None and not (isinstance(position, list) and len(position) == 2
                                         and isinstance(position[1], int) and 0 <= position[1] < i):
            return f'include[{i}]["position"] must be [relation, index of an earlier clause]'
    return None


class GenEvalReward(HTTPReward):
    """GenEval's compositional check of each image against its prompt's objects, from scripts/geneval_server.py.

    ``metadata`` of each sample: a line of GenEval's ``evaluation_metadata.jsonl`` (``tag``, ``include``, optionally
    ``exclude``). ``score``: ``partial``, ``strict`` or ``correct`` (module docstring). Images travel as JPEG by
    default, as Flow-GRPO sends them."""

    name = "geneval"

    def __init__(self, url: str = "http://127.0.0.1:18085", score: str = "partial", timeout: float = 120.0,
                 retries: int = 2, backoff: float = 0.5, image_format: str = "jpeg", batch_size: int = 64):
        super().__init__(url, timeout=timeout, retries=retries, backoff=backoff, modality="image",
                         image_format=image_format, batch_size=batch_size)
        if score not in SCORES:
            raise RewardError(f"reward {self.name}: score must be one of {', '.join(SCORES)}, got {score!r}")
        self.which = score

    def _score(self, media: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        for i, meta in enumerate(metadata):
            if problem := metadata_problem(meta):
                raise RewardError(f"reward {self.name}: sample {i} ({prompts[i][:60]!r}) needs GenEval metadata (a "
                                  f"line of evaluation_metadata.jsonl in a .jsonl prompt file): {problem}")
        return super()._score(media, prompts, metadata)

    def _parse(self, reply: object, n: int) -> list[float]:
        chosen = reply.get(self.which) if isinstance(reply, dict) else None
        if not isinstance(chosen, list):
            raise RewardError(f'reward {self.name}: {self.url}: malformed reply (no "{self.which}" list: is it '
                              "scripts/geneval_server.py?)")
        return super()._parse({"scores": chosen}, n)
