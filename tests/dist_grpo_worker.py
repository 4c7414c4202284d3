"""Tiny GRPO runs for the distributed test (tests/test_distributed.py); not a pytest module.

    torchrun --nproc_per_node 2 tests/dist_grpo_worker.py OUT
    python tests/dist_grpo_worker.py OUT          # world 1, for comparison

``Accelerator(cpu=True)`` under torchrun gives MULTI_CPU over gloo. Every case of ``CASES`` runs two iterations;
after each, every rank writes ``OUT/world{W}/{case}_rank{r}_iter{i}.pt`` with the gathered rewards and
advantages sorted by trajectory id, the gradient of every optimizer update (as the optimizer sees it: after
DDP's all-reduce, before clipping) and this rank's LoRA weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMALL = ["train.prompts_per_iteration=2", "train.steps=4", "train.eval_prompts=0", "train.rollout_batch=8",
         "train.train_batch=8", "train.checkpoint_every=0", "train.iterations=2"]
#: case -> (config, overrides). Everything that touches the loss's scale: shuffled minibatches, several updates
#: per iteration (unshuffled: a rank's k-th chunk is its share of the k-th global chunk), KL, GRPO-Guard, and the
#: methods whose advantages or trained steps differ.
CASES = {
    "flow_grpo": ("configs/toy/digits_flow_grpo.yaml",
                  ["flow_grpo.group_size=4", "flow_grpo.shuffle=false", "train.updates_per_iteration=1"]),
    "shuffled": ("configs/toy/digits_flow_grpo.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1"]),
    "two_updates_kl": ("configs/toy/digits_flow_grpo.yaml",
                       ["flow_grpo.group_size=4", "flow_grpo.shuffle=false", "train.updates_per_iteration=2",
                        "modifiers.kl.beta=0.5"]),
    "guard": ("configs/toy/digits_grpo_guard.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1"]),
    "dance_grpo": ("configs/toy/digits_dance_grpo.yaml", ["dance_grpo.group_size=4", "train.updates_per_iteration=1"]),
    "mix_grpo": ("configs/toy/digits_mix_grpo.yaml", ["mix_grpo.group_size=4", "mix_grpo.window_size=2",
                                                     "train.updates_per_iteration=1"]),
    "dr_grpo": ("configs/toy/digits_dr_grpo.yaml", ["dr_grpo.group_size=4", "train.updates_per_iteration=1"]),
}


def run_case(acc, name: str, out: Path) -> None:
    from flowalign.config import load_config
    from flowalign.training import make_trainer
    from flowalign.training.lora import trainable_state

    world, rank = acc.num_processes, acc.process_index
    config, overrides = CASES[name]
    cfg = load_config(REPO / config, SMALL + overrides + [f"output_dir={out / f'world{world}' / name}"])
    trainer = make_trainer(cfg, accelerator=acc)
    record: dict = {}
    advantages, optimizer_step = trainer.advantages, trainer.optimizer_step

    def recording_advantages(batch):
        advantages(batch)
        ids = acc.gather(batch.leaf_ids.contiguous())
        adv = acc.gather(batch.leaf_advantages.contiguous())
        order = torch.argsort(ids)
        record.update(ids=ids[order].cpu(), rewards=batch.all_rewards.cpu(), advantages=adv[order].cpu())

    def recording_step():
        grads = [p.grad.detach().flatten() for p in trainer.params if p.grad is not None]
        record.setdefault("grads", []).append(torch.cat(grads).clone().cpu())
        return optimizer_step()

    trainer.advantages, trainer.optimizer_step = recording_advantages, recording_step
    for i in range(cfg.train.iterations):
        record.clear()
        trainer.run_iteration(i)
        lora = {k: v.cpu() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}
        folder = out / f"world{world}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**record, "lora": lora, "world": world, "rank": rank}, folder / f"{name}_rank{rank}_iter{i}.pt")
    acc.wait_for_everyone()


def main(argv: list[str]) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    for name in CASES:
        run_case(acc, name, Path(argv[0]))
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
