"""Every measured figure the README and docs quote sits in a block rendered from a benchmark's JSON, and matches
it: a stale figure (or a JSON regenerated without updating the pages) fails here."""
import re

from benchmarks import figures


def test_every_figure_block_matches_its_json():
    for page in figures.pages():
        text = page.read_text()
        assert figures.render_page(text) == text, f"{page.name}: run python -m benchmarks.figures"


def test_every_renderer_is_used_and_names_its_command():
    used = {m["name"] for page in figures.pages() for m in figures.BLOCK.finditer(page.read_text())}
    assert used == set(figures.RENDERERS), set(figures.RENDERERS) ^ used
    for name, render in figures.RENDERERS.items():
        assert re.search(r"Written by `python -m benchmarks\.\w+`", render()), name
