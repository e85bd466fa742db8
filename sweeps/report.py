"""python -m sweeps report: one static, self-contained HTML page per store.

The page holds the summary `python -m sweeps show` prints and one figure per recorded variable,
drawn by sweeps.plot with defaults that need no arguments: over the record axis, one line per
value of the first grid axis (other than seed) with more than one value, one column of panels
per value of the next, one row per value of the third; any further axis (or a facet axis of more
than MAX_FACETS values) fixed at its first value, and the caption says so. Per-layer variables
are the mean over layers, `sv` the spectrum at each run's last finite record. Every image is a
PNG embedded as a base64 data URI: no server, no files beside the page, no external assets.
"""

from __future__ import annotations

import base64
import html
import io

from sweeps import plot as _plot

MAX_FACETS = 8


def default_request(ds, var: str) -> tuple[dict, list[str]]:
    """The plot request the report draws for `var`, and the axes it fixes ("width=4")."""
    da = ds[var]
    free = [a for a in _plot.grid_axes(ds) if a != "seed" and ds.sizes[a] > 1]
    request: dict = {}
    fixed: list[str] = []
    sel: list[str] = []
    slots = ["hue", "col", "row"]
    for a in free:
        if slots and (slots[0] == "hue" or ds.sizes[a] <= MAX_FACETS):
            request[slots.pop(0)] = a
            continue
        first = ds[a].values[0].item()
        sel.append(f"{a}={first!r}" if isinstance(first, float) else f"{a}={first}")
        fixed.append(f"{a}={_plot.fmt(first)}")
    if sel:
        request["sel"] = sel
    if "layer" in da.dims:
        request["layer"] = "mean"
    if "sv_index" in da.dims and _plot.record_dim(da) is not None:
        request["at"] = "last"
    return request, fixed


def variables(ds) -> list[str]:
    """The recorded variables (the list `show` prints), in store order."""
    return [v for v in ds.data_vars if v not in _plot.RUN_VARIABLES]


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;"
    "color:#222}pre{background:#f5f5f5;padding:1em;overflow-x:auto;font-size:13px}"
    "figure{margin:2.5em 0}img{max-width:100%;height:auto}figcaption{margin-top:.4em}"
    ".fixed{color:#555}.skipped{color:#a00}"
)


def build(path: str, ds) -> str:
    """The report of the store at `path` (opened as `ds`) as one HTML string."""
    from sweeps.cli import show_lines

    name = _plot.store_stem(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(name)}: sweep report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f"<p>{html.escape(str(ds.attrs.get('description', '')))}</p>",
        '<pre class="summary">' + html.escape("\n".join(show_lines(path, ds))) + "</pre>",
    ]
    for var in variables(ds):
        request, fixed = default_request(ds, var)
        desc = html.escape(str(ds[var].attrs.get("description", "")))
        try:
            fig = _plot.plot(ds, var, name=name, **request)
        except _plot.PlotError as e:
            parts.append(
                f'<p class="skipped" id="var-{html.escape(var)}"><b>{html.escape(var)}</b>: '
                f"not plotted: {html.escape(str(e))}</p>"
            )
            continue
        note = f' <span class="fixed">(fixed: {html.escape(", ".join(fixed))})</span>'
        parts.append(
            f'<figure id="var-{html.escape(var)}"><img alt="{html.escape(var)}" '
            f'src="{_png_uri(fig)}"><figcaption><b>{html.escape(var)}</b>: {desc}'
            f"{note if fixed else ''}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def run_cli(args) -> int:
    """`python -m sweeps report`: checks the output and the store before drawing anything."""
    _plot._need_matplotlib()
    out = args.out or f"{_plot.store_stem(args.store)}_report.html"
    path = _plot.check_out(out, (".html", ".htm"))
    ds = _plot.open_store(args.store)
    path.write_text(build(args.store, ds), encoding="utf-8")
    print(path)
    return 0
