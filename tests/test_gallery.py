"""The gallery (docs/reproductions.md) says what the stored numbers give: every figure module has
a section there, rewritten by `python -m figures --gallery` from the numbers its draw() saved (committed
in docs/gallery/NAME.json with the figure's PNGs); no quoted number of ours is typed by hand."""

import importlib

import pytest

from figures import common, gallery
from figures.__main__ import figure_names

FIGURES = [n for n in figure_names() if hasattr(importlib.import_module(f"figures.{n}"), "gallery")]


def test_every_figure_has_a_gallery_section():
    assert set(gallery.sections()) == set(FIGURES)


@pytest.mark.parametrize("name", FIGURES)
def test_section_is_what_the_stored_numbers_give(name):
    module = importlib.import_module(f"figures.{name}")
    path = common.GALLERY / f"{name}.json"
    assert path.exists(), f"no {path}: run `python -m figures {name} --gallery`"
    assert gallery.sections()[name] == gallery.expected(name, module), (
        f"gallery section {name} differs from its numbers: run `python -m figures {name} --gallery`"
    )
    for png in common.image_names(gallery.sections()[name]):
        assert (common.GALLERY / f"{png}.png").exists(), png


def test_readme_indexes_every_section():
    """The README's table of reproductions links to every gallery section, by its anchor, and to
    nothing that is not there."""
    import re

    readme = (common.ROOT / "README.md").read_text()
    linked = re.findall(r"\(docs/reproductions\.md#(\w+)\)", readme)
    page = gallery.PAGE.read_text()
    anchors = re.findall(r'<a id="(\w+)"></a>', page)
    assert sorted(linked) == sorted(FIGURES)
    assert sorted(anchors) == sorted(FIGURES)
    assert "<!-- gallery:" not in readme
