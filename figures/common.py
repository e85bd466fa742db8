"""Shared by every figure script: the one loader of stored results, seed bands, captions,
saving to PNG and PDF under figures/out/, and the numbers a figure quotes.

The gallery. `make figures` draws into figures/out/ (not tracked). Every number the gallery
(docs/reproductions.md, indexed from the README) quotes beside a figure comes from the stored
results: a figure script computes it from its datasets and passes it to `save_numbers(NAME,
{...})`, which writes figures/out/NAME.json; the module's `gallery(numbers) -> str` turns those
numbers into its section. `python -m figures --gallery` (after drawing) copies the PNGs and the
numbers into docs/gallery/ and rewrites each figure's section between `<!-- gallery:NAME -->`
and `<!-- /gallery:NAME -->` from them; tests/test_gallery.py checks that the sections are what
the committed numbers give, so no quoted number is typed by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "docs" / "gallery"


def results_dir() -> str:
    return os.environ.get("DYNAMICS_RESULTS", "results")


def store_path(name: str, results: str | None = None) -> str:
    return f"{(results or results_dir()).rstrip('/')}/{name}.zarr"


def open_results(name: str, results: str | None = None):
    """The stored dataset of sweep `name` (results/NAME.zarr); fails if absent or unfinished."""
    import xarray as xr

    path = store_path(name, results)
    try:
        ds = xr.open_zarr(path)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise FileNotFoundError(
            f"no results for sweep {name!r} at {path}: run `python -m sweeps run {name}`"
        ) from e
    if not ds.attrs.get("complete", False):
        raise FileNotFoundError(
            f"results for sweep {name!r} at {path} are unfinished: run it again to resume"
        )
    return ds


def setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "font.size": 9,
            "axes.titlesize": 9,
            "axes.labelsize": 9,
            "legend.fontsize": 7,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def band(ax, x, da, dim: str = "seed", label=None, color=None, log: bool = False, **kw):
    """Mean over `dim` as a line and the spread over `dim` (min to max) as a band.

    log=True takes the geometric mean (for quantities plotted on a log axis).
    """
    v = np.asarray(da.transpose(dim, ...).values, float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            center = np.exp(np.nanmean(np.log(v), axis=0))
    else:
        center = np.nanmean(v, axis=0)
    lo, hi = np.nanmin(v, axis=0), np.nanmax(v, axis=0)
    (line,) = ax.plot(x, center, label=label, color=color, **kw)
    if v.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def caption(fig, text: str) -> None:
    """One line under the figure naming the setup."""
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7, color="0.3", wrap=True)


def save(fig, name: str) -> list[Path]:
    """Write figures/out/NAME.png (small, committed for the gallery) and NAME.pdf."""
    OUT.mkdir(parents=True, exist_ok=True)
    paths = [OUT / f"{name}.png", OUT / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def save_numbers(name: str, numbers: dict) -> Path:
    """Write figures/out/NAME.json: the numbers figure NAME quotes (plain floats, ints,
    strings, lists and dicts of them), read by the module's `gallery()`."""
    import json

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(_plain(numbers), indent=1, sort_keys=True) + "\n")
    return path


def load_numbers(name: str, where: Path | None = None) -> dict:
    import json

    return json.loads(((where or GALLERY) / f"{name}.json").read_text())


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    return v


def fmt(x, digits: int = 3) -> str:
    """A number as the gallery prints it: `digits` significant digits, exponent when small."""
    x = float(x)
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}".replace("e-0", "e-").replace("e+0", "e+")


def image(name: str) -> str:
    """Markdown for a gallery image (docs/gallery/NAME.png, linked from docs/reproductions.md)."""
    return f"![{name.replace('_', ' ')}](gallery/{name}.png)"


def image_names(markdown: str) -> list[str]:
    """The gallery images (docs/gallery/NAME.png) a gallery section links to."""
    import re

    return re.findall(r"\]\(gallery/([\w-]+)\.png\)", markdown)
