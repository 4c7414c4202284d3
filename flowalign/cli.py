"""The ``flowalign`` command: train | embed-prompts | generate | evaluate | optimize | toy build | rewards list | app.

Errors a user can fix (bad config, missing file, unknown reward) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file and the key=value overrides (the first positional may already be an override)."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    return config, overrides


def _cli_prompts(args: argparse.Namespace, command: str) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompt-file`` (one per line); one line if none."""
    from .config import ConfigError

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file: file '{path}' not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{command}: give at least one --prompt or a --prompt-file")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> None:
    from .config import ConfigError
    from .generators import load_generator
    from .inference import generate, save_grid

    prompts = _cli_prompts(args, "generate")
    for name, value, low in (("--num", args.num, 1), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name}: expected an integer >= {low}, got {value}")
    generator = load_generator(args.model, args.dtype, local_files_only=args.local_files_only)
    batch = [p for p in prompts for _ in range(args.num)]
    media = generate(generator, batch, steps=args.steps, guidance=args.guidance, seed=args.seed,
                     negative_prompt=args.negative_prompt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if generator.modality == "video":  # one animation: frame t is the grid of every clip's frame t
        from .inference import save_video

        out = out if out.suffix.lower() in (".gif", ".mp4") else out.with_suffix(".gif")
        save_video(media, out, nrow=args.num if len(prompts) > 1 else min(args.num, 10))
        print(f"wrote {len(batch)} clips to {out}")
        return
    if generator.modality == "audio":  # one 16-bit WAV file per sample
        from .inference import sample_rate_of, save_wav

        paths = save_wav(media, out, sample_rate_of(generator))
        print(f"wrote {len(paths)} clips to {paths[0]}" + (f" ... {paths[-1].name}" if len(paths) > 1 else ""))
        return
    save_grid(media, out, nrow=args.num if len(prompts) > 1 else min(args.num, 10))
    print(f"wrote {len(batch)} samples to {out}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluate import evaluate

    evaluate(load_config(*_config_and_overrides(args)))


def _cmd_train(args: argparse.Namespace) -> None:
    from .training.run import train

    train(*_config_and_overrides(args), resume=args.resume_from_checkpoint)


def _cmd_embed_prompts(args: argparse.Namespace) -> None:
    """Encode a run's prompts (its prompt file and negative prompt) once and save them for train.prompt_embeds."""
    from .config import ConfigError, load_config
    from .generators import load_generator
    from .generators.prompt_cache import PromptCache
    from .training.prompts import read_prompt_file

    cfg = load_config(*_config_and_overrides(args))
    source = args.prompt_file or cfg.train.prompt_file
    if not source:
        raise ConfigError("embed-prompts: give --prompt-file or set train.prompt_file (the toy prompt generator's "
                          "prompts are encoded on the fly: use train.cache_prompts)")
    if not Path(source).is_file():
        raise ConfigError(f"embed-prompts: prompt file '{source}' not found")
    prompts = list(dict.fromkeys(read_prompt_file(source)))
    gen = load_generator(cfg.model.name, cfg.model.dtype, local_files_only=cfg.model.local_files_only,
                         **cfg.model.options)
    cache = PromptCache().bind(gen)
    negative = cfg.sample.negative_prompt if cfg.train.guidance != 1.0 or cfg.sample.guidance != 1.0 else None
    from tqdm import tqdm

    for start in tqdm(range(0, len(prompts), args.batch_size), desc="embed-prompts", unit="batch"):
        gen.encode(prompts[start:start + args.batch_size], negative_prompt=negative)
    out = cache.save(args.out or Path(cfg.output_dir) / "prompt_embeds.safetensors")
    print(f"wrote embeddings of {len(prompts)} prompts" + (" and the negative prompt" if negative is not None else "")
          + f" to {out}")


def _cmd_toy_build(args: argparse.Namespace) -> None:
    from .toy.build import build_all

    targets = build_all(quick=args.quick, out=Path(args.out) if args.out else None, seed=args.seed)
    for name, path in targets.items():
        print(f"{name}: {path}")


def _cmd_rewards_list(args: argparse.Namespace) -> None:
    from . import rewards
    for name in rewards.available():
        print(name)


def _cmd_app(args: argparse.Namespace) -> None:
    from .app import load_app_config, serve

    overrides = list(args.overrides) + ([f"server.port={args.port}"] if args.port is not None else [])
    cfg = load_app_config(args.config, overrides)
    if args.host:
        cfg.server.host = args.host
    serve(cfg)


def _cmd_optimize(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .config import ConfigError
    from .generators import load_generator
    from .optimize import optimize_iter, save_outputs

    prompts = _cli_prompts(args, "optimize")
    for name, value in (("--steps", args.steps), ("--iterations", args.iterations), ("--render-steps", args.render_steps),
                        ("--k", args.k), ("--n", args.n)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
    generator = load_generator(args.model, args.dtype, local_files_only=args.local_files_only)
    if args.method == "best-of-n":
        options = {"n": args.n or args.iterations, "steps": args.steps, "guidance": args.guidance}
    else:
        options = {"iterations": args.iterations, "lr": args.lr, "optimizer": args.optimizer, "steps": args.steps,
                   "render_steps": args.render_steps, "guidance": args.guidance, "reg_weight": args.reg_weight,
                   "grad_clip": args.grad_clip, "checkpointing": args.checkpointing, "truncate": args.truncate}
        if args.method == "carinox":
            options["k"] = args.k
    bar, last = None, None
    for last in optimize_iter(generator, prompts, args.reward or ["toy/bold_digit"], args.method, args.seed, **options):
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
    save_outputs(result, args.out)
    if result.stopped:
        print(f"stopped: {result.stopped}")
    print(f"{args.method}: best reward {float(result.rewards.mean()):.4g} (mean over {len(prompts)} prompts), "
          f"{result.nfe} NFE; wrote {Path(args.out) / 'best.png'}, iterations/, rewards.csv, rewards.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample images from a model (ODE, CFG) into a PNG grid")
    gen.add_argument("--model", default="toy/digits", help="toy/digits, a hub id or a local diffusers folder")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompt-file", help="a text file, one prompt per line")
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

    emb = sub.add_parser("embed-prompts", help="precompute a run's prompt embeddings (train.prompt_embeds)")
    emb.add_argument("config", nargs="?", default=None, help="a YAML config (its model, prompt file, negative prompt)")
    emb.add_argument("overrides", nargs="*", help="key=value overrides")
    emb.add_argument("--prompt-file", default=None, help="one prompt per line (default: train.prompt_file)")
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
    opt.add_argument("--config", default=None, help="a YAML of these options (e.g. configs/reno/sd_turbo.yaml); "
                     "options given on the command line win")
    opt.add_argument("--method", default="reno", choices=["reno", "carinox", "best-of-n"])
    opt.add_argument("--model", default="toy/digits", help="toy/digits, a hub id or a local diffusers folder")
    opt.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    opt.add_argument("--prompt-file", help="a text file, one prompt per line")
    opt.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]", help="a reward (repeatable)")
    opt.add_argument("--steps", type=int, default=None, help="ODE steps while optimising (model default if unset)")
    opt.add_argument("--render-steps", type=int, default=None, help="steps to render the best noise with")
    opt.add_argument("--iterations", type=int, default=50, help="optimisation iterations (best-of-n: N)")
    opt.add_argument("--lr", type=float, default=5.0)
    opt.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    opt.add_argument("--reg-weight", type=float, default=0.01, help="λ of the χ-norm regulariser")
    opt.add_argument("--grad-clip", type=float, default=0.1)
    opt.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory)")
    opt.add_argument("--truncate", type=int, default=None, help="backpropagate through the last K steps only")
    opt.add_argument("--k", type=int, default=3, help="carinox: seeds explored")
    opt.add_argument("--n", type=int, default=None, help="best-of-n: samples per prompt (default --iterations)")
    opt.add_argument("--guidance", type=float, default=None, help="CFG scale (model default if unset)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    opt.add_argument("--local-files-only", action="store_true")
    opt.add_argument("--out", default="outputs/optimize")
    opt.set_defaults(func=_cmd_optimize)

    rw = sub.add_parser("rewards", help="reward models").add_subparsers(dest="rewards_command", required=True)
    rw.add_parser("list", help="every reward name rewards.load accepts").set_defaults(func=_cmd_rewards_list)

    app = sub.add_parser("app", help="the Gradio app: compare base vs aligned, optimise noise live, view runs")
    app.add_argument("--config", default=None, help="an app config (YAML); default: the toy world")
    app.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    app.add_argument("--port", type=int, default=None, help="port (default 7860)")
    app.add_argument("overrides", nargs="*", help="key=value overrides, e.g. limits.max_steps=20")
    app.set_defaults(func=_cmd_app)
    return parser


def _with_config_defaults(parser: argparse.ArgumentParser, command: str, path: str,
                          argv: list[str] | None) -> argparse.Namespace:
    """Re-parse with a YAML file's keys (the option names, ``-`` or ``_``) as defaults; ``reward`` may be a
    mapping name -> weight. Unknown keys are one-line errors naming the file."""
    import yaml

    from .config import ConfigError

    sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    if not Path(path).is_file():
        raise ConfigError(f"--config: file '{path}' not found")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    known = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "func"):
            raise ConfigError(f"{path}: unknown option '{key}' (allowed: {', '.join(sorted(known - {'help', 'config'}))})")
        if dest == "reward" and isinstance(value, dict):
            value = [f"{name}:{weight}" for name, weight in value.items()]
        if dest == "prompt" and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    given = parser.parse_args(argv)
    sub.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for dest in ("reward", "prompt"):  # appending options: the command line's list replaces the file's
        if getattr(given, dest) is not None:
            setattr(args, dest, getattr(given, dest))
    return args


def main(argv: list[str] | None = None) -> int:
    from .errors import FlowalignError
    from .rewards import RewardError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None) and args.func is _cmd_optimize:
            args = _with_config_defaults(parser, "optimize", args.config, argv)
        args.func(args)
    except (FlowalignError, RewardError) as err:
        print(f"flowalign: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
