"""Seeded hostile input for the CLI: configs mutated from the shipped ones, and command lines. Each case runs
in-process through ``flowalign.cli.main`` under a time limit; its outcome is ``ok`` (status 0, or 2 with one
``flowalign: error:`` line), ``long`` (a valid run still going when the limit came, having completed at least one
training iteration or one batch of sampling: each is bounded by the caps, so only their count is large),
``traceback`` (an exception escaped), ``many-lines`` (an error of more than one line) or ``unbounded`` (out of time
before any unit of work was done: something grew without a cap)."""
from __future__ import annotations

import contextlib
import io
import random
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HOSTILE = [float("nan"), float("inf"), float("-inf"), -1, 0, 2 ** 63, 10 ** 12, 1e30, "", "x" * 5000, [], {}, None,
           True, "[1,", 1.5, "nan", ".inf", {"deep": {"er": {"still": 1}}}, ["a", 1, None], "é\u0000\x7f", -0.0]
#: Values of the right type that are far too large or small for what they count.
EXTREME = [10 ** 6, 10 ** 9, 2 ** 31, 1e-30, 1e12, 65536]
#: A tiny budget written into each config before it is mutated, so configs that stay valid finish quickly.
TINY = {"train": {"iterations": 1, "prompts_per_iteration": 2, "steps": 6, "eval_prompts": 2, "eval_steps": 2,
                  "checkpoint_every": 1, "rollout_batch": 16, "train_batch": 16, "updates_per_iteration": 1},
        "eval": {"toy_prompts": 2}, "sample": {"steps": 2}}


class Unbounded(BaseException):
    """Raised in the main thread when a case outlives its time limit."""


@dataclass
class Outcome:
    kind: str  # ok | traceback | many-lines | unbounded
    code: int | None
    detail: str


def run_case(argv: list[str], limit_s: float) -> Outcome:
    """``flowalign argv`` in this process, stopped after ``limit_s`` seconds."""
    from accelerate.state import AcceleratorState

    from flowalign import inference
    from flowalign.cli import main
    from flowalign.training.trainer import Trainer

    completed, iterate, ode = [], Trainer._iterate, inference.euler_ode

    def counted(self, bar):
        iterate(self, bar)
        completed.append("iteration")

    def counted_ode(*args, **kwargs):
        out = ode(*args, **kwargs)
        completed.append("sampling batch")
        return out

    def expire(*_):
        raise Unbounded()

    err, out = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    Trainer._iterate, inference.euler_ode = counted, counted_ode
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except Unbounded:
        if completed:
            return Outcome("long", None, f"{len(completed)} units of work ({completed[-1]}) in {limit_s:g} s")
        return Outcome("unbounded", None, f"ran past {limit_s:g} s")
    except SystemExit as exit_:  # argparse's usage errors (status 2) and --version
        code = exit_.code if isinstance(exit_.code, int) else 1
        return Outcome("ok" if code in (0, 2) else "traceback", code, err.getvalue()[-300:])
    except BaseException:  # noqa: BLE001 - any escape is what the fuzzing looks for
        return Outcome("traceback", None, traceback.format_exc()[-1500:])
    finally:
        Trainer._iterate, inference.euler_ode = iterate, ode
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        AcceleratorState._reset_state(reset_partial_state=True)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("flowalign: error:")]
    if code == 2 and len(errors) != 1:
        return Outcome("many-lines", code, err.getvalue()[-1500:])
    if "Traceback" in err.getvalue():
        return Outcome("traceback", code, err.getvalue()[-1500:])
    return Outcome("ok", code, errors[0] if errors else "")


# ------------------------------------------------------------------------------------------------ configs

def shipped_configs() -> list[tuple[str, Path]]:
    """(command, path) for every shipped run config the CLI takes."""
    found = [("train", p) for p in sorted((REPO / "configs").glob("*/*.yaml"))
             if p.parent.name not in ("accelerate", "reno")]
    return found + [("optimize", p) for p in sorted((REPO / "configs" / "reno").glob("*.yaml"))]


def _leaves(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _leaves(value, (*prefix, key))


def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _with_budget(data: dict, command: str) -> dict:
    if command != "train":
        return data
    for section, values in TINY.items():
        if isinstance(data.get(section, {}), dict):
            data.setdefault(section, {}).update(values)
    return data


def mutated_configs(seed: int, count: int, folder: Path) -> list[tuple[str, Path, str]]:
    """``count`` (command, file, what was mutated) cases, each a shipped config with one to three mutations."""
    rng = random.Random(seed)
    shipped = shipped_configs()
    cases = []
    for i in range(count):
        command, source = shipped[i % len(shipped)]
        data = _with_budget(yaml.safe_load(source.read_text()) or {}, command)
        data["output_dir" if command == "train" else "out"] = str(folder / f"out-{i}")
        what = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            what.append(_mutate(data, rng))
        target = folder / f"case-{i}.yaml"
        text = yaml.safe_dump(data, allow_unicode=True)
        raw, note = _mutate_bytes(text.encode(), rng)
        target.write_bytes(raw)
        cases.append((command, target, f"{source.name}: {'; '.join(what + ([note] if note else []))}"))
    return cases


def _mutate(data: dict, rng: random.Random) -> str:
    paths = list(_leaves(data))
    path = rng.choice(paths)
    roll = rng.random()
    if roll < 0.65:
        value = rng.choice(HOSTILE + EXTREME)
        _set(data, path, value)
        return f"{'.'.join(map(str, path))}={value!r:.40}"
    if roll < 0.75:
        node = data
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
        return f"removed {'.'.join(map(str, path))}"
    if roll < 0.85:
        _set(data, path[:-1] + (f"unknown_{rng.randint(0, 99)}",), 1)
        return f"unknown key beside {'.'.join(map(str, path))}"
    if roll < 0.93:
        data["reward"] = {"weights": rng.choice([{}, {"toy/bold_digit": float("nan")}, {"no/such": 1.0},
                                                 {"toy/bold_digit": -1e308}, []])}
        return f"reward={data['reward']!r}"
    deep = node = {}
    for _ in range(rng.choice([20, 100])):
        node["a"] = {}
        node = node["a"]
    _set(data, path, deep)
    return f"{'.'.join(map(str, path))}=deeply nested"


def _mutate_bytes(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    roll = rng.random()
    if roll < 0.80:
        return raw, ""
    if roll < 0.85:
        return raw[: rng.randint(0, len(raw))], "truncated"
    if roll < 0.90:
        at = rng.randint(0, len(raw))
        return raw[:at] + b"\xff\xfe\xc3" + raw[at:], "invalid UTF-8"
    if roll < 0.95:
        return bytes(rng.getrandbits(8) for _ in range(300)), "binary"
    return b"[" * 5000 + b"]" * 5000, "5000-deep nesting"


# ------------------------------------------------------------------------------------------------ command lines

def hostile_files(folder: Path) -> dict[str, str]:
    """Files and folders a user might point any path option at by mistake."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"folder": folder / "a-folder", "binary": folder / "binary.txt", "latin1": folder / "latin1.txt",
             "empty": folder / "empty.txt", "blocker": folder / "blocker", "big": folder / "big.txt",
             "model-truncated": folder / "model-truncated", "model-badjson": folder / "model-badjson",
             "equals": folder / "with=equals.yaml", "prompts": folder / "prompts.txt"}
    files["folder"].mkdir(exist_ok=True)
    files["binary"].write_bytes(bytes(range(256)) * 4)
    files["latin1"].write_bytes("un chiffre \xe9crit".encode("latin-1"))
    files["empty"].write_text("")
    files["blocker"].write_text("")
    files["prompts"].write_text("a handwritten three\na bold seven\n")
    with open(files["big"], "wb") as f:  # 40 MB of one prompt per line
        f.write(b"a handwritten seven\n" * 2_000_000)
    for name, broken in (("model-truncated", b'{"_class_name": "StableDiffusion3Pipeline"'),
                         ("model-badjson", b"\xff not json")):
        files[name].mkdir(exist_ok=True)
        (files[name] / "model_index.json").write_bytes(broken)
    files["equals"].write_text((REPO / "configs" / "toy" / "digits_flow_grpo.yaml").read_text())
    import shutil

    shipped = REPO / "flowalign" / "toy" / "weights" / "digits"
    for name in ("toy-truncated", "toy-badjson"):  # the toy model's folder layout, one file broken
        files[name] = folder / name
        shutil.rmtree(files[name], ignore_errors=True)
        shutil.copytree(shipped, files[name])
    weights = files["toy-truncated"] / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (files["toy-badjson"] / "transformer" / "config.json").write_text('{"_class_name": ')
    paths = {k: str(v) for k, v in files.items()}
    return {**paths, "missing": str(folder / "missing.txt"), "dev-zero": "/dev/zero",
            "under-file": str(files["blocker"] / "x.png")}


def cli_cases(seed: int, count: int, folder: Path) -> list[list[str]]:
    """``count`` seeded command lines: each command with one to three hostile flags or overrides (and the rest
    valid and small), in a random order."""
    rng = random.Random(seed)
    files = hostile_files(folder / "files")
    numbers = ["0", "-1", "nan", "inf", "1e3", str(2 ** 70), "100000", "abc", "", "3"]
    paths = [files[k] for k in ("folder", "binary", "latin1", "empty", "big", "missing", "dev-zero", "under-file")]
    config = str(REPO / "configs" / "toy" / "digits_flow_grpo.yaml")
    small = ["train.iterations=1", "train.prompts_per_iteration=2", "train.steps=4", "train.eval_prompts=2",
             "train.eval_steps=2", "train.checkpoint_every=1", "flow_grpo.group_size=2"]
    overrides = ["train.lr=[1,", "=1", "train..lr=1", "train.lr", "train=1", "train.lr=.nan", "x" * 3000 + "=1",
                 "eval.toy_prompts=1000000000000", "train.timestep_fraction=.nan", "reward.weights={}",
                 "reward.weights={toy/bold_digit: .nan}", "train.lora_rank=9223372036854775808", "model.name=",
                 f"train.prompt_file={rng.choice(paths)}", f"eval.prompt_file={rng.choice(paths)}",
                 "train.prompts_per_iteration=100000000", "eval.samples_per_prompt=1000000000",
                 f"output_dir={files['under-file']}", f"output_dir={files['blocker']}", "sample.steps=2",
                 "reward.timeout_s=.inf", "train.seed=-1", "train.iterations=1e3",
                 f"model.name={files['toy-truncated']}", f"model.name={files['toy-badjson']}"]
    models = ["toy/digits", "", "nope/none", files["missing"], files["model-truncated"], files["model-badjson"],
              files["blocker"], "/", "toy/unknown", "toy/video", files["toy-truncated"], files["toy-badjson"]]
    generators = {
        "--model": models, "--num": numbers, "--steps": numbers, "--guidance": numbers, "--seed": numbers,
        "--out": [files["folder"], str(folder / "x.xyz"), files["under-file"], "", str(folder / "ok.png"),
                  files["blocker"]],
        "--dtype": ["float32", "int8", "bfloat16"], "--prompt-file": paths, "--prompt": ["", "x" * 100_000, "a 3"],
        "--negative-prompt": ["", "x" * 100_000]}
    cases = []
    for _ in range(count):
        command = rng.choice(["generate", "generate", "train", "train", "evaluate", "optimize", "embed-prompts",
                              "app", "other"])
        if command == "generate":
            args = ["generate", "--prompt", "a 3", "--num", "2", "--steps", "3", "--out", str(folder / "g.png")]
            for flag in rng.sample(sorted(generators), rng.randint(1, 3)):
                args += [flag, rng.choice(generators[flag])]
        elif command in ("train", "evaluate"):
            first = rng.choice([config] * 4 + [files["equals"], files["folder"], files["missing"], files["binary"],
                                               files["dev-zero"], files["big"]])
            extra = rng.sample(overrides, rng.randint(1, 3))
            args = [command, first, *small, f"output_dir={folder / 'run'}", *extra]
            if command == "train" and rng.random() < 0.3:
                args += ["--resume_from_checkpoint", rng.choice(["latest", files["folder"], files["missing"]])]
        elif command == "optimize":
            args = ["optimize", str(REPO / "configs" / "reno" / "toy_digits.yaml"), "reno.iterations=2",
                    "reno.render_steps=2", "--out", str(folder / "opt")]
            args += rng.choice([["--prompt-file", rng.choice(paths)], ["--out", files["under-file"]],
                                ["--prompt", ""], ["reno.iterations=1000000000"], ["seed=-1"], ["reno.lr=nan"],
                                ["method=best-of-n", "best_of_n.n=100000"], ["--prompt", "a 3"]])
        elif command == "embed-prompts":
            args = ["embed-prompts", config, "--prompt-file", rng.choice(paths + [files["prompts"]]),
                    "--batch-size", rng.choice(numbers), "--out", rng.choice([str(folder / "e.safetensors"),
                                                                              files["under-file"]])]
        elif command == "app":  # every app case is invalid: a valid one would serve until stopped
            args = ["app", *rng.choice([["--port", "-1"], ["--port", "70000"], ["--config", files["missing"]],
                                        ["--config", files["binary"]], ["limits.max_steps=nan"], ["nope=1"],
                                        ["--config", files["dev-zero"]], ["--port", "abc"]])]
        else:
            args = rng.choice([["--version"], ["methods"], ["rewards", "list"], ["nope"], [], ["toy"],
                               ["rewards"], ["--help"]])
        if len(args) > 1 and rng.random() < 0.5:  # flags and overrides in any order after the command
            rest = args[1:]
            pairs, i = [], 0
            while i < len(rest):
                takes_value = rest[i].startswith("--") and i + 1 < len(rest) and rest[i] not in ("--version", "--help")
                pairs.append(rest[i:i + 2] if takes_value else rest[i:i + 1])
                i += len(pairs[-1])
            rng.shuffle(pairs)
            args = [args[0], *[a for pair in pairs for a in pair]]
        cases.append(args)
    return cases
