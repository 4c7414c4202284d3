"""``make demo`` prints the README's figures, and the links resolve (every code block is checked by
tests/test_doc_examples.py)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_prints_the_readme_figures_and_its_monitor_stays_quiet(tmp_path, monkeypatch):
    """``make demo``'s command (the Makefile's, into a temporary folder) prints the README's demo block line for
    line, from its own report/metrics.json; and the hacking monitor, on for the demo, raises no alarm."""
    from benchmarks import demo
    from flowalign.training.run import train

    target = re.search(r"^demo:.*\n\t\$\(BIN\)/flowalign train (\S+) (.*)$", (ROOT / "Makefile").read_text(), re.M)
    config, overrides = target.group(1), target.group(2).split()
    assert (config, overrides) == (demo.CONFIG, demo.OVERRIDES)  # benchmarks/demo.py renders the same run
    block = re.search(r"<!-- figures: demo -->\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    reward_line, monitor_line = block.group(1).splitlines()
    monkeypatch.chdir(ROOT)
    lines = []
    metrics = train(config, [*overrides, f"output_dir={tmp_path}"], progress=False, print_fn=lines.append)
    assert lines[0].startswith(f"{reward_line}; report in ") and lines[1] == monitor_line
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert reward_line.endswith(f"{report['reward_before']:.4f} -> {report['reward_after']:.4f}")
    assert metrics["monitor"]["alarm"] is None and not any(h.get("monitor/alarm") for h in metrics["history"])
    assert monitor_line.startswith("monitor: no alarm over 3 evaluations")


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
