"""A tiny GRPO run for the distributed test (tests/test_distributed.py); not a pytest module.

    torchrun --nproc_per_node 2 tests/dist_grpo_worker.py OUT [key=value ...]
    python tests/dist_grpo_worker.py OUT [key=value ...]          # world 1, for comparison

``Accelerator(cpu=True)`` under torchrun gives MULTI_CPU over gloo. After each iteration every rank writes
``OUT/world{W}/rank{r}_iter{i}.pt`` with the gathered rewards and advantages sorted by trajectory id (the
advantages are the ones each rank actually trains on, gathered back) and this rank's LoRA weights.
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

SMALL = ["train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4", "train.eval_prompts=0",
         "train.rollout_batch=8", "train.train_batch=8", "train.checkpoint_every=0", "train.iterations=2"]


def main(argv: list[str]) -> None:
    from accelerate import Accelerator

    from flowalign.config import load_config
    from flowalign.training import make_trainer
    from flowalign.training.lora import trainable_state

    torch.set_num_threads(1)
    out, overrides = Path(argv[0]), argv[1:]
    acc = Accelerator(cpu=True)
    world, rank = acc.num_processes, acc.process_index
    folder = out / f"world{world}"
    cfg = load_config(REPO / "configs/toy/digits_flow_grpo.yaml",
                      SMALL + [f"output_dir={folder / 'run'}", *overrides])
    trainer = make_trainer(cfg, accelerator=acc)

    record: dict[str, torch.Tensor] = {}
    advantages = trainer.advantages

    def recording_advantages(batch):
        advantages(batch)
        ids = acc.gather(batch.leaf_ids.contiguous())
        adv = acc.gather(batch.leaf_advantages.contiguous())
        order = torch.argsort(ids)
        record.update(ids=ids[order].cpu(), rewards=batch.all_rewards.cpu(), advantages=adv[order].cpu())

    trainer.advantages = recording_advantages
    for i in range(cfg.train.iterations):
        record.clear()
        trainer.run_iteration(i)
        lora = {k: v.cpu() for k, v in trainable_state(trainer.gen.trainable_module, True).items()}
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**record, "lora": lora, "world": world, "rank": rank}, folder / f"rank{rank}_iter{i}.pt")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
