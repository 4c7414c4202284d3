"""The GRPO family's trainer: SDE rollouts, group advantages, the clipped-ratio update.

One iteration: prompts -> rollout (the method's plan on the rollout engine) -> decode and score ->
gather -> group advantages -> the method's credit per stored transition -> clipped-ratio loss (+ the
modifiers' terms) -> ``updates_per_iteration`` optimizer steps. Each trajectory's noise is keyed by its
global index, so it is the same however trajectories are spread over processes.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from accelerate.utils import DistributedType

from ..algorithms.grpo.loss import clipped_policy_loss
from ..errors import FlowalignError
from ..samplers.kernels import step
from ..samplers.rollout import Node, Rollout, concat_rollouts, flatten_plan, group_ids, run_plan
from ..seeds import derive_seed
from .batch import IterationBatch
from .lora import adapters_disabled
from .trainer import NonFiniteLoss, Trainer


class PolicyGradientTrainer(Trainer):
    """Runs a ``PolicyGradientMethod``: its plan, credit, step weights and clip bound, and its modifiers' hooks."""

    def __init__(self, cfg, accelerator=None):
        super().__init__(cfg, accelerator)
        schedule = self.method.noise_schedule()
        for modifier in self.modifiers:
            schedule = modifier.noise_schedule(schedule)
        self.schedule = schedule

    # ------------------------------------------------------------------ sampling

    def rollout(self, iteration: int) -> IterationBatch:
        """Sample this process's share of the iteration with the current policy (no graph). With
        ``reward.overlap_prompts`` the share is sampled a few prompts at a time, each part decoded and sent to the
        reward while the next one samples (the batch comes back scored)."""
        prompts, meta = self.prompts(iteration)
        cond = self.encode(prompts, meta)
        sigmas = self.gen.sigmas(self.t.steps)

        def velocity(x, sigma, rows):
            return self.gen.velocity(x, sigma, cond.select(rows), guidance=self.t.guidance)

        sample = self._shared_trunks if self.method.shares_trunks else self._independent
        per_prompt = 1 if self.method.shares_trunks else self.method.options.group_size
        mine = sorted({s // per_prompt for s in self.local_samples(per_prompt)})  # prompts this process samples
        scorer = self.overlapped_scoring(prompts, meta, iteration)
        results = []
        with torch.no_grad():
            for part in self.sampling_parts(mine):
                rollout, ids, groups = sample(sigmas, iteration, velocity, part)
                results.append((rollout, ids, groups))
                if scorer is not None:
                    scorer.submit(rollout.leaves, rollout.leaf_row, groups)
        rollout = concat_rollouts([r for r, _, _ in results])
        ids, groups = torch.cat([i for _, i, _ in results]), torch.cat([g for _, _, g in results])
        batch = IterationBatch(iteration, prompts, meta, cond, rollout.leaves, rollout.leaf_row, ids, groups,
                               rollout.nfe, rollout=rollout)
        if scorer is not None:
            scorer.finish(batch)
        return batch

    def _shared_trunks(self, sigmas, iteration, velocity, prompts: list[int]
                       ) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """One root per prompt of ``prompts`` (whole prompts per process: a trunk and its branches stay together).
        Leaf ids and groups are numbered over the whole plan, and every step's noise is keyed by its node in the
        whole plan, so nothing depends on how prompts are spread over processes."""
        t = self.t
        roots, rows = self.method.plan(sigmas, iteration, None)
        nodes = flatten_plan(roots)
        node_key = {id(n): i for i, n in enumerate(nodes)}
        leaves = [n for n in nodes if not n.children]
        leaf_key = {id(n): i for i, n in enumerate(leaves)}
        leaf_group = group_ids([n.leaf_group for n in leaves])
        local_roots = [roots[p] for p in prompts]
        rollout = run_plan(velocity, local_roots, rows[prompts].to(self.gen.device),
                           self.initial_states(iteration, prompts, sigmas[0]), self.schedule,
                           max_batch=t.rollout_batch, noise_fn=self._keyed_noise(iteration, lambda n: node_key[id(n)]))
        local_nodes = flatten_plan(local_roots)
        ids = torch.tensor([leaf_key[id(local_nodes[i])] for i in rollout.leaf_node.tolist()])
        return rollout, ids.to(self.gen.device), leaf_group[ids].to(self.gen.device)

    def _independent(self, sigmas, iteration, velocity, prompts: list[int]
                     ) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """This process's trajectories of ``prompts``: leaf ids are global trajectory indices (trajectory t belongs
        to prompt t // group_size), each trajectory's noise keyed by its index."""
        t, gen, group = self.t, self.gen, self.method.options.group_size
        tail = None
        for modifier in self.modifiers:  # e.g. Flash: run to the window's end, finish with a solver
            sigmas, tail = modifier.rollout_grid(sigmas, tail, self.method.sde_window(iteration))
        wanted = set(prompts)
        select = [s for s in self.local_samples(group) if s // group in wanted]
        roots, rows = self.method.plan(sigmas, iteration, select)
        share = self.method.shares_initial_noise  # a group starts from its first trajectory's noise
        x0 = self.initial_states(iteration, (rows * group).tolist() if share else select, sigmas[0])
        key = _trajectory_keys(roots, select, share)
        rollout = run_plan(velocity, roots, rows.to(gen.device), x0, self.schedule, max_batch=t.rollout_batch,
                           noise_fn=self._keyed_noise(iteration, lambda node: key[id(node)]))
        for modifier in self.modifiers:
            rollout = modifier.finish_rollout(rollout, tail, velocity, t.rollout_batch)
        nodes = flatten_plan(roots)
        ids = torch.tensor([key[id(nodes[i])] for i in rollout.leaf_node.tolist()], device=gen.device)
        return rollout, ids, ids // group

    def _keyed_noise(self, iteration: int, key_of: Callable[[Node], int]) -> Callable:
        """``noise_fn`` for ``run_plan``: the noise of step k of a node is drawn from a generator seeded by
        (seed, iteration, ``key_of(node)``, k), so a process draws only the noise of its own steps, whatever the
        batching; ODE steps (scale 0) get zeros without drawing."""
        seed, shape = self.t.seed, self.gen.latent_shape

        def noise_fn(targets):
            noise = torch.zeros((len(targets), *shape))
            for i, (node, k) in enumerate(targets):
                if node.steps[k].scale > 0:
                    noise[i] = torch.randn(shape, generator=torch.Generator().manual_seed(
                        derive_seed(seed, iteration, 13, key_of(node), k)))
            return noise
        return noise_fn

    # ------------------------------------------------------------------ advantages

    def advantages(self, batch: IterationBatch) -> None:
        """Gather every process's rewards, let the method turn them into advantages, take this process's share
        back, and credit the stored transitions. Samples with a NaN reward (skipped) get advantage 0."""
        all_rewards, position = self.gathered(batch.rewards, batch)
        groups, _ = self.gathered(batch.leaf_groups, batch)
        valid = torch.isfinite(all_rewards)
        adv = torch.zeros_like(all_rewards)
        if bool(valid.any()):
            parts = {k: self.gathered(v, batch)[0][valid] for k, v in batch.reward_parts.items()} \
                if self.cfg.reward.aggregate != "reward" else None
            if self.balance is not None:  # MARBLE: each reward's own advantages, combined in ``update``
                per_reward = {k: torch.zeros_like(all_rewards).index_put((valid,), self.method.leaf_advantages(
                    p, groups[valid])) for k, p in parts.items()}
                batch.extras["marble"] = {k: a[position] for k, a in per_reward.items()}
                adv = sum(c * per_reward[k] for k, c in self.balance.coefficients().items())
            else:
                adv[valid] = self.method.leaf_advantages(all_rewards[valid], groups[valid], parts,
                                                         self.reward.weights)
        for modifier in self.modifiers:  # e.g. GARDO: diversity-aware advantages
            shaped = modifier.leaf_advantages(self, batch, all_rewards, groups, valid)
            adv = adv if shaped is None else shaped
        batch.all_rewards, batch.leaf_advantages = all_rewards, adv[position]
        batch.advantages = self.method.credit(batch.rollout, batch.leaf_advantages, batch.rewards)

    # ------------------------------------------------------------------ the update

    def update(self, batch: IterationBatch) -> dict[str, float]:
        """The clipped-ratio updates over the stored transitions (``updates_per_iteration`` optimizer steps)."""
        o, t, rollout = self.method.options, self.t, batch.rollout
        for modifier in self.modifiers:
            modifier.prepare(self, batch)
        stats: dict[str, list[torch.Tensor]] = {}
        old_logp = rollout.logp if o.old_logp == "rollout" else self.recompute_logp(batch)
        balance = self._balance(batch, old_logp) if self.balance is not None else {}
        trained = self.method.trained(rollout, batch.advantages, batch.iteration)
        signal = (batch.advantages != 0).cpu() if o.drop_zero_advantage else None
        kept = _all_of(trained, signal)
        counts = _left_out(trained, signal)
        if kept is not None and not int(self.acc.reduce(kept.sum().to(self.acc.device), "sum")):
            return counts  # nothing left to train anywhere: no update
        for epoch in range(o.inner_epochs):
            order = torch.arange(rollout.num_transitions)
            if o.shuffle:
                order = torch.randperm(rollout.num_transitions, generator=torch.Generator().manual_seed(
                    derive_seed(t.seed, batch.iteration, epoch, self.acc.process_index)))
            if kept is not None:
                order = order[kept[order]]
            order = self.method.update_order(order, batch.advantages.cpu(), torch.Generator().manual_seed(
                derive_seed(t.seed, batch.iteration, epoch, self.acc.process_index, 17)))
            # dropping: exactly updates_per_iteration parts on every process (some may be empty)
            parts = order.chunk(t.updates_per_iteration) if kept is None and not self.method.reorders else \
                torch.tensor_split(order, t.updates_per_iteration)
            for chunk in parts:
                self._accumulate(batch, chunk, old_logp, stats)
                grad_norm = self.optimizer_step()
                for modifier in self.modifiers:
                    modifier.optimizer_stepped(self)
                if grad_norm is not None:
                    stats.setdefault("grad_norm", []).append(grad_norm)
        return {**{k: torch.stack(v).float().mean().item() for k, v in stats.items()}, **counts, **balance}

    def _balance(self, batch: IterationBatch, old_logp: torch.Tensor) -> dict[str, float]:
        """MARBLE: refresh the rewards' weights from their gradients when due, then train on the combined
        advantage (``marble.py``); returns the weights, logged."""
        per_leaf = batch.extras["marble"]
        if self.balance.due(batch.iteration):
            self.balance.update({k: self._full_gradient(batch, old_logp, self.method.credit(
                batch.rollout, a, batch.rewards)) for k, a in per_leaf.items()})
        c = self.balance.coefficients()
        batch.leaf_advantages = sum(c[k] * a for k, a in per_leaf.items())
        batch.advantages = self.method.credit(batch.rollout, batch.leaf_advantages, batch.rewards)
        return self.balance_log()

    def _full_gradient(self, batch: IterationBatch, old_logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """The policy loss's gradient (flat) over every process's transitions with ``advantages``; no update."""
        n, size, device = batch.rollout.num_transitions, self.t.train_batch, batch.rollout.x.device
        chunks = (torch.arange(start, min(start + size, n), device=device) for start in range(0, n, size))
        return self.mean_gradient((self._policy_loss(batch, idx, old_logp[idx], advantages[idx])[0] * len(idx)
                                   for idx in chunks), n)

    def _accumulate(self, batch: IterationBatch, chunk: torch.Tensor, old_logp: torch.Tensor,
                    stats: dict[str, list[torch.Tensor]]) -> None:
        """Gradients of one optimizer update, ``train_batch`` transitions per forward (synced on the last)."""
        if not len(chunk):  # every transition of this update was dropped: a zero gradient keeps processes in step
            self.acc.backward(sum(p.sum() for p in self.params) * 0.0)
            return
        starts = list(range(0, len(chunk), self.t.train_batch))
        if len(starts) > 1 and self.acc.distributed_type == DistributedType.DEEPSPEED:
            raise FlowalignError(f"under DeepSpeed one optimizer update must be one minibatch: set "
                                 f"train.train_batch >= {len(chunk)} (or raise train.updates_per_iteration)")
        for start in starts:
            idx = chunk[start:start + self.t.train_batch].to(batch.rollout.x.device)
            sync = start == starts[-1]
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.gen.wrapped_module):
                loss, parts = self.loss(batch, idx, old_logp[idx])
                if not torch.isfinite(loss.detach()).item():
                    raise NonFiniteLoss(f"loss is {loss.item()} at iteration {batch.iteration}")
                if loss.requires_grad:  # False: only steps of an untrained Wan 2.2 expert here
                    self.acc.backward(loss * len(idx) / len(chunk))
            for k, v in parts.items():
                stats.setdefault(k, []).append(v.detach())

    def loss(self, batch: IterationBatch, idx: torch.Tensor, old_logp: torch.Tensor):
        """The method's clipped-ratio loss on transitions ``idx`` plus the modifiers' terms, and its statistics."""
        loss, stats, v, out = self._policy_loss(batch, idx, old_logp, batch.advantages[idx])
        for modifier in self.modifiers:
            term = modifier.loss_term(self, batch, idx, v, out)
            if term is not None:
                loss = loss + term[0]
                stats.update(term[1])
        stats["policy_loss"] = loss.detach()
        return loss, stats

    def _policy_loss(self, batch: IterationBatch, idx: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor):
        """The clipped-ratio loss alone on transitions ``idx`` with advantages ``adv``: (loss, stats, v, step)."""
        rollout = batch.rollout
        v = self.velocity(batch, idx)
        out = step(v, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx], schedule=self.schedule,
                   prev_sample=rollout.x_next[idx], noise_scale=rollout.scale[idx])
        shaped = [r for m in self.modifiers if (r := m.log_ratio(out, old_logp, rollout, idx)) is not None]
        log_ratio, divisor = shaped[0] if shaped else (None, 1.0)
        weights = self.method.step_weights(out.std)
        if torch.is_tensor(divisor) and divisor.ndim:  # a divisor per sample (GRPO-Guard): a weight of 1/divisor
            weights, divisor = (1 / divisor if weights is None else weights / divisor), 1.0
        loss, stats = clipped_policy_loss(out.logp, old_logp, adv, self.method.clip_bound(adv),
                                          self.method.options.adv_clip, weights=weights, log_ratio=log_ratio)
        return loss / divisor, stats, v, out

    def velocity(self, batch: IterationBatch, idx: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """The policy's velocity at stored transitions (guided when ``train.cfg``); ``reference``: LoRA off."""
        cond = batch.cond.select(batch.rollout.row[idx])
        guidance = self.t.guidance if self.t.cfg else 1.0
        x, sigma = batch.rollout.x[idx], batch.rollout.sigma[idx]
        if not reference:
            return self.gen.velocity(x, sigma, cond, guidance=guidance)
        with torch.no_grad(), adapters_disabled(self.gen.trainable_module, self.lora):
            return self.gen.velocity(x, sigma, cond, guidance=guidance)

    @torch.no_grad()
    def recompute_logp(self, batch: IterationBatch) -> torch.Tensor:
        """Old log-probs under the current policy, in the training batches (exactly on-policy at the first step)."""
        rollout, out = batch.rollout, []
        for start in range(0, rollout.num_transitions, self.t.train_batch):
            idx = torch.arange(start, min(start + self.t.train_batch, rollout.num_transitions), device=rollout.x.device)
            out.append(step(self.velocity(batch, idx), rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx],
                            schedule=self.schedule, prev_sample=rollout.x_next[idx],
                            noise_scale=rollout.scale[idx]).logp)
        return torch.cat(out)

    def run_iteration(self, iteration: int) -> tuple[dict[str, float], IterationBatch]:
        start = time.perf_counter()
        batch = self.rollout(iteration)
        sampled = time.perf_counter()
        if batch.rewards is None:  # not scored while sampling
            self.score(batch)
        scored = time.perf_counter()
        self.advantages(batch)
        stats = self.update(batch)
        times = {"time/sampling": sampled - start, "time/reward": scored - sampled,
                 "time/training": time.perf_counter() - scored}
        return {**self.reward_metrics(batch), **stats, **times}, batch


def _trajectory_keys(roots, select: list[int], shared: bool) -> dict[int, int]:
    """Node -> global trajectory index (the key of its noise); shared-prefix roots map to 0 (ODE steps)."""
    if not shared:
        return {id(root): t for root, t in zip(roots, select)}
    keys, kids = {}, iter(select)
    for root in roots:
        for child in root.children:
            keys[id(child)] = next(kids)
    return keys


def _all_of(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """The transitions every given mask keeps (None: no mask given)."""
    given = [m for m in masks if m is not None]
    return None if not given else torch.stack(given).all(0)


def _left_out(trained: torch.Tensor | None, signal: torch.Tensor | None) -> dict[str, float]:
    """The logged counts: transitions the method prunes, and (of the rest) those dropped for a zero advantage."""
    counts = {} if trained is None else {"pruned_transitions": float((~trained).sum())}
    if signal is not None:
        counts["dropped_zero_advantage"] = float((~signal & (trained if trained is not None else True)).sum())
    return counts
