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

from ..config import TrainConfig
from ..errors import FlowalignError


def read_prompt_file(path: str | Path) -> list[str]:
    from ..files import read_prompt_lines

    lines = read_prompt_lines(path, "train.prompt_file")
    if not lines:
        raise FlowalignError(f"train.prompt_file: '{path}' holds no prompts")
    return lines


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


def iteration_prompts(cfg: TrainConfig, iteration: int, file_prompts: list[str] | None = None,
                      world: str = "digits") -> tuple[list[str], list[dict]]:
    """The iteration's ``prompts_per_iteration`` prompts (and metadata), identical on every process; without a
    prompt file, the toy ``world``'s training phrasings."""
    seed = cfg.seed * 1_000_003 + iteration
    if file_prompts is not None:
        rng = random.Random(seed)
        return [rng.choice(file_prompts) for _ in range(cfg.prompts_per_iteration)], \
            [{} for _ in range(cfg.prompts_per_iteration)]
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
