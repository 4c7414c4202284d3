"""The ``flowalign`` command: train | embed-prompts | generate | evaluate | optimize | methods | toy build |
rewards list | app. Configs are sectioned YAML plus ``key=value`` overrides; flags may come in any order.

Errors a user can fix (bad config, missing file, unknown reward) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file and the key=value overrides, in whatever order they were given."""
    from .config import ConfigError

    given = ([args.config] if args.config is not None else []) + list(args.overrides)
    files = [item for item in given if "=" not in item or _is_file(item)]  # a config's path may hold '='

    if len(files) > 1:
        raise ConfigError(f"expected one config file and key=value overrides, got '{files[0]}' and '{files[1]}'")
    return (files[0] if files else None), [item for item in given if item not in files]


def _is_file(item: str) -> bool:
    try:
        return Path(item).is_file()
    except (OSError, ValueError):  # too long for a path, a NUL byte
        return False


def _cli_prompts(args: argparse.Namespace, command: str) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompt-file`` (one per line); one line if none."""
    from .config import ConfigError

    prompts = list(args.prompt or [])
    if args.prompt_file:
        from .prompt_sets import read_prompt_set

        prompts += read_prompt_set(args.prompt_file, "--prompt-file").prompts
    if not prompts:
        raise ConfigError(f"{command}: give at least one --prompt or a --prompt-file")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generators import load_generator
    from .inference import generate, save_grid

    prompts = _cli_prompts(args, "generate")
    _check_generate_flags(args, len(prompts))
    generator = load_generator(args.model, args.dtype, local_files_only=args.local_files_only)
    batch = [p for p in prompts for _ in range(args.num)]
    media = generate(generator, batch, steps=args.steps, guidance=args.guidance, seed=args.seed,
                     negative_prompt=args.negative_prompt)
    out = Path(args.out)
    if generator.modality == "video":  # one animation: frame t is the grid of every clip's frame t
        from .inference import save_video

        out = out if out.suffix.lower() in (".gif", ".mp4") else out.with_suffix(".gif")
        save_video(media, out, nrow=args.num if len(prompts) > 1 else min(args.num, 10))
        print(f"wrote {len(batch)} clips to {out}")
        return
    if generator.modality == "audio_video":  # the clips' animation, and a WAV file per soundtrack beside it
        from .inference import save_video, save_wav

        out = out if out.suffix.lower() in (".gif", ".mp4") else out.with_suffix(".gif")
        save_video(media.video, out, nrow=args.num if len(prompts) > 1 else min(args.num, 10))
        paths = save_wav(media.audio, out.with_suffix(".wav"), media.sample_rate)
        print(f"wrote {len(batch)} clips to {out} and their audio to {paths[0]}"
              + (f" ... {paths[-1].name}" if len(paths) > 1 else ""))
        return
    if generator.modality == "audio":  # one 16-bit WAV file per sample
        from .inference import sample_rate_of, save_wav

        paths = save_wav(media, out, sample_rate_of(generator))
        print(f"wrote {len(paths)} clips to {paths[0]}" + (f" ... {paths[-1].name}" if len(paths) > 1 else ""))
        return
    out = out if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else out.with_suffix(".png")
    save_grid(media, out, nrow=args.num if len(prompts) > 1 else min(args.num, 10))
    print(f"wrote {len(batch)} samples to {out}")


#: What one ``generate`` command makes at most (every sample is held in memory for the grid).
MAX_GENERATE_SAMPLES = 1024
OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4", ".wav")


def _in_range(name: str, value, low, high) -> None:
    """A number flag within [low, high] and finite (argparse's ``float`` takes ``nan`` and ``inf``)."""
    import math

    from .config import ConfigError

    if value is not None and (not math.isfinite(value) or not low <= value <= high):
        raise ConfigError(f"{name}: expected a number in [{low}, {high}], got {value}")


def _check_generate_flags(args: argparse.Namespace, num_prompts: int) -> None:
    """Every flag of ``generate`` before the model loads: ranges, the sample cap, a writable output file."""
    from .checks import check_output_dir
    from .config import ConfigError

    for name, value, low, high in (("--num", args.num, 1, MAX_GENERATE_SAMPLES), ("--steps", args.steps, 1, 1000),
                                   ("--guidance", args.guidance, 0, 100), ("--seed", args.seed, 0, 2 ** 62)):
        _in_range(name, value, low, high)
    if num_prompts * args.num > MAX_GENERATE_SAMPLES:
        raise ConfigError(f"--num: {num_prompts} prompts x {args.num} = {num_prompts * args.num} samples, over the "
                          f"cap of {MAX_GENERATE_SAMPLES} per command")
    out = Path(args.out)
    if not args.out or out.is_dir():
        raise ConfigError(f"--out: expected a file name ending in {', '.join(OUT_SUFFIXES)}, got '{args.out}'")
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out: unknown file type '{out.suffix}' (expected {', '.join(OUT_SUFFIXES)})")
    check_output_dir(out.parent, "--out")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluate import evaluate

    evaluate(load_config(*_config_and_overrides(args)))


def _cmd_train(args: argparse.Namespace) -> None:
    from .training.run import train

    train(*_config_and_overrides(args), resume=args.resume_from_checkpoint)


def _cmd_share(args: argparse.Namespace) -> None:
    """Rewrite a run's model card (for the repo it goes to) and push its final LoRA to the Hub."""
    from .sharing import check_push, share

    if args.push_to_hub:
        check_push(args.push_to_hub)
    where = share(args.run_dir, args.push_to_hub, private=args.private)
    print(f"pushed to {where}" if args.push_to_hub else f"model card in {Path(where) / 'README.md'}")


def _cmd_embed_prompts(args: argparse.Namespace) -> None:
    """Encode a run's prompts (its prompt file and negative prompt) once and save them for train.prompt_embeds."""
    from .checks import check_output_dir
    from .config import ConfigError, load_config
    from .generators import PromptCache, load_generator
    from .prompt_sets import read_prompt_set

    cfg = load_config(*_config_and_overrides(args))
    source = args.prompt_file or cfg.train.prompt_file
    if not source:
        raise ConfigError("embed-prompts: give --prompt-file or set train.prompt_file (the toy prompt generator's "
                          "prompts are encoded on the fly: use train.cache_prompts)")
    prompts = list(dict.fromkeys(read_prompt_set(source, "--prompt-file" if args.prompt_file else
                                                 "train.prompt_file").prompts))
    if not prompts:
        raise ConfigError(f"embed-prompts: '{source}' holds no prompts")
    _in_range("--batch-size", args.batch_size, 1, 65536)
    out = Path(args.out or Path(cfg.output_dir) / "prompt_embeds.safetensors")
    if out.is_dir() or out.suffix != ".safetensors":
        raise ConfigError(f"--out: expected a .safetensors file name, got '{out}'")
    check_output_dir(out.parent, "--out")
    gen = load_generator(cfg.model.name, cfg.model.dtype, local_files_only=cfg.model.local_files_only,
                         **cfg.model.options)
    cache = PromptCache().bind(gen)
    negative = cfg.sample.negative_prompt if cfg.train.guidance != 1.0 or cfg.sample.guidance != 1.0 else None
    from tqdm import tqdm

    for start in tqdm(range(0, len(prompts), args.batch_size), desc="embed-prompts", unit="batch"):
        gen.encode(prompts[start:start + args.batch_size], negative_prompt=negative)
    out = cache.save(out)
    print(f"wrote embeddings of {len(prompts)} prompts" + (" and the negative prompt" if negative is not None else "")
          + f" to {out}")


def _cmd_toy_build(args: argparse.Namespace) -> None:
    from .toy.build import build_all

    targets = build_all(quick=args.quick, out=Path(args.out) if args.out else None, seed=args.seed)
    for name, path in targets.items():
        print(f"{name}: {path}")


def _cmd_rewards_list(args: argparse.Namespace) -> None:
    """Every reward name with its kind, modality, differentiability, what it loads and what it measures."""
    from . import rewards

    for name in rewards.available():
        try:
            d = rewards.registry.describe(name)
        except Exception as err:  # a plug-in that cannot even be imported is listed, not fatal
            print(f"{name:<22} (cannot be imported: {type(err).__name__})")
            continue
        print(f"{name:<22} {d['modality']:<6} {d['kind']:<10} {d['differentiable']:<15} {d['loads']:<40} "
              f"{d['description']}")


def _cmd_app(args: argparse.Namespace) -> None:
    from .app import load_app_config, serve

    overrides = list(args.overrides) + ([f"server.port={args.port}"] if args.port is not None else [])
    cfg = load_app_config(args.config, overrides)
    if args.host:
        cfg.server.host = args.host
    serve(cfg)


def _cmd_optimize(args: argparse.Namespace) -> None:
    """Optimise one image per prompt at inference time; the config is ``flowalign.optimize_config``'s."""
    from tqdm import tqdm

    from . import rewards
    from .config import ConfigError
    from .generators import load_generator
    from .optimize import optimize_iter, save_outputs
    from .optimize_config import load_optimize_config

    config, overrides = _config_and_overrides(args)
    flags = [f"prompts={[*args.prompt]}"] if args.prompt else []
    flags += [f"prompt_file={args.prompt_file}"] if args.prompt_file else []
    flags += [f"out={args.out}"] if args.out else []
    cfg = load_optimize_config(config, [*overrides, *flags])
    prompts = cfg.all_prompts()
    if not prompts:
        raise ConfigError("optimize: give at least one prompt (--prompt, --prompt-file, or prompts: in the config)")
    reward = rewards.load_weighted(cfg.reward.weights, **cfg.reward.options)
    generator = load_generator(cfg.model.name, cfg.model.dtype, local_files_only=cfg.model.local_files_only,
                               **cfg.model.options)
    bar, last = None, None
    for last in optimize_iter(generator, prompts, reward, cfg.method, cfg.seed, **cfg.method_options()):
        if last.result is None:
            if bar is None or bar.desc != last.stage:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=last.total, desc=last.stage, unit="it", leave=False)
            bar.update(last.iteration - bar.n)
            bar.set_postfix(best=f"{float(last.best.mean()):.4g}", nfe=last.nfe)
    if bar is not None:
        bar.close()
    result = last.result
    save_outputs(result, cfg.out)
    if result.stopped:
        print(f"stopped: {result.stopped}")
    print(f"{cfg.method}: best reward {float(result.rewards.mean()):.4g} (mean over {len(prompts)} prompts), "
          f"{result.nfe} NFE; wrote {Path(cfg.out) / 'best.png'}, iterations/, rewards.csv, rewards.png")


def _cmd_methods(args: argparse.Namespace) -> None:
    """Every training method and modifier, with its family and what it combines with."""
    from .methods import combines, methods, modifiers

    for name, cls in methods().items():
        mods = [m for m, mod in modifiers().items() if combines(mod, cls)]
        print(f"{name:<15} {cls.title:<48} {cls.family:<16} modifiers: {', '.join(mods) or '-'}")
    for name, mod in modifiers().items():
        print(f"modifiers.{name:<14} {mod.title}")


def _cmd_keys(args: argparse.Namespace) -> None:
    from .config_keys import table

    print(table(args.section))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="flowalign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flowalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample images from a model (ODE, CFG) into a PNG grid")
    gen.add_argument("--model", default="toy/digits", help="toy/digits, a hub id or a local diffusers folder")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", help="one prompt per line (.txt), or .jsonl objects with a \"prompt\"")
    gen.add_argument("--num", type=int, default=8, help="samples per prompt")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (model default if unset)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale (model default if unset)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--local-files-only", action="store_true")
    gen.add_argument("--out", default="outputs/generate.png")
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("evaluate", help="generate for a prompt set and score with rewards (prints a table)")
    ev.add_argument("config", nargs="?", default=None, help="a YAML config (see configs/)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.steps=30")
    ev.set_defaults(func=_cmd_evaluate)

    tr = sub.add_parser("train", help="fine-tune with GRPO (Flow-GRPO, DanceGRPO) against rewards")
    tr.add_argument("config", nargs="?", default=None, help="a YAML config (see configs/)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    tr.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None,
                    help="'latest' (the newest checkpoint under output_dir/checkpoints) or a checkpoint folder")
    tr.set_defaults(func=_cmd_train)

    shr = sub.add_parser("share", help="a trained LoRA's model card, and a push to the Hugging Face Hub")
    shr.add_argument("run_dir", help="a flowalign train output folder (its final/ LoRA, report/ and card)")
    shr.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                     help="the model repo to push final/ to (created if needed); without it the card is rewritten")
    shr.add_argument("--private", action="store_true", help="create the repo private")
    shr.set_defaults(func=_cmd_share)

    emb = sub.add_parser("embed-prompts", help="precompute a run's prompt embeddings (train.prompt_embeds)")
    emb.add_argument("config", nargs="?", default=None, help="a YAML config (its model, prompt file, negative prompt)")
    emb.add_argument("overrides", nargs="*", help="key=value overrides")
    emb.add_argument("--prompt-file", default=None, help=".txt or .jsonl prompts (default: train.prompt_file)")
    emb.add_argument("--out", default=None, help="default: OUTPUT_DIR/prompt_embeds.safetensors")
    emb.add_argument("--batch-size", type=int, default=32)
    emb.set_defaults(func=_cmd_embed_prompts)

    toy = sub.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    build = toy.add_parser("build", help="retrain every toy model from scratch (fixed seeds)")
    build.add_argument("--quick", action="store_true", help="a few steps each (for tests)")
    build.add_argument("--out", default=None, help="write under this folder instead of the shipped locations")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_cmd_toy_build)

    opt = sub.add_parser("optimize", help="align one image per prompt at inference time (ReNO, CARINOX, best-of-N)")
    opt.add_argument("config", nargs="?", default=None, help="a YAML config (see configs/reno/)")
    opt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=carinox reno.iterations=20")
    opt.add_argument("--prompt", action="append", help="a prompt (repeatable; replaces the config's prompts)")
    opt.add_argument("--prompt-file", help="one prompt per line (.txt), or .jsonl objects with a \"prompt\"")
    opt.add_argument("--out", default=None, help="output folder (default: the config's out)")
    opt.set_defaults(func=_cmd_optimize)

    met = sub.add_parser("methods", help="list the training methods and modifiers")
    met.set_defaults(func=_cmd_methods)

    keys = sub.add_parser("keys", help="every config key with its type, default and meaning")
    keys.add_argument("section", nargs="?", default=None,
                      help="train, reward, ..., a method (flow_grpo) or a modifier (modifiers.kl); default: all")
    keys.set_defaults(func=_cmd_keys)

    rw = sub.add_parser("rewards", help="reward models").add_subparsers(dest="rewards_command", required=True)
    rw.add_parser("list", help="every reward name rewards.load accepts").set_defaults(func=_cmd_rewards_list)

    app = sub.add_parser("app", help="the Gradio app: compare base vs aligned, optimise noise live, view runs")
    app.add_argument("--config", default=None, help="an app config (YAML); default: the toy world")
    app.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    app.add_argument("--port", type=int, default=None, help="port (default 7860)")
    app.add_argument("overrides", nargs="*", help="key=value overrides, e.g. limits.max_steps=20")
    app.set_defaults(func=_cmd_app)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags, the config and ``key=value`` overrides in any order (each command's own intermixed parse)."""
    commands = parser._subparsers._group_actions[0].choices
    if argv and argv[0] in commands and commands[argv[0]]._subparsers is None:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .errors import FlowalignError
    from .rewards import RewardError

    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        args.func(args)
    except (FlowalignError, RewardError) as err:
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
