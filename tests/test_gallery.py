"""The README's gallery says what the stored numbers give: every figure module has a README
section, rewritten by `python -m figures --gallery` from the numbers its draw() saved (committed
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
        f"README section {name} differs from its numbers: run `python -m figures {name} --gallery`"
    )
    for png in common.image_names(gallery.sections()[name]):
        assert (common.GALLERY / f"{png}.png").exists(), png
