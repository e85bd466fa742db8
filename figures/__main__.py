"""python -m figures [FIG ...] [--results DIR] [--set KEY=V ...] [--gallery]

Runs whatever sweeps the chosen figures need and are missing (or unfinished: they resume),
then draws them. A figure module `figures/NAME.py` declares SWEEPS (sweep names),
draw(datasets: dict[name, xarray.Dataset]) -> list of written paths (it saves the numbers it
quotes with `common.save_numbers(NAME, ...)`) and gallery(numbers: dict) -> str, its
section of the gallery. --gallery also copies the drawn PNGs and numbers to docs/gallery/ and
rewrites the gallery's sections in docs/reproductions.md from them (see figures/common.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_FIGURES = {"common", "gallery"}


def figure_names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules([HERE])
        if not m.name.startswith("_") and m.name not in NOT_FIGURES
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m figures")
    p.add_argument(
        "figures", nargs="*", help=f"figures to draw (default: all of {', '.join(figure_names())})"
    )
    p.add_argument(
        "--results", default=None, help="directory of the sweep stores (default: results)"
    )
    p.add_argument(
        "--set", action="append", default=[], help="passed to every sweep run (e.g. scale=paper)"
    )
    p.add_argument(
        "--gallery",
        action="store_true",
        help="copy the figures and their numbers to docs/gallery/ and rewrite their sections "
        "of docs/reproductions.md",
    )
    args = p.parse_args(argv)
    from figures import common, gallery

    if args.results:
        os.environ["DYNAMICS_RESULTS"] = args.results
    names = args.figures or figure_names()
    unknown = [n for n in names if n not in figure_names()]
    if unknown:
        sys.stderr.write(
            f"error: FIG: unknown figure {unknown[0]!r}; known: {', '.join(figure_names())}\n"
        )
        return 2
    t0 = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"figures.{name}")
        datasets = {}
        for sweep in module.SWEEPS:
            try:
                datasets[sweep] = common.open_results(sweep)
            except FileNotFoundError:
                print(f"[figures] running sweep {sweep} for {name}", flush=True)
                sets = [x for s in args.set for x in ("--set", s)]
                # each sweep as `python -m sweeps run` runs it, in a process of its own: no
                # state of an earlier sweep's process (64-bit mode, caches) reaches the next
                argv = ["run", sweep, "--out", common.results_dir(), "--quiet", *sets]
                rc = subprocess.run([sys.executable, "-m", "sweeps", *argv]).returncode
                if rc:
                    return rc
                datasets[sweep] = common.open_results(sweep)
        for path in module.draw(datasets):
            print(f"[figures] {name}: wrote {path}")
        if args.gallery:
            for path in gallery.publish(name, module):
                print(f"[figures] {name}: gallery {path}")
    print(f"[figures] done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
