"""Tiny GRPO runs for the distributed test (tests/test_distributed.py); not a pytest module.

    torchrun --nproc_per_node 2 tests/dist_grpo_worker.py OUT
    python tests/dist_grpo_worker.py OUT          # world 1, for comparison

``Accelerator(cpu=True)`` under torchrun gives MULTI_CPU over gloo. Every case of ``CASES`` runs two iterations;
after each, every rank writes ``OUT/world{W}/{case}_rank{r}_iter{i}.pt`` with the gathered rewards (set
rewards: of D+ before and after the swaps) and
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
    # GARDO: the gate ranks the gathered batch, the KL is a mean over every process's gated transitions, the
    # diversity comes from gathered features (resets: tests/test_gardo.py)
    "gardo": ("configs/toy/digits_uncapped_gardo.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1",
                                                        "monitor.every=0", "modifiers.gardo.gate_fraction=0.2",
                                                        "modifiers.gardo.beta=1"]),
    # MARBLE: each reward's gradient over every process's transitions, the same balance on any number of processes
    # (lr 3e-4: a LoRA-B entry whose gradient is at Adam's eps moves by a share of lr that fp32 rounding sets)
    "marble": ("configs/toy/digits_flow_grpo.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1",
                                                    "reward.weights={toy/bold_digit: 1, toy/ink: 1}",
                                                    "reward.aggregate=marble", "train.lr=3e-4"]),
    # an ensemble's worst case over members z-scored with the whole batch's statistics (all processes)
    "ensemble": ("configs/toy/digits_flow_grpo.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1",
                                                      "reward.weights={toy/bold_digit: 1, toy/ink: 1}",
                                                      "reward.normalize=batch", "reward.objective=worst_case"]),
    # a shared ODE prefix per group (Fast) and a solver tail (Flash)
    "flow_grpo_fast": ("configs/toy/digits_flow_grpo_fast.yaml", ["flow_grpo.group_size=4",
                                                                  "modifiers.fast.window_size=2",
                                                                  "train.updates_per_iteration=1"]),
    "mix_grpo_flash": ("configs/toy/digits_mix_grpo_flash.yaml", ["mix_grpo.group_size=4", "mix_grpo.window_size=2",
                                                                  "train.updates_per_iteration=1"]),
    # whole prompts per process: shared trunks (noise keyed by node), a pairwise judge, best paths; the tree with
    # BranchGRPO's best/worst width pruning (per prompt, so alike on any number of processes)
    "tempflow_grpo": ("configs/toy/digits_tempflow_grpo.yaml", ["tempflow_grpo.group_size=2",
                                                               "tempflow_grpo.branch_steps=[0, 2]",
                                                               "train.updates_per_iteration=1"]),
    "g2rpo": ("configs/toy/digits_g2rpo.yaml", ["g2rpo.group_size=2", "g2rpo.sde_steps=[0, 1]",
                                               "train.updates_per_iteration=1"]),
    "tree_layer_tuning": ("configs/toy/digits_tree_grpo.yaml", ["tree_grpo.tree_depth=2", "tree_grpo.window_size=3",
                                                               "modifiers.layer_tuning={}",
                                                               "tree_grpo.width_pruning=best_worst",
                                                               "train.updates_per_iteration=1"]),
    "pref_grpo": ("configs/toy/digits_pref_grpo.yaml", ["flow_grpo.group_size=4", "train.updates_per_iteration=1"]),
    "flow_layer_tuning": ("configs/toy/digits_flow_grpo.yaml", ["flow_grpo.group_size=4", "modifiers.layer_tuning={}",
                                                               "train.updates_per_iteration=1"]),
    # the forward-process family: every sample's flow points are keyed by its id; AC-Flow's weights are normalised
    # over every process's points, and one critic step sees them all (train_batch >= the points)
    "orw_cfm_w2": ("configs/toy/digits_orw_cfm_w2.yaml", ["orw_cfm_w2.group_size=4", "train.updates_per_iteration=1",
                                                          "train.train_batch=64"]),
    "ac_flow": ("configs/toy/digits_ac_flow.yaml", ["ac_flow.group_size=4", "ac_flow.critic_warmup=0",
                                                    "train.updates_per_iteration=1", "train.train_batch=64"]),
    # DiffusionNFT: group z-scores over every process's rewards, the old policy (sampling and v_old) alike on all
    "diffusion_nft": ("configs/toy/digits_diffusion_nft.yaml", ["diffusion_nft.group_size=4",
                                                                "diffusion_nft.fm_draws=3",
                                                                "train.updates_per_iteration=1",
                                                                "train.train_batch=64"]),
    "awm": ("configs/toy/digits_awm.yaml", ["awm.group_size=4", "awm.fm_draws=2", "train.updates_per_iteration=1",
                                            "train.train_batch=64"]),
    # MARBLE on DiffusionNFT (the paper's base): each reward's gradient over every process's points
    "marble_nft": ("configs/toy/digits_diffusion_nft.yaml", ["diffusion_nft.group_size=4", "diffusion_nft.fm_draws=3",
                                                            "train.updates_per_iteration=1", "train.train_batch=64",
                                                            "reward.weights={toy/bold_digit: 1, toy/ink: 1}",
                                                            "reward.aggregate=marble"]),
    # DGPO: whole groups per process (a group's weight sums over its members), noise keyed by group and draw
    "dgpo": ("configs/toy/digits_dgpo.yaml", ["dgpo.group_size=4", "dgpo.fm_draws=2", "dgpo.trunc_steps=3",
                                              "dgpo.switch_ema_ref=0", "train.updates_per_iteration=1",
                                              "train.train_batch=64"]),
    # DRAGON: pairs by prompt (whole prompts), two updates over a split of the pairs both processes draw alike
    # (2 prompts: each part holds one pair, so one process joins each update with a zero-weighted stand-in); KTO's
    # median and reference point over every process's samples (beta 50: 500 magnifies fp32 rounding)
    "dragon_dpo": ("configs/toy/digits_dragon.yaml", ["train.updates_per_iteration=2", "dragon.beta=50"]),
    "dragon_kto": ("configs/toy/digits_dragon.yaml", ["train.prompts_per_iteration=4", "dragon.sets=unpaired",
                                                      "dragon.loss=kto", "train.updates_per_iteration=2",
                                                      "dragon.beta=50"]),
    # set rewards (FAD to exemplars): every process scores the gathered clips and finds the same sets
    "dragon_greedy": ("configs/toy/music_dragon_fad.yaml", ["train.prompts_per_iteration=4",
                                                           "train.updates_per_iteration=1", "dragon.beta=50"]),
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
    optimizer_step = trainer.optimizer_step

    def recording_step():
        grads = [p.grad.detach().flatten() for p in trainer.params if p.grad is not None]
        record.setdefault("grads", []).append(torch.cat(grads).clone().cpu())
        return optimizer_step()

    trainer.optimizer_step = recording_step
    for i in range(cfg.train.iterations):
        record.clear()
        metrics, batch = trainer.run_iteration(i)
        ids = acc.gather(batch.leaf_ids.contiguous())
        order = torch.argsort(ids)
        rewards = batch.all_rewards if batch.all_rewards is not None else torch.tensor(  # set rewards: the sets'
            [metrics["reward/set_before"], metrics["reward/set_positive"]])
        record.update(ids=ids[order].cpu(), rewards=rewards.cpu())
        if batch.leaf_advantages is not None:  # the advantages each rank trains on, gathered back
            record["advantages"] = acc.gather(batch.leaf_advantages.contiguous())[order].cpu()
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
