"""The README's Python example runs as written (in a temporary output folder) and its links resolve."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "output_dir=outputs/quick" in code
    monkeypatch.chdir(ROOT)
    exec(compile(code.replace("outputs/quick", str(tmp_path / "quick")), "README.md", "exec"), {})
    assert (tmp_path / "quick" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_nothing_in_the_repository_cites_notes_outside_it():
    names = ["grpo_" + "family.md", "noise_critics_" + "distributional", "DESIGN" + ".md", "ecosystem" + ".md",
             "beyond_" + "seeds", "shared/" + "reference"]  # spelled apart so this file does not match itself
    pattern = re.compile("|".join(re.escape(name) for name in names))
    files = [p for ext in ("*.py", "*.md", "*.yaml", "*.toml") for p in ROOT.rglob(ext)
             if not {".venv", "build", ".git", "outputs"} & set(p.relative_to(ROOT).parts)]
    found = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())]
    assert not found, found
