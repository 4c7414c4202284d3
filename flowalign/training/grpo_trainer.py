"""The GRPO training loop on accelerate (Flow-GRPO, DanceGRPO and their options; grpo_family.md §1, §2).

One iteration: prompts -> rollout (samplers) -> decode -> rewards -> gather -> group advantages ->
clipped-ratio loss over the stored transitions (+ KL to the LoRA-off base) -> optimizer updates.
Every random draw derives from (seed, iteration), so a resumed run repeats the uninterrupted one bit
for bit, and each trajectory's noise is the same however the trajectories are spread over processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from .. import rewards as reward_lib
from ..algorithms.grpo.advantages import aggregated_advantages, group_advantages, node_advantages, transition_advantages
from ..algorithms.grpo.layer_tuning import best_path_weights, layer_tuning_loss, velocity_targets
from ..algorithms.grpo.loss import clipped_policy_loss, guard_log_ratio, reward_conditioned_clip
from ..algorithms.grpo.recipes import STRUCTURED, flash_split, noise_schedule, rollout_plan, structured_plan
from ..config import ConfigError, RunConfig
from ..errors import FlowalignError
from ..generators import load_generator
from ..generators.memory import place_text_encoders
from ..samplers.kernels import kl_to_reference, step, step_mean
from ..samplers.ode import dpm_solver_pp
from ..samplers.rollout import Rollout, flatten_plan, run_plan
from . import checkpoint as ckpt
from .lora import adapters_disabled, add_lora, load_trainable_state, save_lora_diffusers, trainable_state
from .prompts import iteration_prompts, local_trajectories, read_prompt_file


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2 ** 63)
    return value


class GRPOTrainer:
    """Holds the generator (policy = base + LoRA), the reward, the optimizer and the loop's state."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator

        t = cfg.train
        if not t.cfg and t.guidance != 1.0:
            raise ConfigError("train.cfg=false trains the conditional velocity: it needs train.guidance=1")
        self.cfg, self.t = cfg, t
        self.out = Path(cfg.output_dir)
        precision = {"mixed_precision": t.mixed_precision} if t.mixed_precision else {}
        self.acc = accelerator or Accelerator(log_with="tensorboard", project_dir=str(self.out), **precision)
        self.gen = load_generator(cfg.model.name, cfg.model.dtype, device=str(self.acc.device),
                                  local_files_only=cfg.model.local_files_only, **cfg.model.options)
        self.prompt_cache = place_text_encoders(self.gen, t.text_encoders, t.cache_prompts, t.prompt_embeds)
        self.reward = reward_lib.load_weighted(cfg.reward.weights, cfg.reward.normalize,
                                               **cfg.reward.options).to(self.acc.device)
        self.reward.requires_grad_(False)  # frozen: kept out of accelerate's prepare
        if t.layer_tuning > 0 and self.acc.num_processes > 1:
            raise ConfigError("train.layer_tuning needs each group's best path on one process: run it on one process")
        if t.flash and not (t.algorithm == "mix_grpo" or t.window_size):
            raise ConfigError("train.flash finishes trajectories after the SDE window: it needs "
                              "train.algorithm=mix_grpo or train.window_size > 0")
        if t.algorithm in STRUCTURED and self.acc.num_processes > 1:
            raise ConfigError(f"train.algorithm={t.algorithm}: trunk-sharing rollouts run on one process for now")
        pairwise = [n for n, r in self.reward.parts.items() if isinstance(r, reward_lib.PairwiseReward)]
        if pairwise and self.acc.num_processes > 1:
            raise ConfigError(f"reward {pairwise[0]} is pairwise: it judges whole groups, which span processes; "
                              "run it on one process (multi-process pairwise judging is not supported yet)")
        self.file_prompts = read_prompt_file(t.prompt_file) if t.prompt_file else None
        self.schedule = noise_schedule(t)
        self.lora = t.lora_rank > 0
        module = self.gen.trainable_module
        if self.lora:
            with torch.random.fork_rng(devices=[]):  # the LoRA init depends on the seed only
                torch.manual_seed(t.seed)
                add_lora(module, t.lora_rank, t.lora_alpha, self.gen.lora_target_modules)
        else:
            module.requires_grad_(True).float()
        if t.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        module.train()
        self.params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(0.9, 0.999), weight_decay=t.weight_decay)
        self.gen.wrapped_module, self.optimizer = self.acc.prepare(module, optimizer)
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.params, decay=t.ema_decay)
        self.iteration, self.history = 0, []
        self._tuning: tuple[torch.Tensor, torch.Tensor] | None = None  # LayerTuning-RL weights, targets
        if self.acc.is_main_process:
            self.acc.init_trackers("grpo")

    # ------------------------------------------------------------------ one iteration

    def rollout(self, iteration: int) -> tuple[Rollout, list[str], list[dict], torch.Tensor, torch.Tensor]:
        """Sample this process's share; returns the rollout, the prompts and metadata, each leaf's group, and
        each leaf's id (global trajectory index; the leaf index for trunk-sharing plans)."""
        t, gen = self.t, self.gen
        prompts, meta = iteration_prompts(t, iteration, self.file_prompts, getattr(gen, "toy_world", "digits"))
        cond = gen.encode(prompts, negative_prompt=self.cfg.sample.negative_prompt if t.guidance != 1.0 else None)
        sigmas = gen.sigmas(t.steps)
        self._cond = cond

        def velocity(x, sigma, r):
            return gen.velocity(x, sigma, cond.select(r), guidance=t.guidance)

        if t.algorithm in STRUCTURED:  # one root per prompt; groups come from the plan (one process)
            roots, rows = structured_plan(t, sigmas, iteration)
            shared = torch.Generator().manual_seed(_seed(t.seed, iteration))
            with torch.no_grad():
                x0 = gen.initial_state(gen.initial_noise(len(roots), shared), sigmas[0])
                rollout = run_plan(velocity, roots, rows.to(gen.device), x0,
                                   self.schedule, shared, max_batch=t.rollout_batch)
            return rollout, prompts, meta, rollout.leaf_group, torch.arange(rollout.leaves.shape[0],
                                                                             device=gen.device)
        tail = None
        if t.flash:  # MixGRPO-Flash: plan up to the window's end, finish with DPM-Solver++ below
            sigmas, tail = flash_split(t, sigmas, iteration)
        select = local_trajectories(t, self.acc.process_index, self.acc.num_processes)
        roots, rows = rollout_plan(t, sigmas, iteration, select)
        total = t.prompts_per_iteration * t.group_size
        shared = torch.Generator().manual_seed(_seed(t.seed, iteration))  # identical on every process
        all_noise = gen.initial_state(gen.initial_noise(total, shared), sigmas[0])
        x0 = all_noise[torch.tensor(select)] if not t.share_noise else all_noise[rows * t.group_size]
        key = _trajectory_keys(roots, select, t.share_noise)

        def noise_fn(nodes):
            round_noise = torch.randn((total, *gen.latent_shape), generator=shared)
            return round_noise[torch.tensor([key.get(id(n), 0) for n in nodes])]

        with torch.no_grad():
            rollout = run_plan(velocity, roots, rows.to(gen.device), x0, self.schedule, max_batch=t.rollout_batch,
                               noise_fn=noise_fn)
            if tail is not None:
                rollout = self._finish_with_solver(rollout, tail, velocity)
        nodes = flatten_plan(roots)
        leaf_ids = torch.tensor([key[id(nodes[i])] for i in rollout.leaf_node.tolist()], device=gen.device)
        return rollout, prompts, meta, leaf_ids // t.group_size, leaf_ids

    def _finish_with_solver(self, rollout: Rollout, tail: torch.Tensor, velocity) -> Rollout:
        """MixGRPO-Flash: integrate the leaves from the window's end to σ = 0 with DPM-Solver++ (NFEs counted)."""
        finished = []
        for start in range(0, rollout.leaves.shape[0], self.t.rollout_batch):
            rows = rollout.leaf_row[start:start + self.t.rollout_batch]
            finished.append(dpm_solver_pp(lambda x, sigma: velocity(x, sigma, rows),
                                          rollout.leaves[start:start + self.t.rollout_batch], tail,
                                          self.t.flash_order))
        nfe = (len(tail) - 1) * rollout.leaves.shape[0]
        return dataclasses.replace(rollout, leaves=torch.cat(finished), nfe=rollout.nfe + nfe)

    def score(self, rollout: Rollout, prompts: list[str], meta: list[dict],
              leaf_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the leaves and score them (``metadata["group"]``: the prompt group, which pairwise rewards
        judge within); a failing reward follows ``reward.on_error``."""
        media = torch.cat([self.gen.decode(rollout.leaves[i:i + self.t.rollout_batch])
                           for i in range(0, rollout.leaves.shape[0], self.t.rollout_batch)])
        self.last_media = media[:16]
        rows = rollout.leaf_row.tolist()
        groups = leaf_groups.tolist() if leaf_groups is not None else rows
        metadata = [{**meta[r], "group": g} for r, g in zip(rows, groups)]
        try:
            return self.reward.score(media, [prompts[r] for r in rows], metadata)
        except (reward_lib.RewardError, TimeoutError, OSError) as err:
            if self.cfg.reward.on_error == "stop":
                raise FlowalignError(f"reward failed at iteration {self.iteration} ({err}); "
                                     "stopping (set reward.on_error=skip to skip such samples)") from None
            print(f"flowalign: warning: reward failed at iteration {self.iteration} ({err}); "
                  "skipping these samples")
            return torch.full((media.shape[0],), float("nan"), device=media.device)

    def advantages(self, local_rewards: torch.Tensor, leaf_ids: torch.Tensor,
                   leaf_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather every process's rewards and trajectory ids, normalise per prompt group, take this
        process's share back. Samples with a NaN reward (skipped) get advantage 0."""
        t = self.t
        all_rewards = self.acc.gather(local_rewards.contiguous())
        all_ids = self.acc.gather(leaf_ids.contiguous())
        groups = leaf_ids // t.group_size if leaf_groups is None else leaf_groups
        order = torch.argsort(all_ids)
        rewards_sorted, ids_sorted = all_rewards[order], all_ids[order]
        groups_sorted = self.acc.gather(groups.contiguous())[order]
        valid = torch.isfinite(rewards_sorted)
        adv = torch.zeros_like(rewards_sorted)
        norm = dict(std=t.std, eps=t.std_eps, unbiased=t.unbiased_std)
        if bool(valid.any()) and self.cfg.reward.aggregate == "advantage":
            parts = {k: self.acc.gather(v.contiguous())[order][valid] for k, v in self.reward.last_scores.items()}
            adv[valid] = aggregated_advantages(parts, self.reward.weights, groups_sorted[valid], **norm)
        elif bool(valid.any()):
            adv[valid] = group_advantages(rewards_sorted[valid], groups_sorted[valid], **norm)
        position = torch.searchsorted(ids_sorted, leaf_ids)
        return adv[position], rewards_sorted

    def transition_advantages(self, rollout: Rollout, leaf_adv: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """Each stored transition's advantage: its leaf's (G²RPO: the sum over its strides' leaves; trees: its
        node's, from the mean reward below it, normalised per prompt and depth)."""
        t = self.t
        if t.algorithm == "tree_grpo":
            valid = torch.isfinite(rewards)
            node_adv = node_advantages(torch.where(valid, rewards, torch.zeros_like(rewards)),
                                       rollout.node_leaves & valid, rollout.node_group, std=t.std, eps=t.std_eps,
                                       unbiased=t.unbiased_std)
            return node_adv[rollout.owner]
        return transition_advantages(leaf_adv, rollout.transition_leaves, "sum" if t.algorithm == "g2rpo" else "mean")

    def train_step(self, rollout: Rollout, leaf_adv: torch.Tensor, iteration: int,
                   rewards: torch.Tensor | None = None) -> dict[str, float]:
        """The clipped-ratio updates over the stored transitions (``updates_per_iteration`` optimizer steps)."""
        t = self.t
        adv = self.transition_advantages(rollout, leaf_adv, rewards)
        self._tuning = self._layer_tuning_targets(rollout, leaf_adv, rewards) if t.layer_tuning > 0 else None
        n = rollout.num_transitions
        stats: dict[str, list[torch.Tensor]] = {}
        old_logp = rollout.logp if t.old_logp == "rollout" else self._recompute_logp(rollout)
        for epoch in range(t.inner_epochs):
            order = torch.arange(n)
            if t.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(
                    _seed(t.seed, iteration, epoch, self.acc.process_index)))
            for chunk in order.chunk(t.updates_per_iteration):
                starts = list(range(0, len(chunk), t.train_batch))
                if len(starts) > 1 and self.acc.distributed_type == DistributedType.DEEPSPEED:
                    raise FlowalignError(f"under DeepSpeed one optimizer update must be one minibatch: set "
                                         f"train.train_batch >= {len(chunk)} (or raise train.updates_per_iteration)")
                for start in starts:
                    idx = chunk[start:start + t.train_batch].to(rollout.x.device)
                    sync = start == starts[-1]
                    with contextlib.nullcontext() if sync else self.acc.no_sync(self.gen.wrapped_module):
                        loss, parts = self._loss(rollout, idx, adv[idx], old_logp[idx])
                        if not torch.isfinite(loss.detach()).item():
                            raise _NonFiniteLoss(f"loss is {loss.item()} at iteration {iteration}")
                        if loss.requires_grad:  # False: only steps of an untrained Wan 2.2 expert here
                            self.acc.backward(loss * len(idx) / len(chunk))
                    for k, v in parts.items():
                        stats.setdefault(k, []).append(v.detach())
                grad_norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm else None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.step(self.params)
                if grad_norm is not None:
                    stats.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm).detach())
        return {k: torch.stack(v).float().mean().item() for k, v in stats.items()}

    def _layer_tuning_targets(self, rollout: Rollout, leaf_adv: torch.Tensor,
                              rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerTuning-RL: per transition, its weight (0 off the groups' best paths) and the velocity target."""
        weights = best_path_weights(rewards, leaf_adv, rollout.leaf_group, rollout.transition_leaves,
                                    self.t.layer_tuning_weight)
        targets = velocity_targets(rollout.x, rollout.x_next, rollout.sigma, rollout.sigma_next, self.schedule,
                                   rollout.scale)
        return weights, targets

    def _velocity(self, rollout: Rollout, idx: torch.Tensor) -> torch.Tensor:
        cond = self._cond.select(rollout.row[idx])
        guidance = self.t.guidance if self.t.cfg else 1.0
        return self.gen.velocity(rollout.x[idx], rollout.sigma[idx], cond, guidance=guidance)

    def _loss(self, rollout: Rollout, idx, adv, old_logp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v = self._velocity(rollout, idx)
        out = step(v, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx], schedule=self.schedule,
                   prev_sample=rollout.x_next[idx], noise_scale=rollout.scale[idx])
        log_ratio, divisor = None, 1.0
        if self.t.ratio_norm:
            log_ratio, divisor = guard_log_ratio(out.logp, old_logp, out.mean, rollout.mean[idx], out.std,
                                                 rollout.sigma[idx], rollout.sigma_next[idx])
        weights = self.t.noise_weight * out.std if self.t.algorithm == "tempflow_grpo" and self.t.noise_weight else None
        clip = (reward_conditioned_clip(adv, self.t.clip_low, self.t.clip_high, self.t.clip_eta)
                if self.t.clip_dynamic else self.t.clip_range)
        loss, stats = clipped_policy_loss(out.logp, old_logp, adv, clip, self.t.adv_clip,
                                          weights=weights, log_ratio=log_ratio)
        loss = loss / divisor
        if self._tuning is not None:
            weights, targets = self._tuning
            tuning = layer_tuning_loss(v, targets[idx], weights[idx])
            loss = loss + self.t.layer_tuning * tuning
            stats["layer_tuning"] = tuning.detach()
        if self.t.beta > 0:
            with torch.no_grad(), adapters_disabled(self.gen.trainable_module, self.lora):
                v_ref = self._velocity(rollout, idx)
            ref_mean, _ = step_mean(v_ref, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx],
                                    self.schedule, rollout.scale[idx])
            kl = kl_to_reference(out.mean, ref_mean, out.std, rollout.sigma[idx], rollout.sigma_next[idx],
                                 self.t.kl_denominator).mean()
            loss = loss + self.t.beta * kl
            stats["kl"] = kl.detach()
        stats["policy_loss"] = loss.detach()
        return loss, stats

    @torch.no_grad()
    def _recompute_logp(self, rollout: Rollout) -> torch.Tensor:
        """Old log-probs under the current policy, in the training batches (exactly on-policy at the first step)."""
        out = []
        for start in range(0, rollout.num_transitions, self.t.train_batch):
            idx = torch.arange(start, min(start + self.t.train_batch, rollout.num_transitions), device=rollout.x.device)
            v = self._velocity(rollout, idx)
            out.append(step(v, rollout.x[idx], rollout.sigma[idx], rollout.sigma_next[idx], schedule=self.schedule,
                            prev_sample=rollout.x_next[idx], noise_scale=rollout.scale[idx]).logp)
        return torch.cat(out)

    def run_iteration(self, iteration: int) -> dict[str, float]:
        times = {}
        start = time.perf_counter()
        rollout, prompts, meta, leaf_groups, leaf_ids = self.rollout(iteration)
        times["time/sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        local_rewards = self.score(rollout, prompts, meta, leaf_groups)
        times["time/reward"] = time.perf_counter() - start
        start = time.perf_counter()
        leaf_adv, all_rewards = self.advantages(local_rewards, leaf_ids, leaf_groups)
        stats = self.train_step(rollout, leaf_adv, iteration, local_rewards)
        times["time/training"] = time.perf_counter() - start
        finite = all_rewards[torch.isfinite(all_rewards)]
        parts = {f"reward/{name}": self.acc.gather(s.contiguous()).mean().item()
                 for name, s in getattr(self.reward, "last_scores", {}).items()} if len(self.reward.parts) > 1 else {}
        return {**parts, "reward/mean": finite.mean().item() if finite.numel() else float("nan"),
                "reward/std": finite.std().item() if finite.numel() > 1 else 0.0,
                "nfe": float(rollout.nfe * self.acc.num_processes), **stats, **times}

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str | None = None, progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        if resume:
            self.resume(resume)
        bar = tqdm(total=self.t.iterations, initial=self.iteration, desc="grpo", disable=not (
            progress and self.acc.is_main_process))
        try:
            while self.iteration < self.t.iterations:
                metrics = self.run_iteration(self.iteration)
                self.history.append({"iteration": self.iteration, **metrics})
                self.acc.log(metrics, step=self.iteration)
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.4f}")
                if self.t.checkpoint_every and self.iteration % self.t.checkpoint_every == 0:
                    self.save_checkpoint()
                    self.log_samples()
        except KeyboardInterrupt:
            path = self.save_checkpoint()
            print(f"flowalign: interrupted; saved {path} (resume with --resume_from_checkpoint latest)")
            raise SystemExit(130) from None
        except _NonFiniteLoss as err:
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save_checkpoint()
            raise FlowalignError(f"{err}: stopped; the last good state is in {path}") from None
        finally:
            bar.close()
        return self.history

    def log_samples(self) -> None:
        """A grid of the latest rollout's samples in tensorboard (main process); video: a row of frames per clip."""
        if not self.acc.is_main_process or getattr(self, "last_media", None) is None \
                or self.gen.modality not in ("image", "video"):
            return
        from torchvision.utils import make_grid

        try:
            writer = self.acc.get_tracker("tensorboard", unwrap=True)
        except (ValueError, AttributeError):
            return
        media, nrow = self.last_media.float().cpu(), 8
        if media.ndim == 5:  # video [B,F,3,H,W]
            media, nrow = media[:8].flatten(0, 1), media.shape[1]
        writer.add_image("samples", make_grid(media, nrow=nrow), self.iteration)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the completed iterations (main process writes; everyone waits)."""
        self.acc.wait_for_everyone()
        weights = trainable_state(self.gen.trainable_module, self.lora, self._gathered_state())
        extra_weights, extra_optimizers = self._extra_state()
        path = None
        if self.acc.is_main_process:
            ema = {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)} if self.ema else None
            optimizer_state = self.optimizer.state_dict()
            if extra_optimizers:
                optimizer_state = {"policy": optimizer_state, **extra_optimizers}
            path = ckpt.save_checkpoint(self.out / "checkpoints", self.iteration, {**weights, **extra_weights},
                                        optimizer_state, {"history": self.history}, ema,
                                        self.t.checkpoints_total_limit)
        self.acc.wait_for_everyone()
        return path

    def _extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """More modules a subclass checkpoints (weights with a name prefix, optimizer states by name)."""
        return {}, {}

    def _load_extra_state(self, weights: dict[str, torch.Tensor], optimizers: dict) -> None:
        pass

    def _gathered_state(self) -> dict[str, torch.Tensor] | None:
        """The full state dict under FSDP / DeepSpeed (a collective); None where the module holds it whole."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return self.acc.get_state_dict(self.gen.wrapped_module)
        return None

    def resume(self, which: str) -> None:
        try:
            path = ckpt.resolve(self.out / "checkpoints", which)
        except FileNotFoundError as err:
            raise FlowalignError(str(err)) from None
        if path is None:
            print(f"flowalign: no checkpoint under {self.out / 'checkpoints'}; starting from scratch")
            return
        weights, optimizer_state, state, ema = ckpt.load_checkpoint(path)
        extra_weights, extra_optimizers = self._extra_state()
        if extra_optimizers:
            self._load_extra_state(weights, optimizer_state)
            weights = {k: v for k, v in weights.items() if k not in extra_weights}
            optimizer_state = optimizer_state["policy"]
        load_trainable_state(self.gen.trainable_module, {k: v.to(self.acc.device) for k, v in weights.items()},
                             self.lora)
        self.optimizer.load_state_dict(optimizer_state)
        if self.ema is not None and ema is not None:
            for i, p in enumerate(self.ema.shadow_params):
                p.copy_(ema[f"ema.{i}"])
        self.iteration, self.history = state["iteration"], state["history"]

    def save_final(self) -> Path:
        """The final weights: diffusers-format LoRA (``pipe.load_lora_weights``) or the full module."""
        final = self.out / "final"
        self.acc.wait_for_everyone()
        module = self.gen.trainable_module
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        state = self._gathered_state()
        if self.acc.is_main_process:
            if self.lora:
                save_lora_diffusers(module, final, state, *self.gen.lora_format)
            else:
                module.save_pretrained(final, state_dict=state)
        if self.ema is not None:
            self.ema.restore(self.params)
        self.acc.wait_for_everyone()
        return final


class _NonFiniteLoss(Exception):
    pass


def _trajectory_keys(roots, select: list[int], shared: bool) -> dict[int, int]:
    """Node -> global trajectory index (the key of its noise); shared-prefix roots map to 0 (ODE steps)."""
    if not shared:
        return {id(root): t for root, t in zip(roots, select)}
    keys, kids = {}, iter(select)
    for root in roots:
        for child in root.children:
            keys[id(child)] = next(kids)
    return keys


__all__ = ["GRPOTrainer"]
