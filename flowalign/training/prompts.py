"""Which prompts an iteration trains on, and which trajectories each process runs.

Everything derives from (seed, iteration), so every process draws the same global prompt list and a
resumed run draws what the uninterrupted run would have. Trajectory ``t`` (prompt ``t // G``) runs on
process ``t % world``: a prompt's group is spread over the processes, as Flow-GRPO's sampler does; when a part
of the run compares a prompt's samples on one process (a shared trunk, a pairwise judge, a best path, a pair),
prompt ``p`` runs whole on process ``p % world``.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..config import RunConfig, TrainConfig
from ..errors import FlowalignError
from ..prompt_sets import PromptSet, read_prompt_set


def read_prompt_file(path: str | Path, what: str = "train.prompt_file") -> PromptSet:
    """A training or held-out prompt file (``.txt``, or ``.jsonl`` with metadata); one line if it holds none."""
    prompts = read_prompt_set(path, what)
    if not prompts.prompts:
        raise FlowalignError(f"{what}: '{path}' holds no prompts")
    return prompts


def run_prompt_files(cfg: RunConfig) -> tuple[PromptSet | None, PromptSet | None]:
    """A run's training prompts and held-out prompts (``train.eval_prompt_file``, else the training file), read and
    checked (an editing model needs a source image on every row) before anything loads; None for the toy's."""
    from ..checks import check_sources

    t = cfg.train
    train = read_prompt_file(t.prompt_file) if t.prompt_file else None
    held_out = read_prompt_file(t.eval_prompt_file, "train.eval_prompt_file") if t.eval_prompt_file else train
    check_sources(cfg.model.name, cfg.model.local_files_only,
                  {"train.prompt_file": train, "train.eval_prompt_file": held_out})
    return train, held_out


#: Toy world (a generator's ``toy_world``) -> its prompt module: ``sample_prompts``, ``TEMPLATES``,
#: ``HELD_OUT_TEMPLATES``.
TOY_PROMPTS = {"digits": "flowalign.toy.prompts", "video": "flowalign.toy.video_prompts",
               "music": "flowalign.toy.music_prompts"}


def toy_prompts(world: str, n: int, seed: int, held_out: bool = False) -> tuple[list[str], list[dict]]:
    """``n`` seeded prompts of a toy world and their metadata, in training or held-out phrasings."""
    import importlib

    if world not in TOY_PROMPTS:
        raise FlowalignError(f"toy world '{world}': no prompt set (available: {', '.join(TOY_PROMPTS)})")
    module = importlib.import_module(TOY_PROMPTS[world])
    prompts, meta = module.sample_prompts(n, seed=seed,
                                          templates=module.HELD_OUT_TEMPLATES if held_out else module.TEMPLATES)
    # digits: bare labels; music: melodies (its rewards read the prompt)
    return prompts, [m if isinstance(m, dict) else {"digit": m} if isinstance(m, int) else {} for m in meta]


def iteration_prompts(cfg: TrainConfig, iteration: int, file_prompts: PromptSet | None = None,
                      world: str = "digits") -> tuple[list[str], list[dict]]:
    """The iteration's ``prompts_per_iteration`` prompts (and metadata), drawn with replacement, identical on every
    process; without a prompt file, the toy ``world``'s training phrasings."""
    seed = cfg.seed * 1_000_003 + iteration
    if file_prompts is not None:
        rng, rows = random.Random(seed), range(len(file_prompts))
        return file_prompts.rows([rng.choice(rows) for _ in range(cfg.prompts_per_iteration)])
    return toy_prompts(world, cfg.prompts_per_iteration, seed)


def local_trajectories(total: int, rank: int, world: int) -> list[int]:
    """This process's trajectory indices among ``total``; each process gets the same number."""
    if total % world:
        raise FlowalignError(f"{total} samples per iteration must be divisible by the number of processes ({world})")
    return list(range(rank, total, world))


def local_prompts(num_prompts: int, rank: int, world: int) -> list[int]:
    """The prompts this process runs whole (prompt ``p`` on process ``p % world``); each gets the same number."""
    if num_prompts % world:
        raise FlowalignError(f"train.prompts_per_iteration ({num_prompts}) must be divisible by the number of "
                             f"processes ({world}) when a prompt's samples stay on one process")
    return list(range(rank, num_prompts, world))


def local_samples(num_prompts: int, per_prompt: int, rank: int, world: int, whole_prompts: bool) -> list[int]:
    """This process's sample indices among ``num_prompts × per_prompt`` (sample ``s`` belongs to prompt
    ``s // per_prompt``): whole prompts, or spread one by one."""
    if whole_prompts:
        return [p * per_prompt + g for p in local_prompts(num_prompts, rank, world) for g in range(per_prompt)]
    return local_trajectories(num_prompts * per_prompt, rank, world)
