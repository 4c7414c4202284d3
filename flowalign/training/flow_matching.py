"""The forward-process family's trainer (AC-Flow, ORW-CFM-W2, DRAGON, ...): on-policy ODE samples, scored,
then the method's flow-matching objective at fresh noise levels. No SDE log-probs are needed."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from ..samplers.ode import dpm_solver_pp, euler_ode
from ..samplers.stochastic_adams import awm_grid, sa_solver
from ..seeds import derive_seed
from .batch import IterationBatch
from .lora import adapters_disabled
from .trainer import Trainer


class FlowMatchingTrainer(Trainer):
    """Runs a ``FlowMatchingMethod``: samples and scores here, ``method.update`` trains."""

    def sample(self, iteration: int) -> IterationBatch:
        """This process's share of ``prompts_per_iteration × group_size`` ODE samples (CFG as configured); with
        ``reward.overlap_prompts`` each part of the prompts is scored while the next one samples."""
        t, gen = self.t, self.gen
        prompts, meta = self.prompts(iteration)
        cond = self.encode(prompts, meta)
        group = self.method.samples_per_prompt
        select = torch.tensor(self.local_samples(group))
        sigmas = gen.sigmas(t.steps)
        scorer = self.overlapped_scoring(prompts, meta, iteration)
        latents = []
        with torch.no_grad(), self.method.sampling_weights(self):
            for part in self.sampling_parts(sorted(set((select // group).tolist()))):
                chosen = select[torch.isin(select // group, torch.tensor(part))]
                done = len(latents)
                for chunk in chosen.split(t.rollout_batch):
                    c = cond.select(chunk // group)
                    latents.append(self.solve(lambda x, s: gen.velocity(x, s, c, t.guidance),
                                              self.initial_states(iteration, chunk.tolist(), sigmas[0]), sigmas,
                                              iteration, chunk.tolist()))
                if scorer is not None:
                    rows = (chosen // group).to(gen.device)
                    scorer.submit(torch.cat(latents[done:]).float(), rows, rows)
        rows = (select // group).to(gen.device)
        batch = IterationBatch(iteration, prompts, meta, cond, torch.cat(latents).float(), rows,
                               select.to(gen.device), rows, nfe=t.steps * len(select))
        if scorer is not None:
            scorer.finish(batch)
        return batch

    def solve(self, velocity: Callable, x: torch.Tensor, sigmas: torch.Tensor, iteration: int,
              keys: list[int]) -> torch.Tensor:
        """The samples ``keys`` (global ids) from their start ``x`` with the method's ``solver``; SA-Solver runs on
        AWM's code's grid, each sample's step noise from a generator seeded by (seed, iteration, its id), so it
        does not depend on the batch or the process count."""
        options = self.method.options
        if options.solver == "sa_solver":
            noise = [torch.Generator().manual_seed(derive_seed(self.t.seed, iteration, 23, k)) for k in keys]
            return sa_solver(velocity, x, awm_grid(sigmas), noise, options.sa_tau)
        return (dpm_solver_pp if options.solver == "dpm_solver" else euler_ode)(velocity, x, sigmas)

    def flow_points(self, batch: IterationBatch, draws: int, sample_index: torch.Tensor | None = None,
                    salt: int = 0) -> dict[str, torch.Tensor]:
        """``draws`` noise levels and noises per sample: ``x_σ = (1-σ)·x0 + σ·ε`` and the target ``u = ε - x0``,
        laid out draw-major (point ``d·n + i`` is draw d of sample i). Each sample's draws are seeded by (seed,
        iteration, its global id), so they do not depend on how samples are spread over processes, and a resumed
        run draws the same points."""
        x0 = batch.leaves if sample_index is None else batch.leaves[sample_index]
        ids = batch.leaf_ids if sample_index is None else batch.leaf_ids[sample_index]
        n, sigmas, noises = x0.shape[0], [], []
        grid = self.gen.sigmas(self.t.steps)[:-1].float().cpu()
        for sample in ids.tolist():  # a few samples per process: one small generator each
            g = torch.Generator().manual_seed(derive_seed(self.t.seed, batch.iteration, 7, salt, sample))
            sigmas.append(self.method.noise_levels(grid, draws, g))
            noises.append(torch.randn((draws, *x0.shape[1:]), generator=g))
        sigma = torch.stack(sigmas, dim=1).flatten().to(x0.device)          # [draws * n], draw-major
        eps = torch.stack(noises, dim=1).flatten(0, 1).to(x0.device)
        owner = torch.arange(n, device=x0.device).repeat(draws)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return {"x": (1 - s) * x0[owner] + s * eps, "sigma": sigma, "target": eps - x0[owner], "owner": owner}

    def policy_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond, reference: bool = False,
                        guidance: float | None = None) -> torch.Tensor:
        """The velocity the samples come from: CFG-guided when ``train.cfg`` (both branches carry the LoRA), so
        fitting on-policy samples does not compound the guidance; ``reference``: LoRA off, no graph; ``guidance``
        overrides the CFG scale (DGPO's base with CFG as its reference)."""
        if guidance is None:
            guidance = self.t.guidance if self.t.cfg else 1.0
        if not reference:
            return self.gen.velocity(x, sigma, cond, guidance=guidance)
        with torch.no_grad(), adapters_disabled(self.gen.trainable_module, self.lora):
            return self.gen.velocity(x, sigma, cond, guidance=guidance)

    def train_on_points(self, batch: IterationBatch, points: dict[str, torch.Tensor],
                        minibatch_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
                        after_step: Callable[[int], None] | None = None) -> dict[str, float]:
        """``updates_per_iteration`` optimizer steps over the points (shuffled, seeded by the iteration),
        ``train_batch`` at a time: ``minibatch_loss(idx, v)`` gives the loss of points ``idx`` from the policy's
        velocity ``v`` there, and the statistics to log; ``after_step(u)`` runs after optimizer step u."""
        owner, stats = points["owner"], {}
        rng = torch.Generator().manual_seed(derive_seed(self.t.seed, batch.iteration, 13))
        for u, chunk in enumerate(torch.randperm(len(owner), generator=rng).chunk(self.t.updates_per_iteration)):
            for start in range(0, len(chunk), self.t.train_batch):
                idx = chunk[start:start + self.t.train_batch].to(owner.device)
                cond = batch.cond.select(batch.leaf_row[owner[idx]])
                v = self.policy_velocity(points["x"][idx], points["sigma"][idx], cond).float()
                loss, parts = minibatch_loss(idx, v)
                self.backward(loss * len(idx) / len(chunk))
                for k, value in parts.items():
                    stats.setdefault(k, []).append(value.detach())
            grad_norm = self.optimizer_step()
            if grad_norm is not None:
                stats.setdefault("grad_norm", []).append(grad_norm)
            if after_step is not None:
                after_step(u)
        return {k: torch.stack(v).float().mean().item() for k, v in stats.items()}

    def balanced(self, batch: IterationBatch, points: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor],
                 loss_with: Callable[[torch.Tensor], Callable], normalise: bool = False) -> torch.Tensor:
        """MARBLE (``reward.aggregate: marble``) on a loss linear in each sample's ``per_reward`` weights: the
        balance refreshed from each reward's gradient (``loss_with(weights)`` gives its minibatch loss) when due,
        and the combined weights ``Σ_k c_k·w_k`` (divided by ``Σ_k c_k`` where the loss is affine in weights that
        must stay a convex combination, ``normalise``)."""
        if self.balance.due(batch.iteration):
            self.balance.update({k: self.full_gradient(batch, points, loss_with(w)) for k, w in per_reward.items()})
        c = self.balance.coefficients()
        combined = sum(c[k] * w for k, w in per_reward.items())
        return combined / sum(c.values()) if normalise else combined

    def full_gradient(self, batch: IterationBatch, points: dict[str, torch.Tensor],
                      minibatch_loss: Callable[[torch.Tensor, torch.Tensor], tuple]) -> torch.Tensor:
        """The mean over every process's points of ``minibatch_loss``'s gradient (flat); no update."""
        owner = points["owner"]

        def summed(idx: torch.Tensor) -> torch.Tensor:
            cond = batch.cond.select(batch.leaf_row[owner[idx]])
            v = self.policy_velocity(points["x"][idx], points["sigma"][idx], cond).float()
            return minibatch_loss(idx, v)[0] * len(idx)

        chunks = torch.arange(len(owner), device=owner.device).split(self.t.train_batch)
        return self.mean_gradient((summed(idx) for idx in chunks), len(owner))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, unless nothing in ``loss`` is trained (every point in an untrained Wan 2.2 expert's range)."""
        if loss.requires_grad:
            self.acc.backward(loss)

    def point_velocities(self, batch: IterationBatch, points: dict[str, torch.Tensor],
                         weights: contextlib.AbstractContextManager | None = None,
                         reference: bool = False, guidance: float | None = None) -> torch.Tensor:
        """Every point's velocity without a graph, ``train_batch`` at a time, under ``weights`` (a swapped-in
        copy) or with the LoRA off (``reference``), at CFG scale ``guidance`` (None: the policy's): the fixed
        targets of a forward-process loss."""
        out = []
        with torch.no_grad(), weights if weights is not None else contextlib.nullcontext():
            for idx in torch.arange(len(points["sigma"]), device=points["sigma"].device).split(self.t.train_batch):
                cond = batch.cond.select(batch.leaf_row[points["owner"][idx]])
                out.append(self.policy_velocity(points["x"][idx], points["sigma"][idx], cond, reference,
                                                guidance).float())
        return torch.cat(out)

    def run_iteration(self, iteration: int) -> tuple[dict[str, float], IterationBatch]:
        start = time.perf_counter()
        batch = self.sample(iteration)
        sampled = time.perf_counter()
        metrics = {"nfe": float(batch.nfe * self.acc.num_processes)}
        if self.method.scores_pointwise:
            if batch.rewards is None:  # not scored while sampling
                self.score(batch)
            batch.all_rewards, _ = self.gathered(batch.rewards, batch)
            metrics = self.reward_metrics(batch)
        else:  # the method scores sets of samples itself
            self.decode(batch)
        scored = time.perf_counter()
        stats = self.method.update(self, batch)
        return {**metrics, **stats, "time/sampling": sampled - start, "time/reward": scored - sampled,
                "time/training": time.perf_counter() - scored}, batch
