"""The rollout structures of the GRPO family, each a short plan for ``run_plan`` (docs/samplers.md).

Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``; ``T = len(sigmas) - 1``. Every function returns
``(roots, root_rows)``: the plan's roots and the prompt row each root starts from. The caller draws
one initial noise per root.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from .rollout import Node, Step


def _steps(sigmas: torch.Tensor, indices, sde: set[int], train: set[int], scale: float = 1.0) -> list[Step]:
    s = sigmas.tolist()
    return [Step(s[i], s[i + 1], scale if i in sde else 0.0, i in train and i in sde, index=i) for i in indices]


def independent(sigmas: torch.Tensor, num_prompts: int, group_size: int, sde_steps: list[int] | None = None,
                train_steps: list[int] | None = None, train_fraction: float | None = None,
                share_prefix: bool = False, seed: int = 0,
                select: list[int] | None = None) -> tuple[list[Node], torch.Tensor]:
    """``group_size`` trajectories per prompt, SDE at ``sde_steps`` (default all), ODE elsewhere.

    - Flow-GRPO: all steps SDE, ``train_steps`` = the first ``int(T·0.99)`` steps;
    - DanceGRPO: ``train_fraction`` trains a random subset of ``train_steps`` per trajectory (seeded by
      ``seed`` and the trajectory's index, so it does not depend on how trajectories are spread);
    - an SDE window (Flow-GRPO-Fast, MixGRPO): ``sde_steps`` = the window (``windows.WindowSchedule``).
    ``share_prefix``: a group starts from one noise and shares the ODE steps before the first SDE step
    (one root per prompt, computed once), instead of one noise per trajectory.
    ``select``: build only these trajectories (index ``p·G + g``), e.g. one process's share of the groups.
    Root rows are prompt indices; every leaf's group is its prompt.
    """
    T = len(sigmas) - 1
    sde = set(range(T)) if sde_steps is None else set(sde_steps)
    trainable = sorted(sde if train_steps is None else set(train_steps) & sde)
    chosen = list(range(num_prompts * group_size)) if select is None else list(select)

    def trained(trajectory: int) -> set[int]:
        if train_fraction is None:
            return set(trainable)
        rng = random.Random(seed * 1_000_003 + trajectory)
        return set(rng.sample(trainable, int(len(trainable) * train_fraction)))

    if share_prefix:
        first_sde = min(sde) if sde else T
        roots, rows = [], []
        for p in sorted({t // group_size for t in chosen}):
            kids = [Node(_steps(sigmas, range(first_sde, T), sde, trained(t)), leaf_group=p, node_group=p, depth=1)
                    for t in chosen if t // group_size == p]
            roots.append(Node(_steps(sigmas, range(first_sde), sde, set()), kids, node_group=p))
            rows.append(p)
        return roots, torch.tensor(rows)
    roots = [Node(_steps(sigmas, range(T), sde, trained(t)), leaf_group=t // group_size, node_group=t // group_size)
             for t in chosen]
    return roots, torch.tensor([t // group_size for t in chosen])


def branches(sigmas: torch.Tensor, num_prompts: int, branch_steps: list[int], num_branches: int = 6,
             ) -> tuple[list[Node], torch.Tensor]:
    """TempFlow-GRPO: an ODE trunk per prompt; at each step ``i`` of ``branch_steps`` K SDE branches leave
    the trunk state x_i, each finished by ODE and scored. Leaves of one (prompt, i) form a group
    (per-step advantage columns); each branch's one trained transition is its SDE step."""
    T = len(sigmas) - 1
    points = sorted(set(branch_steps))
    roots = []
    for p in range(num_prompts):
        def trunk(from_step: int, rest: list[int]) -> Node:
            here = rest[0]
            node = Node(_steps(sigmas, range(from_step, here), set(), set()), node_group=("trunk", p))
            node.children = [Node(_steps(sigmas, [here], {here}, {here})
                                  + _steps(sigmas, range(here + 1, T), set(), set()),
                                  leaf_group=(p, here), node_group=(p, here), depth=1)
                             for _ in range(num_branches)]
            if rest[1:]:
                node.children.append(trunk(here, rest[1:]))
            return node
        roots.append(trunk(0, points))
    return roots, torch.arange(num_prompts)


def singular(sigmas: torch.Tensor, num_prompts: int, sde_steps: list[int], group_size: int = 12,
             strides: tuple[int, ...] = (1, 2, 3)) -> tuple[list[Node], torch.Tensor]:
    """G²RPO: an ODE trunk per prompt; at each ``k`` of ``sde_steps`` G branches take one SDE step, then each
    branch is finished by ODE at every stride λ (every λ-th σ of the remaining grid, ending at σ = 0).
    Leaves of one (prompt, k, λ) form a group; a branch's SDE transition gets credit from its J leaves."""
    T = len(sigmas) - 1
    points = sorted(set(sde_steps))
    s = sigmas.tolist()

    def finish(start: int, stride: int) -> list[Step]:
        grid = list(range(start, T, stride)) + [T]
        return [Step(s[a], s[b], index=a) for a, b in zip(grid[:-1], grid[1:])]

    roots = []
    for p in range(num_prompts):
        def trunk(from_step: int, rest: list[int]) -> Node:
            k = rest[0]
            node = Node(_steps(sigmas, range(from_step, k), set(), set()), node_group=("trunk", p))
            for _ in range(group_size):
                branch = Node(_steps(sigmas, [k], {k}, {k}), node_group=(p, k), depth=1)
                branch.children = [Node(finish(k + 1, lam), leaf_group=(p, k, lam), node_group=(p, k, lam), depth=2)
                                   for lam in strides]
                node.children.append(branch)
            if rest[1:]:
                node.children.append(trunk(k, rest[1:]))
            return node
        roots.append(trunk(0, points))
    return roots, torch.arange(num_prompts)


def linear_depth_noise(beta: float = 0.5) -> Callable[[int, int], float]:
    """Dynamic-TreeRPO's noise rising with depth, ``1 + β·k/d`` (paper-approximate: the paper gives a
    linear rise in k/d with slope β but not its exact form)."""
    return lambda depth, max_depth: 1.0 + beta * depth / max(max_depth, 1)


def tree(sigmas: torch.Tensor, num_prompts: int, split_steps: list[int], branching: int = 2,
         sde_steps: list[int] | None = None, depth_noise: Callable[[int, int], float] | None = None,
         train_depths: set[int] | None = None) -> tuple[list[Node], torch.Tensor]:
    """Dynamic-TreeRPO / BranchGRPO: one root per prompt; at each split step every path splits into
    ``branching`` children (``branching**len(split_steps)`` leaves sharing prefixes). SDE only at
    ``sde_steps`` (the window; default all), ODE outside; the noise of a depth-k node is scaled by
    ``depth_noise(k, d)``. ``train_depths`` prunes: only transitions at those depths are trained."""
    T = len(sigmas) - 1
    splits = sorted(set(split_steps))
    sde = set(range(T)) if sde_steps is None else set(sde_steps)
    if not set(splits) <= sde:
        raise ValueError(f"tree: split steps {sorted(set(splits) - sde)} are ODE steps (children would be identical)")
    depth_noise = depth_noise or (lambda depth, max_depth: 1.0)
    d = len(splits)
    bounds = splits + [T]

    def build(p: int, depth: int, start: int) -> Node:
        train = sde if train_depths is None or depth in train_depths else set()
        node = Node(_steps(sigmas, range(start, bounds[depth] if depth < d else T), sde, train,
                           depth_noise(depth, d)), node_group=(p, depth), depth=depth)
        if depth < d:
            node.children = [build(p, depth + 1, bounds[depth]) for _ in range(branching)]
        else:
            node.leaf_group = p
        return node

    return [build(p, 0, 0) for p in range(num_prompts)], torch.arange(num_prompts)
