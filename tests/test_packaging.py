"""One import namespace: the repository's rewards/, samplers/ and app/ install as flowalign.rewards,
flowalign.samplers and flowalign.app, from a built wheel and from an editable install, and nothing installs a
top-level ``rewards`` or ``samplers`` module.

Each install goes into a fresh virtual environment that borrows the heavy dependencies (torch, diffusers, ...)
from this one through a ``.pth`` line, so nothing is downloaded; the check runs from an empty folder, where
the repository's own folders cannot be picked up by accident."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, sys
import flowalign, flowalign.rewards, flowalign.samplers, flowalign.app, flowalign.rewards.toy
from flowalign import rewards
assert rewards.load("toy/ink").name == "toy/ink"  # package data (toy weights) and the registry's module paths
import flowalign.methods, flowalign.training
assert {"flow_grpo", "dragon"} <= set(flowalign.methods.methods()) and "kl" in flowalign.methods.modifiers()
for top in ("rewards", "samplers", "app"):
    try:
        importlib.import_module(top)
    except ImportError:
        continue
    sys.exit(f"a top-level '{top}' module is importable")
print(flowalign.rewards.__file__)
"""


def _fresh_venv(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment; the flowalign install itself does not (a .pth's own .pth
    # files are not read, so this environment's editable flowalign stays invisible there)
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-build-isolation", *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _check(python: Path, cwd: Path) -> str:
    proc = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.slow
def test_wheel_installs_one_namespace(tmp_path):
    dist, source = tmp_path / "dist", tmp_path / "source"  # a copy: building leaves build/ in the source tree
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "outputs", "runs",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(dist), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(dist.glob("flowalign-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"flowalign"}, tops
    assert "flowalign/rewards/toy/weights/classifier/model.safetensors" in names
    assert "flowalign/app/ui.py" in names and "flowalign/samplers/rollout.py" in names
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, str(wheel))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert str(tmp_path / "venv") in _check(python, empty)


@pytest.mark.slow
def test_editable_install_maps_the_repository_folders(tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, "-e", str(REPO))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert _check(python, empty) == str(REPO / "rewards" / "__init__.py")
