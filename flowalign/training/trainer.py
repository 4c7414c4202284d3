"""The base trainer: what every method's training shares, on accelerate.

It checks the run, loads the generator (policy = base + LoRA, or the full module), the rewards and the
optimizer (EMA optional), runs the fit loop with logging, checkpoints completed iterations atomically,
resumes them bit for bit, handles Ctrl-C and non-finite losses, and saves the final weights. The two
families (``policy_gradient.py``: the GRPO family; ``flow_matching.py``: forward-process objectives) add
sampling and the update; the method's own parts come from its file in ``flowalign/methods``.
Every random draw derives from (seed, iteration), so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import methods
from .. import rewards as reward_lib
from ..checks import check_engine, check_launch, check_output_dir, check_training, whole_prompt_reasons
from ..config import RunConfig
from ..errors import FlowalignError
from ..generators import load_generator, toy_world
from ..generators.memory import place_text_encoders
from ..rewards.media import AudioVideo, cat_media, pictures
from ..seeds import derive_seed
from . import checkpoint as ckpt
from .batch import IterationBatch
from .ema_state import ema_swapped_in, full_ema_state, load_full_ema_state
from .interrupts import stop_at_boundaries
from .lora import add_lora, load_trainable_state, save_lora_diffusers, trainable_shapes, trainable_state
from .marble import GradientBalance
from .monitor import HackingMonitor
from .prompts import iteration_prompts, local_samples, run_prompt_files
from .scoring import OverlappedScoring, guarded_scores
from .state import full_optimizer_state, load_full_optimizer_state
from .trackers import check_trackers, hyperparameters, init_kwargs, log_image, tracker_names
from .zero_state import master_weights, partitions_only, set_micro_batch, zero_optimizer


class NonFiniteLoss(Exception):
    """Raised by an update whose loss is NaN or infinite; the loop stops with a checkpoint."""


class Trainer:
    """Holds the generator, the reward, the optimizer and the loop's state; ``run_iteration`` is the family's."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator

        t = cfg.train
        self.cfg, self.t, self.out = cfg, t, Path(cfg.output_dir)
        precision = {"mixed_precision": t.mixed_precision} if t.mixed_precision else {}
        check_trackers(t.report_to)
        self.acc = accelerator or Accelerator(log_with=tracker_names(t.report_to) or None, project_dir=str(self.out),
                                              **precision)
        check_launch(self.acc.num_processes, torch.cuda.is_available())
        check_engine(self.acc.distributed_type.name, t, getattr(self.acc.state.deepspeed_plugin, "zero_stage", None))
        check_training(cfg, self.acc.num_processes)  # before anything heavy loads
        check_output_dir(cfg.output_dir)
        self.method = methods.build(cfg.method, cfg.options, t, cfg.modifiers)
        self.modifiers = list(self.method.modifiers.values())
        # the training prompts and the report's and monitor's (the held-out file, else the training file; None: toy)
        self.file_prompts, self.heldout_file = run_prompt_files(cfg)
        self.world = toy_world(cfg.model.name) or "digits"
        self.whole_prompts = bool(whole_prompt_reasons(cfg))  # a prompt's samples run on one process
        self.gen = load_generator(cfg.model.name, cfg.model.dtype, device=str(self.acc.device),
                                  local_files_only=cfg.model.local_files_only, **cfg.model.options)
        self.prompt_cache = place_text_encoders(self.gen, t.text_encoders, t.cache_prompts, t.prompt_embeds)
        self.reward = reward_lib.load_weighted(cfg.reward.weights, cfg.reward.normalize, cfg.reward.objective,
                                               cfg.reward.penalty, **cfg.reward.options).to(self.acc.device)
        self.reward.requires_grad_(False)  # frozen: kept out of accelerate's prepare
        self.lora = t.lora_rank > 0
        r = cfg.reward  # MARBLE's reward weights (reward.aggregate: marble)
        self.balance = GradientBalance(r.weights, r.marble_momentum, r.marble_every) if r.aggregate == "marble" \
            else None
        self._prepare_policy()
        self.iteration, self.history = 0, []
        # what Ctrl-C waits for; the iteration count of the newest checkpoint (every process) and its path (main)
        self.activity, self.saved_iteration, self.saved = "iteration 0", None, None
        self.method.setup(self)
        for modifier in self.modifiers:
            modifier.setup(self)
        self.monitor = HackingMonitor(self) if cfg.monitor.every else None
        self.acc.init_trackers(t.tracker_project, config=hyperparameters(cfg), init_kwargs=init_kwargs(self.out))

    def _prepare_policy(self) -> None:
        """LoRA (seeded) or full fine-tuning, gradient checkpointing, AdamW, accelerate's prepare, EMA."""
        t, module = self.t, self.gen.trainable_module
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
        set_micro_batch(self.acc, t.train_batch)  # DeepSpeed: one update is one minibatch
        self.gen.wrapped_module, self.optimizer = self.acc.prepare(module, optimizer)
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=t.ema_decay)

    # ------------------------------------------------------------------ shared stages

    def prompts(self, iteration: int) -> tuple[list[str], list[dict]]:
        """The iteration's prompts and metadata (the same on every process)."""
        return iteration_prompts(self.t, iteration, self.file_prompts, self.world)

    def local_samples(self, per_prompt: int) -> list[int]:
        """This process's sample indices among the iteration's ``prompts_per_iteration × per_prompt`` (sample
        ``s`` belongs to prompt ``s // per_prompt``): whole prompts where a part of the run needs them."""
        return local_samples(self.t.prompts_per_iteration, per_prompt, self.acc.process_index,
                             self.acc.num_processes, self.whole_prompts)

    def initial_states(self, iteration: int, keys: list[int], sigma: float | torch.Tensor) -> torch.Tensor:
        """The starting states of the samples ``keys`` (global ids), each drawn from its own generator seeded by
        (seed, iteration, key): a sample's noise does not depend on which process runs it or on how many there
        are, and each process draws only its own."""
        noise = torch.cat([self.gen.initial_noise(1, torch.Generator().manual_seed(
            derive_seed(self.t.seed, iteration, 19, k))) for k in keys])
        return self.gen.initial_state(noise, sigma)

    def encode(self, prompts: list[str], metadata: list[dict]):
        negative = self.cfg.sample.negative_prompt if self.t.guidance != 1.0 or self.method.negative_branch else None
        return self.gen.with_sources(self.gen.encode(prompts, negative_prompt=negative), metadata)

    def decode_leaves(self, leaves: torch.Tensor) -> torch.Tensor:
        """Final latents as media (images, clips, audio), ``rollout_batch`` at a time."""
        size = self.t.rollout_batch
        return cat_media([self.gen.decode(leaves[i:i + size]) for i in range(0, leaves.shape[0], size)])

    def decode(self, batch: IterationBatch) -> None:
        batch.media = self.decode_leaves(batch.leaves)

    def sampling_parts(self, prompts: list[int]) -> list[list[int]]:
        """The parts this process's prompts are sampled in: all at once, or ``reward.overlap_prompts`` at a time
        (each scored while the next samples)."""
        size = self.cfg.reward.overlap_prompts or len(prompts)
        return [prompts[i:i + size] for i in range(0, len(prompts), size)]

    def overlapped_scoring(self, prompts: list[str], metadata: list[dict],
                           iteration: int) -> OverlappedScoring | None:
        """A scorer for parts as they finish (``reward.overlap_prompts``), or None: score after sampling."""
        return OverlappedScoring(self, prompts, metadata, iteration) if self.cfg.reward.overlap_prompts else None

    def score(self, batch: IterationBatch) -> None:
        """Decode the leaves and score them into ``batch``; a failing reward follows ``reward.on_error``
        (``skip``: the samples it fails on are NaN and get advantage 0; see ``scoring.guarded_scores``)."""
        self.decode(batch)
        raw = guarded_scores(self, batch.media, batch.leaf_prompts, batch.leaf_metadata(), batch.iteration)
        batch.rewards = self.reward.combine(raw, self.acc.gather)
        batch.reward_parts = raw if all(bool(torch.isfinite(v).all()) for v in raw.values()) else {}

    def gathered(self, local: torch.Tensor, batch: IterationBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's values of ``local`` ([L] per leaf) ordered by leaf id, and where this process's
        leaves sit in that order."""
        gather = lambda t: self.acc.gather(t.contiguous())  # noqa: E731
        all_values = local.map(gather) if isinstance(local, AudioVideo) else gather(local)
        all_ids = gather(batch.leaf_ids)
        order = torch.argsort(all_ids)
        return all_values[order], torch.searchsorted(all_ids[order], batch.leaf_ids)

    def mean_gradient(self, summed_losses: Iterator[torch.Tensor], count: int) -> torch.Tensor:
        """The gradient (flat) of every process's summed losses over all processes' ``count`` items; no update
        (MARBLE's per-reward gradients). The losses are computed lazily, inside ``no_sync``."""
        total = torch.zeros(sum(p.numel() for p in self.params), device=self.acc.device)
        with self.acc.no_sync(self.gen.wrapped_module):
            for loss in summed_losses:
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                    for g, p in zip(grads, self.params)])
        return self.acc.reduce(total, "sum") / self.acc.reduce(torch.tensor(float(count), device=self.acc.device),
                                                               "sum")

    def balance_log(self) -> dict[str, float]:
        """MARBLE's current weight of each reward (``marble/<name>``), or nothing."""
        return {f"marble/{k}": a for k, a in self.balance.alpha.items()} if self.balance is not None else {}

    def reward_metrics(self, batch: IterationBatch) -> dict[str, float]:
        """Mean and std of the gathered rewards (skipped samples left out), each part's mean, the NFEs."""
        finite = batch.all_rewards[torch.isfinite(batch.all_rewards)]
        parts = {f"reward/{name}": self.acc.gather(s.contiguous()).mean().item()
                 for name, s in batch.reward_parts.items()} if len(batch.reward_parts) > 1 else {}
        return {**parts, "reward/mean": finite.mean().item() if finite.numel() else float("nan"),
                "reward/std": finite.std().item() if finite.numel() > 1 else 0.0,
                "nfe": float(batch.nfe * self.acc.num_processes)}

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, zero, update the EMA; returns the gradient norm before clipping (if clipped; on the
        device, so the hot loop does not wait for it)."""
        grad_norm = self.acc.clip_grad_norm_(self.params, self.t.max_grad_norm) if self.t.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return None if grad_norm is None else torch.as_tensor(grad_norm).detach()

    def run_iteration(self, iteration: int) -> tuple[dict[str, float], IterationBatch]:
        """Sample, score, compute advantages and update; returns the metrics and the iteration's batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str | None = None, progress: bool = True) -> list[dict]:
        """Run the remaining iterations. Ctrl-C finishes the running iteration, checkpoints and exits (130); a
        second Ctrl-C, or a non-finite loss, stops at once and the unfinished iteration is discarded."""
        from tqdm import tqdm

        if resume:
            self.resume(resume)
        bar = tqdm(total=self.t.iterations, initial=self.iteration, desc=self.cfg.method,
                   disable=not (progress and self.acc.is_main_process))
        announce = lambda: print(f"flowalign: interrupted; finishing {self.activity} first "  # noqa: E731
                                 "(Ctrl-C again to discard it)", flush=True)
        try:
            with stop_at_boundaries(announce) as stop:
                if self.monitor is not None and self.monitor.first is None:
                    self.activity = "the monitor's first evaluation"
                    self.monitor.check(self.monitor.evaluate(), -1)  # the guards before training
                while self.iteration < self.t.iterations and not stop.requested and not self._stopped_by_monitor():
                    self._iterate(bar)
            if stop.requested:
                path = self.saved if self.saved_iteration == self.iteration else self.save_checkpoint()
                print(f"flowalign: stopped after iteration {self.iteration - 1}; saved {path} "
                      "(resume with --resume_from_checkpoint latest)")
                raise SystemExit(130)
        except KeyboardInterrupt:
            print(f"flowalign: interrupted during {self.activity}: discarded; {self._last_good()}")
            raise SystemExit(130) from None
        except NonFiniteLoss as err:
            self.optimizer.zero_grad(set_to_none=True)
            raise FlowalignError(f"{err}: stopped; {self._last_good()}") from None
        finally:
            bar.close()
        return self.history

    def _iterate(self, bar) -> None:
        """One iteration, logged; a checkpoint when it is due."""
        start = time.perf_counter()
        self.activity = f"iteration {self.iteration}"
        metrics, batch = self.run_iteration(self.iteration)
        metrics["time/iteration"] = time.perf_counter() - start
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        alarm = self._watch(metrics)
        self.history.append({"iteration": self.iteration, **metrics})
        self.acc.log(metrics, step=self.iteration)
        self.iteration += 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.4f}")
        due = self.t.checkpoint_every and self.iteration % self.t.checkpoint_every == 0
        checkpoint = due or (alarm and self.cfg.monitor.on_alarm != "warn")
        if checkpoint:
            self.activity = f"checkpoint-{self.iteration}"
            self.save_checkpoint()
        if checkpoint or self.iteration == 1:  # the base model's rollouts, then the policy's at each checkpoint
            self.log_samples(batch.media, self.iteration - 1)

    def _watch(self, metrics: dict[str, float]) -> str | None:
        """The monitor's guard metrics into ``metrics`` when due; its alarm line (printed once) if one fires."""
        if self.monitor is None or not self.monitor.due(self.iteration):
            return None
        self.activity = f"the monitor's evaluation after iteration {self.iteration}"
        values = self.monitor.evaluate()
        metrics.update(values)
        alarm = self.monitor.check(values, self.iteration)
        if alarm:
            metrics["monitor/alarm"] = 1.0
            if self.acc.is_main_process:
                print(alarm, flush=True)
        return alarm

    def _stopped_by_monitor(self) -> bool:
        """``monitor.on_alarm: stop`` after an alarm: training ends here (checkpointed); the report still runs."""
        if self.monitor is None or self.monitor.alarm is None or self.cfg.monitor.on_alarm != "stop":
            return False
        if self.acc.is_main_process:
            print(f"flowalign: the monitor stopped training after iteration {self.iteration - 1} (checkpointed)")
        return True

    def _last_good(self) -> str:
        """Where a stopped run resumes from: the newest complete checkpoint (each holds whole iterations with
        finite weights), or that there is none."""
        found = ckpt.resolve(self.out / "checkpoints", "latest")
        return (f"the last good state is in {found} (resume with --resume_from_checkpoint latest)" if found
                else "no checkpoint was written before it (nothing to resume)")

    def log_samples(self, media: torch.Tensor | None, iteration: int) -> None:
        """A grid of the rollouts of ``iteration`` (sampled before its update) to the trackers (main process);
        video: a row of frames per clip."""
        if not self.acc.is_main_process or media is None or self.gen.modality == "audio":
            return
        from torchvision.utils import make_grid

        media, nrow = pictures(media)[:16].float().cpu(), 8
        if media.ndim == 5:  # video [B,F,3,H,W]
            media, nrow = media[:8].flatten(0, 1), media.shape[1]
        log_image(self.acc, "samples", make_grid(media, nrow=nrow), iteration)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the completed iterations: the whole state, gathered from every process's share (main process
        writes; everyone waits). Weights that are not finite are never saved."""
        self.acc.wait_for_everyone()
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            raise NonFiniteLoss(f"the weights are not finite after iteration {self.iteration - 1}")
        weights = trainable_state(self.gen.trainable_module, self.lora, self._gathered_state())
        policy_optimizer = full_optimizer_state(self.gen.wrapped_module, self.optimizer)  # a collective
        ema = full_ema_state(self.gen.wrapped_module, self.params, self.ema) if self.ema else None  # a collective
        extra_weights, extra_optimizers, modifier_values = self._extra_state()
        path = None
        if self.acc.is_main_process:
            optimizers = {"policy": policy_optimizer, **extra_optimizers}
            state = {"history": self.history, "method": self.cfg.method, "num_processes": self.acc.num_processes,
                     "reward_normalization": self.reward.normalization_state(),
                     "monitor": self.monitor.state() if self.monitor is not None else None,
                     "modifiers": modifier_values, "reward_balance": self.balance.state() if self.balance else None}
            path = ckpt.save_checkpoint(self.out / "checkpoints", self.iteration, {**weights, **extra_weights},
                                        optimizers, state, ema, self.t.checkpoints_total_limit,
                                        ckpt.shaping_config(self.cfg, self.gen.lora_target_modules))
        self.acc.wait_for_everyone()
        self.saved_iteration, self.saved = self.iteration, path  # on every process: a stop decides alike
        return path

    def _extra_state(self) -> tuple[dict, dict, dict]:
        """What the method and the modifiers keep beside the policy: weights, optimizer states, modifiers' values."""
        weights, optimizers = self.method.extra_state(self)
        values = {}
        for modifier in self.modifiers:
            more, values[modifier.name] = modifier.extra_state(self)
            weights = {**weights, **more}
        return weights, optimizers, values

    def _gathered_state(self, masters: bool = True) -> dict[str, torch.Tensor] | None:
        """The full state dict under FSDP / DeepSpeed (a collective; ZeRO-1/2: the trained weights' fp32 masters, unless
        ``masters`` is false: the module's, e.g. with the EMA swapped in); None where the module holds it whole."""
        from accelerate.utils import DistributedType

        if masters and partitions_only(zero_optimizer(self.optimizer)):
            return {**self.gen.trainable_module.state_dict(), **master_weights(self.gen.wrapped_module)}
        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return self.acc.get_state_dict(self.gen.wrapped_module)
        return None

    def resume(self, which: str) -> None:
        """Load a checkpoint (``latest``: the newest intact one); one line if it is corrupt or does not fit."""
        path = ckpt.resolve(self.out / "checkpoints", which)
        if path is None:
            print(f"flowalign: no checkpoint under {self.out / 'checkpoints'}; starting from scratch")
            return
        weights, optimizers, state, ema = ckpt.load_checkpoint(path)
        if state.get("method", self.cfg.method) != self.cfg.method:
            raise FlowalignError(f"{path}: a checkpoint of method {state['method']}, but this run's method is "
                                 f"{self.cfg.method}")
        if state["iteration"] > self.t.iterations:
            raise FlowalignError(f"{path}: holds {state['iteration']} iterations, more than this run's "
                                 f"train.iterations ({self.t.iterations})")
        extra = self._extra_state()[0]
        extra_names = set(extra)
        current = {**trainable_shapes(self.gen.trainable_module, self.lora),
                   **{k: tuple(v.shape) for k, v in extra.items()}}
        ckpt.check_fits(path, weights, current, ckpt.read_manifest_config(path),
                        ckpt.shaping_config(self.cfg, self.gen.lora_target_modules))
        self.method.load_extra_state(self, {k: v for k, v in weights.items() if k in extra_names}, optimizers)
        for modifier in self.modifiers:
            modifier.load_extra_state(self, weights, state.get("modifiers", {}).get(modifier.name, {}))
        load_trainable_state(self.gen.trainable_module, {k: v.to(self.acc.device) for k, v in weights.items()
                                                         if k not in extra_names}, self.lora)
        load_full_optimizer_state(self.gen.wrapped_module, self.optimizer, optimizers["policy"], weights)
        if self.ema is not None and ema is not None:
            load_full_ema_state(self.gen.wrapped_module, self.params, self.ema, ema)
        self.reward.load_normalization_state(state.get("reward_normalization", {}))
        if self.balance is not None:
            self.balance.load_state(state.get("reward_balance") or {})
        if self.monitor is not None and state.get("monitor"):
            self.monitor.load_state(state["monitor"])
        self.iteration, self.history = state["iteration"], state["history"]

    def save_final(self) -> Path:
        """The final weights (the EMA's when kept): diffusers-format LoRA (``pipe.load_lora_weights``) or the
        full module."""
        final = self.out / "final"
        self.acc.wait_for_everyone()
        module = self.gen.trainable_module
        with ema_swapped_in(self.ema, self.params):  # on each process's shard; the live weights come back after
            state = self._gathered_state(masters=self.ema is None)
            if self.acc.is_main_process:
                if self.lora:
                    save_lora_diffusers(module, final, state, *self.gen.lora_format)
                else:
                    module.save_pretrained(final, state_dict=state)
        self.acc.wait_for_everyone()
        return final
