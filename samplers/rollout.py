"""The rollout engine: runs a plan of path segments (a forest of nodes) with batched model passes.

A **plan** is a tree of ``Node``s per starting noise. A node is a segment of steps; its first step leaves
the state where its parent ended (or the root's initial noise). All steps leaving one state share one
velocity evaluation, so a split costs one NFE however many children it has. A node without children
ends in a **leaf** (a sample to decode and score). Every structure of the GRPO family is a plan:
independent trajectories are one node per sample, a tree splits at its split points, TempFlow-GRPO
hangs SDE branches off an ODE trunk, G²RPO finishes each branch at several strides.

Each round evaluates the velocity of every live state in one batch (different σ per row are fine),
then takes every step leaving those states. A transition whose step is marked ``train`` is stored with
its old log-prob; its advantage comes from the leaves below the node it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from .kernels import NoiseSchedule, step_logp, step_mean

#: ``velocity(x, sigma[B], rows[B]) -> v``: rows index the conditioning batch (one per prompt).
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """One step σ → σ_next; ``scale`` multiplies the noise (0: ODE); ``train`` stores it for training."""

    sigma: float
    sigma_next: float
    scale: float = 0.0
    train: bool = False
    index: int = -1  # the step's position in the sampling grid (σ = sigmas[index]); -1 when not on it


@dataclass
class Node:
    steps: list[Step] = field(default_factory=list)
    children: list["Node"] = field(default_factory=list)
    #: Leaves with the same group key are compared with each other (advantage normalisation).
    leaf_group: Hashable = None
    #: Transitions of nodes with the same key are compared (per-depth tree advantages).
    node_group: Hashable = None
    depth: int = 0


@dataclass
class Rollout:
    """What training needs: stored transitions, leaves to score, and who gets credit from which leaf."""

    # transitions [T]
    x: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    scale: torch.Tensor
    logp: torch.Tensor
    mean: torch.Tensor  # the step's mean at sampling time (GRPO-Guard's ratio normalisation needs it)
    row: torch.Tensor  # conditioning row of each transition
    owner: torch.Tensor  # the node each transition belongs to
    round: torch.Tensor  # the round (model pass) that took it: transitions are stored round by round
    step: torch.Tensor  # the step's position in the sampling grid (``Step.index``)
    # leaves [L]
    leaves: torch.Tensor
    leaf_row: torch.Tensor
    leaf_group: torch.Tensor
    leaf_node: torch.Tensor  # the plan node each leaf ends (index into ``flatten_plan(roots)``)
    # nodes [N]
    node_leaves: torch.Tensor  # bool [N, L]: the leaves below each node
    node_group: torch.Tensor  # [N]
    node_depth: torch.Tensor  # [N]
    nfe: int
    schedule: NoiseSchedule

    @property
    def transition_leaves(self) -> torch.Tensor:
        """bool ``[T, L]``: the leaves whose rewards each transition's advantage comes from."""
        return self.node_leaves[self.owner]

    @property
    def transition_group(self) -> torch.Tensor:
        return self.node_group[self.owner]

    @property
    def num_transitions(self) -> int:
        return self.x.shape[0]


def _index(nodes: list[Node]) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(nodes)}


def flatten_plan(roots: list[Node]) -> list[Node]:
    """Every node of a plan, depth first (the order of ``Rollout.leaf_node`` / ``owner`` indices)."""
    out, stack = [], list(reversed(roots))
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(node.children))
    return out


def _outgoing(node: Node, k: int) -> list[tuple[Node, int]]:
    """The steps leaving a state at position ``k`` of ``node``: its own next step, or its children's first.

    Children without steps pass the state on to their own children."""
    if k < len(node.steps):
        return [(node, k)]
    out = []
    for child in node.children:
        out += _outgoing(child, 0)
    return out


def _ends(node: Node, k: int) -> list[Node]:
    """The leaves that end at a state at position ``k`` of ``node`` (itself, or step-less leaf children)."""
    if k < len(node.steps):
        return []
    if not node.children:
        return [node]
    out = []
    for child in node.children:
        if not child.steps:
            out += _ends(child, 0)
    return out


def run_plan(velocity: VelocityFn, roots: list[Node], root_rows: torch.Tensor, x_init: torch.Tensor,
             schedule: NoiseSchedule, generator: torch.Generator | None = None,
             max_batch: int | None = None,
             noise_fn: Callable[[list[tuple[Node, int]]], torch.Tensor] | None = None) -> Rollout:
    """Execute ``roots`` (one per initial state ``x_init[i]``, conditioning row ``root_rows[i]``).

    Noise comes from ``generator``, or from ``noise_fn(targets)`` (one noise per step taken this round, each
    target a ``(node, step position)``), which lets a caller make each trajectory's noise independent of how
    trajectories are batched or spread over processes."""
    nodes = flatten_plan(roots)
    node_id = _index(nodes)
    device = x_init.device
    # live states: tensor + (node, position, row) per state
    states, where = x_init.float(), [(root, 0, int(r)) for root, r in zip(roots, root_rows.tolist())]
    transitions: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "x_next", "sigma", "sigma_next", "scale",
                                                                  "logp", "mean", "row", "owner", "round",
                                                                  "step")}
    leaves, leaf_nodes, leaf_rows, nfe, rounds = [], [], [], 0, 0
    while where:
        live = [i for i, (node, k, _) in enumerate(where) if _outgoing(node, k)]
        for i, (node, k, row) in enumerate(where):  # leaves that end here
            for leaf in _ends(node, k):
                leaves.append(states[i])
                leaf_nodes.append(node_id[id(leaf)])
                leaf_rows.append(row)
        if not live:
            break
        live_t = torch.tensor(live, device=device)
        x = states[live_t]
        first = [_outgoing(*where[i][:2])[0] for i in live]
        sigma = torch.tensor([n.steps[k].sigma for n, k in first], device=device)
        rows = torch.tensor([where[i][2] for i in live], device=device)
        v = _batched(velocity, x, sigma, rows, max_batch).float()
        nfe += len(live)
        # every step leaving every live state
        parent, targets = [], []
        for j, i in enumerate(live):
            for target in _outgoing(*where[i][:2]):
                parent.append(j)
                targets.append(target)
        steps = [n.steps[k] for n, k in targets]
        p = torch.tensor(parent, device=device)
        s = torch.tensor([st.sigma for st in steps], device=device)
        s_next = torch.tensor([st.sigma_next for st in steps], device=device)
        scale = torch.tensor([st.scale for st in steps], device=device)
        mean, std = step_mean(v[p], x[p], s, s_next, schedule, scale)
        noise = noise_fn(targets).to(device) if noise_fn else _noise(mean.shape, generator, device)
        x_next = mean + std.view((-1,) + (1,) * (mean.ndim - 1)) * noise
        stochastic = schedule.kind != "zero" and schedule.level > 0
        trained = [e for e, st in enumerate(steps) if stochastic and st.train and st.scale > 0]  # host-side: no sync
        if trained:
            sel = torch.tensor(trained, device=device)
            transitions["x"].append(x[p[sel]])
            transitions["x_next"].append(x_next[sel])
            transitions["sigma"].append(s[sel])
            transitions["sigma_next"].append(s_next[sel])
            transitions["scale"].append(scale[sel])
            transitions["logp"].append(step_logp(x_next[sel], mean[sel], std[sel], schedule))
            transitions["mean"].append(mean[sel])
            transitions["row"].append(rows[p[sel]])
            transitions["owner"].append(torch.tensor([node_id[id(targets[e][0])] for e in trained], device=device))
            transitions["round"].append(torch.full((len(trained),), rounds, dtype=torch.long, device=device))
            transitions["step"].append(torch.tensor([steps[e].index for e in trained], device=device))
        states, rounds = x_next, rounds + 1
        where = [(n, k + 1, where[live[j]][2]) for (n, k), j in zip(targets, parent)]
    return _assemble(transitions, leaves, leaf_nodes, leaf_rows, roots, nodes, nfe, schedule, x_init)


def _batched(velocity: VelocityFn, x, sigma, rows, max_batch: int | None) -> torch.Tensor:
    if not max_batch or x.shape[0] <= max_batch:
        return velocity(x, sigma, rows)
    return torch.cat([velocity(x[i:i + max_batch], sigma[i:i + max_batch], rows[i:i + max_batch])
                      for i in range(0, x.shape[0], max_batch)])


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise from ``generator`` (drawn on the generator's device, then moved)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def group_ids(keys: list) -> torch.Tensor:
    """Hashable group keys as integers, numbered in order of first appearance."""
    ids: dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def _assemble(tr, leaves, leaf_nodes, leaf_rows, roots, nodes, nfe, schedule, x_init) -> Rollout:
    device = x_init.device
    node_id = _index(nodes)
    num_leaves = len(leaves)
    below = torch.zeros(len(nodes), num_leaves, dtype=torch.bool)
    leaf_pos: dict[int, list[int]] = {}
    for leaf, n in enumerate(leaf_nodes):
        leaf_pos.setdefault(n, []).append(leaf)

    def fill(node: Node) -> list[int]:
        idx = list(leaf_pos.get(node_id[id(node)], []))
        for child in node.children:
            idx += fill(child)
        below[node_id[id(node)], idx] = True
        return idx

    for root in roots:
        fill(root)
    shape = x_init.shape[1:]
    empty = lambda *s, dtype=torch.float32: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
    cat = lambda key, fallback: torch.cat(tr[key]) if tr[key] else fallback  # noqa: E731
    return Rollout(
        x=cat("x", empty(0, *shape)), x_next=cat("x_next", empty(0, *shape)),
        sigma=cat("sigma", empty(0)), sigma_next=cat("sigma_next", empty(0)), scale=cat("scale", empty(0)),
        logp=cat("logp", empty(0)), mean=cat("mean", empty(0, *shape)), row=cat("row", empty(0, dtype=torch.long)),
        owner=cat("owner", empty(0, dtype=torch.long)), round=cat("round", empty(0, dtype=torch.long)),
        step=cat("step", empty(0, dtype=torch.long)),
        leaves=torch.stack(leaves) if leaves else empty(0, *shape),
        leaf_row=torch.tensor(leaf_rows, dtype=torch.long, device=device),
        leaf_group=group_ids([nodes[n].leaf_group for n in leaf_nodes]).to(device),
        leaf_node=torch.tensor(leaf_nodes, dtype=torch.long, device=device),
        node_leaves=below.to(device), node_group=group_ids([n.node_group for n in nodes]).to(device),
        node_depth=torch.tensor([n.depth for n in nodes], device=device), nfe=nfe, schedule=schedule)


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout from rollouts of disjoint plans (e.g. prompts sampled part by part), as one ``run_plan`` of all
    their roots would store it: transitions round by round (parts in order within a round), leaves and nodes part
    after part, node indices and groups renumbered so no two parts share one."""
    if len(parts) == 1:
        return parts[0]
    node_offsets, leaf_offsets, group_offsets, node_group_offsets = [0], [0], [0], [0]
    for r in parts[:-1]:
        node_offsets.append(node_offsets[-1] + r.node_leaves.shape[0])
        leaf_offsets.append(leaf_offsets[-1] + r.leaves.shape[0])
        group_offsets.append(group_offsets[-1] + (int(r.leaf_group.max()) + 1 if r.leaf_group.numel() else 0))
        node_group_offsets.append(node_group_offsets[-1] + (int(r.node_group.max()) + 1 if r.node_group.numel() else 0))
    rounds = torch.cat([r.round for r in parts])
    order = torch.sort(rounds, stable=True).indices  # round by round, parts in order within a round: as one plan
    cat = lambda key: torch.cat([getattr(r, key) for r in parts])  # noqa: E731
    step = lambda key: cat(key)[order]  # noqa: E731
    below = torch.zeros(node_offsets[-1] + parts[-1].node_leaves.shape[0],
                        leaf_offsets[-1] + parts[-1].leaves.shape[0], dtype=torch.bool, device=parts[0].leaves.device)
    for r, n0, l0 in zip(parts, node_offsets, leaf_offsets):
        below[n0:n0 + r.node_leaves.shape[0], l0:l0 + r.leaves.shape[0]] = r.node_leaves
    return Rollout(
        x=step("x"), x_next=step("x_next"), sigma=step("sigma"), sigma_next=step("sigma_next"), scale=step("scale"),
        logp=step("logp"), mean=step("mean"), row=step("row"),
        owner=torch.cat([r.owner + n0 for r, n0 in zip(parts, node_offsets)])[order], round=rounds[order],
        step=step("step"), leaves=cat("leaves"), leaf_row=cat("leaf_row"),
        leaf_group=torch.cat([r.leaf_group + g0 for r, g0 in zip(parts, group_offsets)]),
        leaf_node=torch.cat([r.leaf_node + n0 for r, n0 in zip(parts, node_offsets)]),
        node_leaves=below, node_group=torch.cat([r.node_group + g0 for r, g0 in zip(parts, node_group_offsets)]),
        node_depth=cat("node_depth"), nfe=sum(r.nfe for r in parts), schedule=parts[0].schedule)
