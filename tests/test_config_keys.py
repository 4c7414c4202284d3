"""``flowalign keys``: every config key with its type, default and meaning, from the dataclasses' metadata; every
key has a meaning and is in the docs (the run's in docs/configs.md, a method's on its page, a modifier's on the
modifiers page)."""
from __future__ import annotations

from pathlib import Path

from flowalign.cli import main
from flowalign.config_keys import RUN_SECTIONS, rows, sections
from flowalign.methods import methods, modifiers

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_key_has_a_meaning():
    assert [key for s in ["", *sections()] for key, _, _, meaning in rows(s) if not meaning] == []


def test_every_key_is_in_the_docs():
    configs = (DOCS / "configs.md").read_text()
    missing = [key for s in ["", *RUN_SECTIONS] for key, *_ in rows(s)  # `train`'s table names keys short
               if key not in configs and f"`{key.split('.')[-1]}`" not in configs]
    for name in methods():
        page = (DOCS / "methods" / f"{name}.md").read_text()
        missing += [key for key, *_ in rows(name) if f"`{key.split('.', 1)[1]}`" not in page]
    page = (DOCS / "methods" / "modifiers.md").read_text()
    missing += [key for name in modifiers() for key, *_ in rows(f"modifiers.{name}")
                if f"`{key.rsplit('.', 1)[1]}`" not in page]
    assert missing == []


def test_the_command_lists_a_section(capsys):
    assert main(["keys", "reward"]) == 0
    out = capsys.readouterr().out
    assert "reward.objective = weighted_sum  [weighted_sum | mean | uncertainty_weighted | worst_case]\n" in out
    assert "reward.penalty = 0.5  [float]\n    uncertainty_weighted: the weight of the members' variance" in out
    assert main(["keys", "modifiers.gardo"]) == 0 and "modifiers.gardo.auxiliaries = []  [list[str]]" in \
        capsys.readouterr().out
    assert main(["keys"]) == 0 and "train.lr = 0.0003  [float]\n    AdamW learning rate" in capsys.readouterr().out


def test_an_unknown_section_is_one_line(capsys):
    assert main(["keys", "trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign: error: keys: unknown section 'trian' (sections: model, sample,")
    assert "\n" not in err
