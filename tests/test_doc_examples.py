"""Every code block in the README and docs/ is checked, so examples cannot rot.

- ``python``: run as written (in a temporary folder, ``outputs/...`` redirected there). A block marked
  ``<!-- example: template -->`` (code a user adapts: a new adapter, a plug-in) or ``<!-- example: needs ... -->``
  (weights, a GPU, a running app) is compiled; one marked ``<!-- example: excerpt of PATH -->`` must appear in that
  file, line for line and in order.
- ``bash``: each ``flowalign`` command (also behind ``accelerate launch ... -m``) is parsed by the CLI's own parser;
  a command that trains, evaluates, optimises or serves has its config and overrides validated as the command would
  (placeholder data paths such as ``/data/prompts.txt`` stand in as files); the cheap ones (``methods``, ``rewards
  list``, ``keys``, ``--version``, ``generate`` on the toy) run. ``make`` targets exist in the Makefile, ``pip
  install`` extras in pyproject.toml. Training itself is what the learning tests and ``make demo``'s test run.
- ``yaml``: a run config (or a part of one) loads with ``load_config``; an optimise config with
  ``load_optimize_config``; the app's with ``load_app_config``. ``json`` and ``toml`` parse.
- Blocks without a language are printed output and formulas, not code.

The plug-in example of docs/rewards.md is installed for every check (its package written from the docs' own block,
its entry point registered), so the commands and code that use ``acme/sharpness`` run as a user's would.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from flowalign.cli import _config_and_overrides, build_parser, main, parse
from flowalign.config import load_config
from flowalign.optimize_config import load_optimize_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!-- example: (.+?) -->\s*$")
PLACEHOLDER = re.compile(r"(?<![\w.])/(?:data|models)/[\w./-]+")
SETUP = ("huggingface-cli download", "export ", "hf auth login")  # the user's environment: nothing to check here
CHEAP = {"methods", "rewards", "keys"}


@pytest.fixture(autouse=True)
def acme_plugin(tmp_path_factory, monkeypatch):
    """docs/rewards.md's plug-in, installed: its package from the docs' block, its entry point registered."""
    from importlib.metadata import EntryPoint

    from flowalign.rewards import registry

    (code,) = [code for _, code, _ in blocks("python") if code.startswith("# acme_rewards/__init__.py")]
    package = tmp_path_factory.getbasetemp() / "plugin" / "acme_rewards"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(package.parent))
    entry = EntryPoint("acme/sharpness", "acme_rewards:Sharpness", registry.ENTRY_POINT_GROUP)
    plugins = registry._plugins
    monkeypatch.setattr(registry, "_plugins", lambda: {**plugins(), entry.name: entry})


def blocks(lang: str) -> list[tuple[str, str, str | None]]:
    """(where, code, marker) of every ``lang`` block: ``where`` is FILE:LINE."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                before = text[:m.start()].rstrip("\n").splitlines()
                marker = MARK.search(before[-1]) if before else None
                line = text[:m.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", m.group(2), marker.group(1) if marker else None))
    return found


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    lines = (re.split(r"\s+#", " " + raw, maxsplit=1)[0].strip() for raw in re.sub(r"\\\n\s*", " ", code).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def with_placeholders(command: str, folder: Path) -> str:
    """``/data/...`` and ``/models/...`` paths replaced by files of that name in ``folder`` (one prompt each)."""
    def stand_in(match: re.Match) -> str:
        path = folder / match.group(0).lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a photo of a cat\n")
        return str(path)

    return PLACEHOLDER.sub(stand_in, command)


@pytest.mark.parametrize("where,code,marker", blocks("bash"), ids=[b[0] for b in blocks("bash")])
def test_shell_commands_parse_and_their_configs_validate(where, code, marker, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    makefile = (ROOT / "Makefile").read_text()
    for command in commands(code):
        if command.startswith(SETUP):
            continue
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target '{target}'"
            continue
        if command.startswith("pip install"):
            extras = re.findall(r"\[([\w,]+)\]", command)
            for extra in (e for group in extras for e in group.split(",")):
                assert extra in pyproject["project"]["optional-dependencies"], f"{where}: no extra '{extra}'"
            continue
        words = shlex.split(with_placeholders(command, tmp_path))
        if words[:2] == ["accelerate", "launch"]:
            assert "-m" in words and words[words.index("-m") + 1] == "flowalign", f"{where}: {command}"
            words = ["flowalign", *words[words.index("-m") + 2:]]
        assert words[0] == "flowalign", f"{where}: an unknown command: {command}"
        if "..." in words:  # an elided command ("accelerate launch ... -m flowalign ...") is parsed from -m on
            words.remove("...")
        _check_flowalign(words[1:], where, tmp_path, capsys)


def _check_flowalign(args: list[str], where: str, tmp_path: Path, capsys) -> None:
    """Parse as the CLI does; validate the config of the commands that load models; run the cheap ones."""
    if args == ["--version"] or args[0] in CHEAP or (args[0] == "generate" and "--model" not in args):
        if args[0] == "generate":
            args = [*args, "--out", str(tmp_path / "generated.png")]
        try:
            code = main(args)
        except SystemExit as stop:  # --version prints and exits
            code = stop.code
        assert code == 0, f"{where}: flowalign {' '.join(args)}: {capsys.readouterr().err}"
        return
    parsed = parse(build_parser(), args)
    if parsed.command in ("train", "evaluate", "embed-prompts"):
        load_config(*_config_and_overrides(parsed))
    elif parsed.command == "optimize":
        config, overrides = _config_and_overrides(parsed)
        flags = [f"prompts={parsed.prompt}"] if parsed.prompt else []
        flags += [f"prompt_file={parsed.prompt_file}"] if parsed.prompt_file else []
        load_optimize_config(config, [*overrides, *flags])
    elif parsed.command == "app":
        from flowalign.app import load_app_config

        load_app_config(parsed.config if parsed.config and Path(parsed.config).is_file() else None,
                        list(parsed.overrides))


@pytest.mark.parametrize("where,code,marker", blocks("yaml"), ids=[b[0] for b in blocks("yaml")])
def test_yaml_examples_are_valid_configs(where, code, marker, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = yaml.safe_load(with_placeholders(code, tmp_path))
    config = tmp_path / "example.yaml"
    config.write_text(yaml.safe_dump(data))
    if {"models", "checkpoints", "runs_root"} & set(data):
        from flowalign.app import load_app_config

        load_app_config(config)
    elif "out" in data or data.get("method") in ("reno", "carinox", "best-of-n"):
        load_optimize_config(config)
    else:
        load_config(config)


@pytest.mark.parametrize("lang", ["json", "toml"])
def test_data_examples_parse(lang):
    for where, code, _ in blocks(lang):
        (json.loads if lang == "json" else tomllib.loads)(code.replace('"..."', '"x"'))


def test_jsonl_examples_are_prompt_rows():
    """Each line of a JSON Lines block is what a .jsonl prompt file holds: an object with a "prompt" string."""
    rows = [json.loads(line) for _, code, _ in blocks("jsonl") for line in code.splitlines() if line.strip()]
    assert rows and all(isinstance(row, dict) and isinstance(row.get("prompt"), str) for row in rows)


PYTHON = blocks("python")


@pytest.mark.parametrize("where,code,marker", [b for b in PYTHON if b[2] is not None],
                         ids=[b[0] for b in PYTHON if b[2] is not None])
def test_marked_python_examples_compile_or_are_excerpts(where, code, marker):
    assert marker == "template" or marker.startswith(("needs ", "excerpt of ")), f"{where}: unknown mark {marker}"
    if not marker.startswith("excerpt of "):  # an excerpt may be a fragment (a dict's entry)
        compile(code, where, "exec")
    else:
        source = [line.strip() for line in (ROOT / marker.removeprefix("excerpt of ")).read_text().splitlines()]
        at = 0
        for line in (line.strip() for line in code.splitlines() if line.strip()):  # an excerpt may be dedented
            assert line in source[at:], f"{where}: '{line}' is not in {marker} (after line {at})"
            at = source.index(line, at) + 1


@pytest.mark.slow
@pytest.mark.parametrize("where,code,marker", [b for b in PYTHON if b[2] is None],
                         ids=[b[0] for b in PYTHON if b[2] is None])
def test_python_examples_run(where, code, marker, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = re.sub(r"outputs/(\w+)", lambda m: str(tmp_path / m.group(1)), code)
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})
