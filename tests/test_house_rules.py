"""House rules, checked on the source: the import contracts between the packages, and the size limits.

- ``flowalign.rewards`` and ``flowalign.samplers`` import nothing else of flowalign (plug-ins depend on them alone);
- algorithms, methods and modifiers never import a concrete generator adapter (only the Generator interface);
- the CLI and the app use the public API (no private names, no internals of training or the adapters);
- no source file over 400 lines; no trainer function over 60 lines.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: repository folder -> the package it installs as
PACKAGES = {"flowalign": "flowalign", "app": "flowalign.app", "rewards": "flowalign.rewards",
            "samplers": "flowalign.samplers"}
PUBLIC = ("flowalign", "flowalign.config", "flowalign.errors", "flowalign.generators", "flowalign.generators.base",
          "flowalign.inference", "flowalign.optimize", "flowalign.optimize_config", "flowalign.evaluate",
          "flowalign.rewards", "flowalign.methods", "flowalign.training", "flowalign.training.run",
          "flowalign.toy.build", "flowalign.app", "flowalign.checks", "flowalign.files", "flowalign.config_keys",
          "flowalign.sharing", "flowalign.prompt_sets")


def sources() -> dict[str, Path]:
    """Module name -> file, for every module the project installs."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every flowalign import of a module, relative ones resolved."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "flowalign"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "flowalign":
                out += [(target, alias.name) for alias in node.names]
    return out


def modules_named(target: str, name: str | None, known: dict[str, Path]) -> list[str]:
    """The module an import pulls in: ``from a import b`` is module ``a.b`` when that exists, else ``a``."""
    return [f"{target}.{name}"] if name and f"{target}.{name}" in known else [target]


def test_the_map_finds_the_sources():
    known = sources()
    assert {"flowalign.rewards.base", "flowalign.samplers.rollout", "flowalign.app.ui",
            "flowalign.training.trainer"} <= set(known)


@pytest.mark.parametrize("package", ["flowalign.rewards", "flowalign.samplers"])
def test_rewards_and_samplers_import_nothing_else_of_flowalign(package):
    known = sources()
    bad = [(module, imported) for module, path in known.items() if module.startswith(package)
           for target, name in imports(module, path) for imported in modules_named(target, name, known)
           if not imported.startswith(package)]
    assert not bad, bad


def test_algorithms_and_methods_never_import_a_generator_adapter():
    known = sources()
    allowed = {"flowalign.generators", "flowalign.generators.base"}
    bad = [(module, imported) for module, path in known.items()
           if module.startswith(("flowalign.algorithms", "flowalign.methods", "flowalign.modifiers"))
           for target, name in imports(module, path) for imported in modules_named(target, name, known)
           if imported.startswith("flowalign.generators") and imported not in allowed]
    assert not bad, bad


def test_cli_and_app_use_the_public_api():
    known = sources()
    bad = []
    for module, path in known.items():
        if module != "flowalign.cli" and not module.startswith("flowalign.app"):
            continue
        for target, name in imports(module, path):
            if name and name.startswith("_") and name != "__version__":
                bad.append((module, f"{target}.{name}"))
            for imported in modules_named(target, name, known):
                if imported not in PUBLIC and not imported.startswith("flowalign.app") \
                        and not (imported.startswith("flowalign.rewards") and imported.count(".") <= 2):
                    bad.append((module, imported))
    assert not bad, bad


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists packages explicitly (the folders are mapped): a new package must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, path in sources().items() if path.name == "__init__.py"}
    folders = {p for f in PACKAGES for p in (ROOT / f).rglob("*") if p.is_dir() and list(p.glob("*.py"))}
    missing = [str(p) for p in folders if not (p / "__init__.py").is_file()]
    assert not missing, missing  # a folder without __init__.py would be left out of the package list
    assert packages == listed, packages ^ listed


def test_no_source_file_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in sources().values()
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_no_trainer_function_over_60_lines():
    long = {}
    for path in (ROOT / "flowalign" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long[f"{path.name}:{node.name}"] = length
    assert not long, long
