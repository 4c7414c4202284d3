"""On-policy flow-matching trainers: AC-Flow (critic-weighted flow matching, ORW-CFM-W2 without a critic)
and DRAGON (preference losses on positive / negative sets). Neither needs SDE log-probs: samples come from
the policy's ODE, and the loss is the flow-matching error at fresh noise levels.

They reuse the GRPO trainer's machinery (generator + LoRA on accelerate, rewards, prompts, checkpoints,
resume, report); only the iteration differs. The maths lives in ``algorithms/ac_flow.py`` and
``algorithms/dragon.py``.
"""
from __future__ import annotations

import time

import torch

from .. import rewards as reward_lib
from ..algorithms import ac_flow, dragon
from ..config import ConfigError, RunConfig
from ..samplers.ode import euler_ode
from .grpo_trainer import GRPOTrainer, _seed
from .lora import adapters_disabled
from .prompts import iteration_prompts, local_trajectories


class OnPolicyFlowMatchingTrainer(GRPOTrainer):
    """The shared part: sample with the current policy, score, and build flow-matching training points."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        super().__init__(cfg, accelerator)
        if not self.lora and self.t.w2_weight > 0 or not self.lora and self.t.algorithm == "dragon":
            raise ConfigError(f"train.algorithm={self.t.algorithm} compares with the frozen base (the LoRA-off "
                              "model): it needs train.lora_rank > 0")

    def sample(self, iteration: int) -> dict:
        """This process's share of ``prompts_per_iteration × group_size`` ODE samples (CFG as configured)."""
        t, gen = self.t, self.gen
        prompts, meta = iteration_prompts(t, iteration, self.file_prompts, getattr(gen, "toy_world", "digits"))
        cond = gen.encode(prompts, negative_prompt=self.cfg.sample.negative_prompt if t.guidance != 1.0 else None)
        select = torch.tensor(local_trajectories(t, self.acc.process_index, self.acc.num_processes))
        sigmas = gen.sigmas(t.steps)
        shared = torch.Generator().manual_seed(_seed(t.seed, iteration))
        noise = gen.initial_state(gen.initial_noise(t.prompts_per_iteration * t.group_size, shared), sigmas[0])
        rows = select // t.group_size
        latents, media = [], []
        with torch.no_grad():
            for chunk in select.split(t.rollout_batch):
                c = cond.select(chunk // t.group_size)
                x = euler_ode(lambda x, s: gen.velocity(x, s, c, t.guidance), noise[chunk.to(noise.device)], sigmas)
                latents.append(x)
                media.append(gen.decode(x))
        media = torch.cat(media)
        self.last_media = media[:16]
        self._nfe = float(t.steps * len(select) * self.acc.num_processes)
        return {"x0": torch.cat(latents).float(), "media": media, "ids": select.to(gen.device),
                "rows": rows, "prompts": [prompts[r] for r in rows.tolist()],
                "meta": [{**meta[r], "group": r} for r in rows.tolist()], "cond": cond}

    def flow_points(self, batch: dict, iteration: int, draws: int,
                    sample_index: torch.Tensor | None = None, salt: int = 0) -> dict:
        """``draws`` noise levels and noises per sample: ``x_σ = (1-σ)·x0 + σ·ε`` and the target ``u = ε - x0``.
        Seeded by (seed, iteration, process), so a resumed run draws the same points."""
        x0 = batch["x0"] if sample_index is None else batch["x0"][sample_index]
        n = x0.shape[0]
        g = torch.Generator().manual_seed(_seed(self.t.seed, iteration, 7, salt, self.acc.process_index))
        if self.t.fm_sigma == "logit_normal":
            sigma = torch.sigmoid(torch.randn(n * draws, generator=g))
        else:
            sigma = torch.rand(n * draws, generator=g)
        eps = torch.randn((n * draws, *x0.shape[1:]), generator=g)
        sigma, eps = sigma.to(x0.device), eps.to(x0.device)
        owner = torch.arange(n, device=x0.device).repeat(draws)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return {"x": (1 - s) * x0[owner] + s * eps, "sigma": sigma, "target": eps - x0[owner], "owner": owner}

    def policy_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond, reference: bool = False) -> torch.Tensor:
        """The velocity the samples come from: CFG-guided when ``train.cfg`` (both branches carry the LoRA), so
        fitting on-policy samples does not compound the guidance; ``reference``: LoRA off."""
        guidance = self.t.guidance if self.t.cfg else 1.0
        if not reference:
            return self.gen.velocity(x, sigma, cond, guidance=guidance)
        with torch.no_grad(), adapters_disabled(self.gen.trainable_module, self.lora):
            return self.gen.velocity(x, sigma, cond, guidance=guidance)

    def gathered_rewards(self, local: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All processes' rewards ordered by trajectory id, and where this process's samples sit in them."""
        all_rewards, all_ids = self.acc.gather(local.contiguous()), self.acc.gather(ids.contiguous())
        order = torch.argsort(all_ids)
        return all_rewards[order], torch.searchsorted(all_ids[order], ids)

    def optimizer_step(self) -> float | None:
        grad_norm = self.acc.clip_grad_norm_(self.params, self.t.max_grad_norm) if self.t.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return None if grad_norm is None else float(grad_norm)


    def run_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration of the method (``update``), with its rollout NFEs and time split like GRPO's."""
        start = time.perf_counter()
        batch = self.sample(iteration)
        sampled = time.perf_counter()
        stats = self.update(batch, iteration)
        return {**stats, "nfe": self._nfe, "time/sampling": sampled - start, "time/reward": 0.0,
                "time/training": time.perf_counter() - sampled}

    def update(self, batch: dict, iteration: int) -> dict[str, float]:
        raise NotImplementedError


class ACFlowTrainer(OnPolicyFlowMatchingTrainer):
    """AC-Flow (``train.critic: true``) and ORW-CFM-W2 (``train.critic: false``)."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        super().__init__(cfg, accelerator)
        self.critic = None
        if self.t.critic:
            text_dim = ac_flow.pooled_text(self.gen.encode([""], negative_prompt=None).positive).shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.t.seed + 1)
                critic = ac_flow.Critic(tuple(self.gen.latent_shape), text_dim, self.t.critic_width)
            optimizer = torch.optim.AdamW(critic.parameters(), lr=self.t.critic_lr, weight_decay=0.0)
            self.critic, self.critic_optimizer = self.acc.prepare(critic.to(self.acc.device), optimizer)

    def update(self, batch: dict, iteration: int) -> dict[str, float]:
        t = self.t
        local = self.reward.score(batch["media"], batch["prompts"], batch["meta"])
        all_rewards, position = self.gathered_rewards(local, batch["ids"])
        groups = torch.arange(len(all_rewards), device=all_rewards.device) // t.group_size
        if t.critic:
            shaped = ac_flow.shape_rewards(all_rewards, groups if t.shape_per_group else None, t.reward_bound,
                                           t.reward_bound_value)[position]
        else:
            shaped = local  # ORW-CFM-W2: w = exp(β·r) on the raw reward
        self._rng = torch.Generator().manual_seed(_seed(t.seed, iteration, 13))
        points = self.flow_points(batch, iteration, t.fm_draws)
        text = ac_flow.pooled_text(batch["cond"].select(batch["rows"]).positive)[points["owner"]]
        targets = shaped[points["owner"]].float()
        stats = {"reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std().item()}
        if self.critic is not None:
            stats.update(self.train_critic(points, text, targets))
        if iteration >= t.critic_warmup or self.critic is None:
            stats.update(self.train_actor(batch, points, text, targets))
        return stats

    def train_critic(self, points: dict, text: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Regress ``V(x_σ, σ, c)`` on the shaped rewards; the explained variance is measured first, on
        points the critic has not seen."""
        with torch.no_grad():
            before = self.critic(points["x"], points["sigma"], text)
        losses = []
        for _ in range(self.t.critic_updates):
            for idx in torch.randperm(len(targets), generator=self._rng).split(self.t.train_batch):
                idx = idx.to(targets.device)
                loss = (self.critic(points["x"][idx], points["sigma"][idx], text[idx]) - targets[idx]).pow(2).mean()
                self.acc.backward(loss)
                self.critic_optimizer.step()
                self.critic_optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        return {"critic/explained_variance": ac_flow.explained_variance(before, targets),
                "critic/loss": torch.stack(losses).mean().item()}

    def train_actor(self, batch: dict, points: dict, text: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Advantage-weighted flow matching plus the W2 bound to the LoRA-off base."""
        t = self.t
        with torch.no_grad():
            values = self.critic(points["x"], points["sigma"], text) if self.critic is not None else None
        adv = ac_flow.clipped_advantages(targets, values, t.adv_clip if self.critic is not None else 0.0)
        weights = ac_flow.advantage_weights(adv, t.weight_beta, t.weight_norm)
        cond = batch["cond"]
        stats: dict[str, list[float]] = {}
        for chunk in torch.randperm(len(targets), generator=self._rng).chunk(t.updates_per_iteration):
            starts = range(0, len(chunk), t.train_batch)
            for start in starts:
                idx = chunk[start:start + t.train_batch].to(targets.device)
                c = cond.select(batch["rows"].to(idx.device)[points["owner"][idx]])
                v = self.policy_velocity(points["x"][idx], points["sigma"][idx], c)
                fm = (weights[idx] * ac_flow.per_sample_mse(v, points["target"][idx])).mean()
                loss = fm
                if t.w2_weight > 0:
                    w2 = ac_flow.per_sample_mse(v, self.policy_velocity(points["x"][idx], points["sigma"][idx], c,
                                                                        reference=True)).mean()
                    loss = loss + t.w2_weight * w2
                    stats.setdefault("w2", []).append(w2.item())
                self.acc.backward(loss * len(idx) / len(chunk))
                stats.setdefault("fm_loss", []).append(fm.item())
            grad_norm = self.optimizer_step()
            if grad_norm is not None:
                stats.setdefault("grad_norm", []).append(grad_norm)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["advantage/abs_mean"] = adv.abs().mean().item()
        return out

    def _extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.critic is None:
            return {}, {}
        critic = self.acc.unwrap_model(self.critic)
        return ({f"critic.{k}": v.detach().clone() for k, v in critic.state_dict().items()},
                {"critic": self.critic_optimizer.state_dict()})

    def _load_extra_state(self, weights: dict[str, torch.Tensor], optimizers: dict) -> None:
        if self.critic is None:
            return
        critic = self.acc.unwrap_model(self.critic)
        critic.load_state_dict({k.removeprefix("critic."): v.to(self.acc.device) for k, v in weights.items()
                                if k.startswith("critic.")})
        self.critic_optimizer.load_state_dict(optimizers["critic"])


class DragonTrainer(OnPolicyFlowMatchingTrainer):
    """DRAGON: positive / negative sets from any reward kind, Diffusion-DPO or -KTO in flow matching."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        super().__init__(cfg, accelerator)
        if self.acc.num_processes > 1:
            raise ConfigError("train.algorithm=dragon builds its sets over the whole batch: run it on one process")
        if self.t.dragon_sets == "greedy":
            set_parts = [r for r in self.reward.parts.values() if isinstance(r, reward_lib.SetReward)]
            if len(self.reward.parts) != 1 or not set_parts:
                raise ConfigError("train.dragon_sets=greedy needs one set reward (fd, vendi, exemplar) as the reward")
            if self.t.dragon_loss != "dpo":
                raise ConfigError("train.dragon_sets=greedy builds pairs: use train.dragon_loss=dpo")
        if self.t.dragon_sets == "unpaired" and self.t.dragon_loss != "kto":
            raise ConfigError("train.dragon_sets=unpaired has no pairs: use train.dragon_loss=kto")

    def update(self, batch: dict, iteration: int) -> dict[str, float]:
        t = self.t
        groups = batch["rows"].to(batch["x0"].device)
        stats: dict[str, float] = {}
        if t.dragon_sets == "greedy":
            part = next(iter(self.reward.parts.values()))
            pairs = torch.stack([torch.nonzero(groups == g).squeeze(1)[:2] for g in groups.unique()])
            set_reward = lambda idx: float(part.score_set(batch["media"][idx]))  # noqa: E731
            stats["reward/set_before"] = set_reward(pairs[:, 0])
            winners, losers = dragon.greedy_set_swaps(set_reward, pairs)
            stats["reward/set_positive"] = set_reward(winners)
            stats["reward/mean"] = float(part.score_set(batch["media"]))
            stats["reward/std"] = 0.0
        else:
            rewards = self.reward.score(batch["media"], batch["prompts"], batch["meta"])
            stats["reward/mean"], stats["reward/std"] = rewards.mean().item(), rewards.std().item()
            if t.dragon_sets == "paired":
                winners, losers = dragon.paired_sets(rewards, groups)
            else:
                positive = dragon.unpaired_sets(rewards)
        loss_stats: dict[str, list[float]] = {}
        if t.dragon_sets == "unpaired":
            members = torch.arange(len(positive), device=positive.device)
        else:
            members = torch.cat([winners, losers])
        if len(members) == 0:
            return stats
        order = torch.randperm(len(members) if t.dragon_sets == "unpaired" else len(winners),
                               generator=torch.Generator().manual_seed(_seed(t.seed, iteration, 11)))
        for salt, chunk in enumerate(order.chunk(t.updates_per_iteration)):
            chunk = chunk.to(members.device)
            if t.dragon_sets == "unpaired":
                loss = self._kto(batch, iteration, members[chunk], positive, salt)
            else:
                loss = self._dpo(batch, iteration, winners[chunk], losers[chunk], salt)
            self.acc.backward(loss)
            grad_norm = self.optimizer_step()
            loss_stats.setdefault("dragon_loss", []).append(loss.item())
            if grad_norm is not None:
                loss_stats.setdefault("grad_norm", []).append(grad_norm)
        stats.update({k: sum(v) / len(v) for k, v in loss_stats.items()})
        stats["pairs"] = float(len(members) // (1 if t.dragon_sets == "unpaired" else 2))
        return stats

    def _errors(self, batch: dict, points: dict, samples: torch.Tensor) -> torch.Tensor:
        """``ℓ`` per flow point of ``samples``, averaged over each sample's draws."""
        c = batch["cond"].select(batch["rows"].to(samples.device)[samples][points["owner"]])
        v = self.policy_velocity(points["x"], points["sigma"], c)
        v_ref = self.policy_velocity(points["x"], points["sigma"], c, reference=True)
        errors = dragon.relative_errors(v, v_ref, points["target"])
        return errors.view(self.t.fm_draws, -1).mean(dim=0)

    def _dpo(self, batch: dict, iteration: int, winners: torch.Tensor, losers: torch.Tensor,
             salt: int) -> torch.Tensor:
        """Winner and loser of a pair see the same noise levels and noises (as Diffusion-DPO does)."""
        win = self.flow_points(batch, iteration, self.t.fm_draws, winners, salt)
        s = win["sigma"].view(-1, *([1] * (win["x"].ndim - 1)))
        eps = win["target"] + batch["x0"][winners][win["owner"]]
        x0_lose = batch["x0"][losers][win["owner"]]
        lose = {**win, "x": (1 - s) * x0_lose + s * eps, "target": eps - x0_lose}
        return dragon.dpo_loss(self._errors(batch, win, winners), self._errors(batch, lose, losers),
                               self.t.dragon_beta)

    def _kto(self, batch: dict, iteration: int, samples: torch.Tensor, positive: torch.Tensor,
             salt: int) -> torch.Tensor:
        points = self.flow_points(batch, iteration, self.t.fm_draws, samples, salt)
        return dragon.kto_loss(self._errors(batch, points, samples), positive[samples], self.t.dragon_beta)


def make_trainer(cfg: RunConfig, accelerator=None) -> GRPOTrainer:
    """The trainer for ``train.algorithm``: the GRPO family, AC-Flow / ORW-CFM-W2, or DRAGON."""
    if cfg.train.algorithm == "ac_flow":
        return ACFlowTrainer(cfg, accelerator)
    if cfg.train.algorithm == "dragon":
        return DragonTrainer(cfg, accelerator)
    return GRPOTrainer(cfg, accelerator)
