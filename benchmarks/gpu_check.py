"""The first GPU's check, prepared (not run in CI): an SD3.5-Medium-architecture transformer with random weights
(bf16) at 512x512 trains through the real trainer with Flow-GRPO and with Dynamic-TreeRPO (a trunk-sharing method)
for a few iterations; printed: seconds per iteration, peak GPU memory, and the log-prob error of bf16 against an
fp32 copy of the same policy on the same stored transitions. Run on a machine with a GPU:

    python -m benchmarks.gpu_check [--iterations 4] [--resolution 512]
    python -m benchmarks.gpu_check --tiny --bf16   # a tiny SD3 on the CPU: the smoke test the suite runs

The pipeline is saved to a temporary folder and loaded back by name (the path a real checkpoint takes). Its text
encoders are small random ones with the real output widths (CLIP-L 768, CLIP-G 1280, T5 4096): only the
transformer's cost matters here. The reward is ``toy/symmetry`` (cheap, any image size).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: stabilityai/stable-diffusion-3.5-medium's transformer config (MMDiT-X: dual attention in the first 13 blocks)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
METHODS = {"Flow-GRPO": ("configs/sd35/flow_grpo_pickscore.yaml", ["flow_grpo.group_size=4", "modifiers.kl=null"]),
           "Dynamic-TreeRPO": ("configs/toy/digits_tree_grpo.yaml", ["tree_grpo.tree_depth=2",
                                                                     "tree_grpo.window_size=2"])}


def build_sd35_medium(folder: Path) -> Path:
    """SD3.5-Medium's transformer and VAE with random weights, small text encoders of the real widths."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT / "tests"))
    from sd3_tiny import clip_tokenizer_offline, t5_tokenizer_offline  # the real tokenizers, built offline

    torch.manual_seed(0)

    def clip(width: int, heads: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=width,
            intermediate_size=64, num_attention_heads=heads, num_hidden_layers=1, projection_dim=width))

    with tempfile.TemporaryDirectory() as tmp:
        t5_tokenizer = t5_tokenizer_offline(Path(tmp) / "t5")
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM),
            vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(128, 256, 512, 512), layers_per_block=2, shift_factor=0.0609,
                              scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=clip(768, 12), text_encoder_2=clip(1280, 20),
            text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_ff=64, d_kv=64,
                                                   num_heads=2, num_layers=1)),
            tokenizer=clip_tokenizer_offline(Path(tmp) / "clip"), tokenizer_2=clip_tokenizer_offline(Path(tmp) / "c2"),
            tokenizer_3=t5_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        pipe.save_pretrained(folder)
    return folder


def build_tiny(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from sd3_tiny import build_tiny_sd3

    return build_tiny_sd3(folder)


def logp_error(trainer, batch) -> float:
    """Max |log p| difference on the iteration's stored transitions: the trainer's bf16 path against an fp32 copy
    of the same policy (LoRA included), both evaluated now."""
    gen = trainer.gen
    low = trainer.recompute_logp(batch)
    original, wrapped = gen.pipe.transformer, gen.wrapped_module
    fp32 = copy.deepcopy(trainer.acc.unwrap_model(gen.trainable_module)).float()
    fp32.__dict__.pop("forward", None)  # accelerate's autocast wrapper (copied along): the class's plain forward
    gen.pipe.transformer, gen.wrapped_module = fp32, fp32
    try:
        with torch.autocast(device_type=gen.device.type, enabled=False):
            high = trainer.recompute_logp(batch)
    finally:
        gen.pipe.transformer, gen.wrapped_module = original, wrapped
    return float((low.float() - high.float()).abs().max())


def run(name: str, model: Path, prompts: Path, args, out: Path) -> dict:
    from flowalign.config import load_config
    from flowalign.training import make_trainer

    config, extra = METHODS[name]
    cuda = torch.cuda.is_available()
    bf16 = cuda or args.bf16
    side = args.resolution
    size = ["model.options={}"] if args.tiny else [f"model.options={{height: {side}, width: {side}}}"]
    cfg = load_config(ROOT / config, [
        f"model.name={model}", f"model.dtype={'bfloat16' if bf16 else 'float32'}", *size,
        "reward.weights={toy/symmetry: 1.0}", "reward.aggregate=reward", f"train.prompt_file={prompts}",
        "train.prompts_per_iteration=2", f"train.steps={args.steps}", "train.guidance=4.5",
        f"train.mixed_precision={'bf16' if bf16 else 'no'}", "train.gradient_checkpointing=true",
        "train.rollout_batch=8", "train.train_batch=8", "train.lora_rank=32", "train.lora_alpha=64",
        "train.eval_prompts=0", "train.checkpoint_every=0", "train.ema_decay=0",
        f"train.iterations={args.iterations}", f"output_dir={out}", *extra])
    trainer = make_trainer(cfg)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, batch = [], None
    for i in range(args.iterations):
        start = time.perf_counter()
        _, batch = trainer.run_iteration(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"s_per_iteration": statistics.median(times[1:] or times), "first_iteration_s": times[0],
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "samples_per_iteration": int(batch.leaves.shape[0]), "logp_max_abs_error": logp_error(trainer, batch)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny SD3 (CPU smoke test)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast on the CPU too")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", default=None, help="JSON to write (default: benchmarks/results/gpu_check.json, "
                                                     "not with --tiny)")
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "tiny": args.tiny,
              "resolution": None if args.tiny else args.resolution, "steps": args.steps, "methods": {},
              "command": "python -m benchmarks.gpu_check" + (" --tiny" if args.tiny else "")}
    with tempfile.TemporaryDirectory() as tmp:
        model = (build_tiny if args.tiny else build_sd35_medium)(Path(tmp) / "model")
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("a red bicycle leaning on a wall\na lighthouse at dusk\na bowl of ramen\na fox in snow\n")
        for name in METHODS:
            result["methods"][name] = row = run(name, model, prompts, args, Path(tmp) / name)
            peak = "n/a" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.1f} GiB"
            print(f"{name:<18} {row['s_per_iteration']:.2f} s/iteration ({row['samples_per_iteration']} samples), "
                  f"peak {peak}, bf16 vs fp32 log-prob max error {row['logp_max_abs_error']:.2e}", flush=True)
    out = args.out or (None if args.tiny else str(RESULTS / "gpu_check.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
