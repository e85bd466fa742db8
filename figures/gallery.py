"""The gallery (docs/reproductions.md), rewritten from the numbers the figure scripts saved
(see common.py).

`publish(name, module)` copies figures/out/NAME*.png and NAME.json into docs/gallery/ and puts
`module.gallery(numbers)` into docs/reproductions.md between `<!-- gallery:NAME -->` and
`<!-- /gallery:NAME -->`. `sections()` and `expected()` let the tests check that the page says
what the committed numbers give. The README indexes the page (one row per figure).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from figures import common

PAGE = common.ROOT / "docs" / "reproductions.md"
NOT_FIGURES = {"common", "gallery"}


def _marker(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- gallery:{re.escape(name)} -->\n)(.*?)(<!-- /gallery:{re.escape(name)} -->)", re.S
    )


def sections(text: str | None = None) -> dict[str, str]:
    """{figure name: its gallery section's text} for every marked section."""
    text = PAGE.read_text() if text is None else text
    pat = re.compile(r"<!-- gallery:(\w+) -->\n(.*?)<!-- /gallery:\1 -->", re.S)
    return {m.group(1): m.group(2) for m in pat.finditer(text)}


def expected(name: str, module) -> str:
    """What the gallery section of figure `name` must say: its gallery() of the committed numbers."""
    return module.gallery(common.load_numbers(name)).strip() + "\n"


def publish(name: str, module) -> list[Path]:
    common.GALLERY.mkdir(parents=True, exist_ok=True)
    written = []
    for png in sorted(common.OUT.glob(f"{name}*.png")):
        written.append(Path(shutil.copy2(png, common.GALLERY / png.name)))
    src = common.OUT / f"{name}.json"
    if src.exists():
        written.append(Path(shutil.copy2(src, common.GALLERY / src.name)))
    text = PAGE.read_text()
    pat = _marker(name)
    if pat.search(text) and (common.GALLERY / f"{name}.json").exists():
        body = expected(name, module)
        text = pat.sub(lambda m: m.group(1) + body + m.group(3), text)
        PAGE.write_text(text)
        written.append(PAGE)
    return written
