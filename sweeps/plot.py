"""python -m sweeps plot: a quick figure of any variable of any sweep store.

A variable lives over the store's grid axes (static axes, seed, lr, batch_size, ...), its record
axis (`step`, or `epoch`) and possibly `layer` and `sv_index`. A plot places axes on --x, --hue
(one line per value), --col and --row (one panel per value); `seed`, unless placed, becomes a band:
the mean over seeds as a line (the geometric mean exp(mean log v) with --log) and the min-max
over seeds as a shaded band. Every other axis with more than one value must be placed or fixed
with --sel: nothing is averaged behind the user's back. `layer` is averaged by default (--layer
mean), or picked (--layer K), or drawn one line per layer (--layer all). --at STEP|last reads
every run at one record (the nearest record where the variable was recorded, or each run's last
finite record) and plots it against a grid axis. Diverged runs (status 1) are excluded from
every line and band of recorded variables; runs not yet run (status -1) are NaN: the title counts
both.

Everything that can be wrong with a request is checked by `prepare` (PlotError: one line naming
the field) before anything is drawn; `draw` turns the prepared numbers into a matplotlib Figure.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

RECORD_DIMS = ("step", "epoch")
RUN_VARIABLES = ("status", "diverged_step")
MAX_PANELS = 100
FLAGS = ("--x", "--hue", "--col", "--row")


class PlotError(ValueError):
    """A plot or report request that cannot be drawn: one line naming the field and the reason."""


# --------------------------------------------------------------------------- store access


def open_store(path: str):
    """The store at `path` as an xarray Dataset; PlotError("store: ...") if it is not a sweep
    store."""
    from sweeps import store as _store

    if not _store.exists(path):
        raise PlotError(f"store: no store at {path}")
    import xarray as xr

    try:
        ds = xr.open_zarr(path)
    except Exception as e:  # a Zarr group xarray cannot read
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlotError(f"store: {path} is not a readable dataset ({reason})") from None
    if "status" not in ds.data_vars:
        raise PlotError(f"store: {path} is not a sweep store (no status variable)")
    return ds


def store_stem(path: str) -> str:
    name = os.path.basename(str(path).rstrip("/"))
    return name[: -len(".zarr")] if name.endswith(".zarr") else name or "store"


def record_dim(da) -> str | None:
    return next((d for d in RECORD_DIMS if d in da.dims), None)


def grid_axes(ds) -> list[str]:
    return list(ds["status"].dims)


def fmt(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _shown(values, limit: int = 8) -> str:
    vals = list(values)
    return ", ".join(fmt(v) for v in vals[:limit]) + (", ..." if len(vals) > limit else "")


def check_out(out: str, suffixes: tuple[str, ...]) -> Path:
    """Fail (PlotError naming --out) unless `out` ends in one of `suffixes` and could be written;
    creates nothing."""
    p = Path(out)
    if p.suffix.lower() not in suffixes:
        raise PlotError(f"--out: {out} must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise PlotError(f"--out: {out} is a directory")
    parent = p.parent
    if not parent.is_dir():
        raise PlotError(f"--out: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PlotError(f"--out: {out} is not writable")
    return p


# --------------------------------------------------------------------------- the request


@dataclasses.dataclass
class Prepared:
    """Numbers ready to draw: `center`, `lo`, `hi` over (row, col, hue, x) (length-1 where an
    axis is not placed); lo/hi are None without a seed band."""

    var: str
    x: str
    hue: str | None
    col: str | None
    row: str | None
    x_values: np.ndarray
    hue_values: np.ndarray
    col_values: np.ndarray
    row_values: np.ndarray
    center: np.ndarray
    lo: np.ndarray | None
    hi: np.ndarray | None
    log: bool
    x_log: bool
    x_is_grid: bool
    title: list[str]


def _match(axis: str, values: np.ndarray, text: str):
    """The coordinate value of `axis` that `text` names; PlotError with the nearest ones if none."""
    kind = values.dtype.kind
    if kind == "b":
        word = text.strip().lower()
        if word in ("true", "1", "false", "0"):
            v = word in ("true", "1")
            if v in values.tolist():
                return v
        raise PlotError(f"--sel {axis}={text}: not a value of {axis} (values: {_shown(values)})")
    if kind in "iuf":
        try:
            v = float(text)
        except ValueError:
            raise PlotError(
                f"--sel {axis}={text}: not a number (values of {axis}: {_shown(values)})"
            ) from None
        vals = values.astype(float)
        close = np.abs(vals - v) <= 1e-6 * np.maximum(np.abs(vals), abs(v))
        if close.any():
            return values[int(np.argmax(close))].item()
        below, above = vals[vals < v], vals[vals > v]
        near = ([fmt(below.max())] if below.size else []) + (
            [fmt(above.min())] if above.size else []
        )
        raise PlotError(f"--sel {axis}={text}: not a value of {axis}; nearest: {', '.join(near)}")
    strs = [str(s) for s in values.tolist()]
    if text in strs:
        return values[strs.index(text)].item()
    near = difflib.get_close_matches(text, strs, n=3, cutoff=0.0)
    raise PlotError(f"--sel {axis}={text}: not a value of {axis}; nearest: {', '.join(near)}")


def _parse_sel(items, dims: list[str], da, var: str) -> dict[str, list]:
    selection: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise PlotError(f"--sel: expected AXIS=VALUE[,VALUE...], got {item!r}")
        axis, text = (s.strip() for s in item.split("=", 1))
        if axis not in dims:
            raise PlotError(f"--sel: no axis {axis!r} in {var} (axes: {', '.join(dims)})")
        if axis in selection:
            raise PlotError(f"--sel: {axis} is selected twice")
        texts = [t.strip() for t in text.split(",")]
        if not all(texts):
            raise PlotError(f"--sel {axis}={text}: missing value")
        chosen = [_match(axis, da[axis].values, t) for t in texts]
        if len(set(chosen)) != len(chosen):
            raise PlotError(f"--sel {axis}={text}: a value is named twice")
        selection[axis] = chosen
    return selection


def _parse_at(at, rec: str | None, da, var: str):
    if at is None:
        return None
    if rec is None:
        raise PlotError(f"--at: {var} is one value per run (no step axis)")
    if at == "last":
        return "last"
    try:
        step = float(at)
    except (TypeError, ValueError):
        raise PlotError(f"--at: expected a {rec} or 'last', got {at!r}") from None
    recs = da[rec].values
    if not np.isfinite(step) or step < recs.min() or step > recs.max():
        raise PlotError(
            f"--at: {rec} {at} is beyond the records ({fmt(recs.min())}..{fmt(recs.max())})"
        )
    return step


def _unplaced_error(axis: str, n: int, values, rec: str | None) -> PlotError:
    if axis == rec:
        return PlotError(
            f"{axis} has {n} records ({fmt(values[0])}..{fmt(values[-1])}): put it on --x or "
            f"read one record with --at {axis.upper()}|last"
        )
    return PlotError(
        f"{axis} has {n} values ({_shown(values)}): put it on --x/--hue/--col/--row or "
        f"--sel {axis}=..."
    )


def prepare(
    ds,
    var: str,
    *,
    x: str | None = None,
    hue: str | None = None,
    col: str | None = None,
    row: str | None = None,
    at: str | int | None = None,
    layer: str | int | None = None,
    sel=(),
    log: bool = False,
    name: str | None = None,
) -> Prepared:
    """Check a plot request against the store and reduce the variable to the numbers drawn.

    ds: the store's Dataset; var: one of its variables; x/hue/col/row: names of the variable's
    dimensions; at: a record step or "last"; layer: K, "all" or "mean"; sel: "AXIS=V[,V...]"
    strings; log: log y axis and geometric means; name: the store's name for the title.
    Returns Prepared with center[r, c, h, i] = mean over seeds s of v[s, r, c, h, x_i]
    (NaN-skipping; the geometric mean exp(mean_s log v) with log, v <= 0 dropped) and lo/hi the
    min/max over seeds, where v is NaN for diverged runs (recorded variables only: `status` and
    `diverged_step` describe the runs themselves and keep them). Layers are averaged with the
    NaN padding of smaller layers skipped. Every check runs before any value is read.
    """
    name = name or ds.attrs.get("sweep", "store")
    if var not in ds.data_vars:
        raise PlotError(
            f"var: no variable {var!r} in {name} (variables: {', '.join(ds.data_vars)})"
        )
    da = ds[var]
    grid = grid_axes(ds)
    rec = record_dim(da)
    dims = list(da.dims)
    placed = dict(zip(FLAGS, (x, hue, col, row), strict=True))
    for flag, a in placed.items():
        if a is not None and a not in dims:
            raise PlotError(f"{flag}: no axis {a!r} in {var} (axes: {', '.join(dims)})")
    seen: dict[str, str] = {}
    for flag, a in placed.items():
        if a is None:
            continue
        if a in seen:
            raise PlotError(f"{flag}: {a} is already on {seen[a]}")
        seen[a] = flag
    selection = _parse_sel(sel, dims, da, var)

    layer_mode = None  # "mean": averaged; None: placed, picked by a --sel, or absent
    if layer is not None:
        layer = str(layer)
        if "layer" not in dims:
            raise PlotError(f"--layer: {var} has no layer axis")
        if "layer" in seen:
            raise PlotError(f"--layer: layer is already on {seen['layer']}")
        if "layer" in selection:
            raise PlotError("--layer: layer is already chosen by --sel")
        if layer == "all":
            if hue is not None:
                raise PlotError(
                    f"--layer all: --hue is already {hue}; put layer on --col or --row instead"
                )
            hue = "layer"
            seen["layer"] = "--hue"
        elif layer == "mean":
            layer_mode = "mean"
        else:
            layers = da["layer"].values
            try:
                k = int(layer)
            except ValueError:
                raise PlotError(f"--layer: expected K, all or mean, got {layer!r}") from None
            if k not in layers.tolist():
                raise PlotError(
                    f"--layer: {k} is not a layer of {var} (layers {layers.min()}..{layers.max()})"
                )
            selection["layer"] = [k]
    elif "layer" in dims and "layer" not in seen and "layer" not in selection:
        layer_mode = "mean"

    if at is not None and rec in seen:
        raise PlotError(f"--at: {rec} is on {seen[rec]}; --at reads one record")
    if at is not None and rec in selection:
        raise PlotError(f"--at: {rec} is already chosen by --sel")
    at = _parse_at(at, rec, da, var)
    rec_free = rec is not None and rec not in seen and len(selection.get(rec, "..")) > 1
    if at is None and rec_free and "sv_index" in dims:
        at = "last"  # a spectrum is read at one record

    def size(a: str) -> int:
        return len(selection[a]) if a in selection else da.sizes[a]

    if x is None:
        if rec_free and at is None:
            x = rec
        elif "sv_index" in dims and "sv_index" not in seen:
            x = "sv_index"
        else:
            free = [a for a in grid if a not in seen and size(a) > 1]
            pick = [a for a in free if a != "seed"] or free
            if not pick:
                raise PlotError(f"--x: {var} has no axis with more than one value to plot against")
            x = pick[0]
        seen[x] = "--x"

    gone = set(seen) | ({"layer"} if layer_mode == "mean" else set())
    gone |= {rec} if at is not None else set()
    band = False
    for a in dims:
        if a in gone:
            continue
        if size(a) == 1:
            continue
        if a == "seed":
            band = True
            continue
        values = da[a].values if a not in selection else np.asarray(selection[a])
        raise _unplaced_error(a, size(a), values, rec)
    n_panels = (size(row) if row else 1) * (size(col) if col else 1)
    if n_panels > MAX_PANELS:
        raise PlotError(f"--col/--row: {n_panels} panels, at most {MAX_PANELS}")

    # ---- every check passed: read the numbers
    status = ds["status"].sel({a: v for a, v in selection.items() if a in grid})
    n_runs = int(status.size)
    n_div = int((status == 1).sum())
    n_todo = int((status < 0).sum())
    da = da.sel(selection).astype(float)
    per_run = rec is None
    if not per_run:
        da = da.where(status != 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if layer_mode == "mean":
            da = da.mean("layer", skipna=True)
        at_note = None
        if at == "last":
            da, at_note = _at_last(da, grid, rec)
        elif at is not None:
            da, at_note = _at_step(da, rec, at)
    slots = [row or "_row", col or "_col", hue or "_hue", x] + (["seed"] if band else [])
    # a grown store holds an axis's new values after the old ones: draw lines, legends and
    # panels in increasing order of every numeric axis placed
    for a in (row, col, hue, x):
        if a is not None and a in da.dims and np.issubdtype(da[a].dtype, np.number):
            da = da.sortby(a)
    da = da.squeeze([d for d in da.dims if d not in slots], drop=True)
    da = da.expand_dims([d for d in slots if d not in da.dims]).transpose(*slots)
    v = np.asarray(da.values, float)  # (row, col, hue, x[, seed]), length 1 where not placed
    masked = 0
    if log:
        masked = int(np.sum(np.isfinite(v) & (v <= 0)))
        v = np.where(v > 0, v, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if band:
            center = np.exp(np.nanmean(np.log(v), axis=-1)) if log else np.nanmean(v, axis=-1)
            lo, hi = np.nanmin(v, axis=-1), np.nanmax(v, axis=-1)
        else:
            center, lo, hi = v, None, None

    def coord(a):
        return np.asarray(da[a].values) if a is not None else np.asarray([None])

    x_values = coord(x)
    x_log = bool(
        x in grid
        and x_values.dtype.kind in "iuf"
        and np.all(x_values > 0)
        and x_values.max() > 10 * x_values.min()
    )
    what = [f"{name}: {var}"]
    if at_note:
        what.append(at_note)
    if layer_mode == "mean":
        what.append("mean over layers")
    picked = [f"{a}={','.join(fmt(s) for s in vals)}" for a, vals in selection.items()]
    if picked:
        what.append(" ".join(picked))
    if band:
        what.append(f"{'geometric ' if log else ''}mean and min-max over {v.shape[-1]} seeds")
    title = [", ".join(what)]
    desc = str(ds[var].attrs.get("description", "")).strip()
    if desc:
        title.append(desc if len(desc) <= 100 else desc[:97] + "...")
    runs = []
    if n_div:
        runs.append(
            f"{n_div} of {n_runs} runs diverged "
            + ("(kept: a per-run variable)" if per_run else "(excluded)")
        )
    if n_todo:
        runs.append(f"{n_todo} of {n_runs} runs not run yet (incomplete store: what is there)")
    elif not ds.attrs.get("complete", True):
        runs.append("incomplete store")
    if masked:
        runs.append(f"{masked} values <= 0 left out (log scale)")
    if runs:
        title.append("; ".join(runs))
    return Prepared(
        var=var,
        x=x,
        hue=hue,
        col=col,
        row=row,
        x_values=x_values,
        hue_values=coord(hue),
        col_values=coord(col),
        row_values=coord(row),
        center=center,
        lo=lo,
        hi=hi,
        log=bool(log),
        x_log=x_log,
        x_is_grid=x in grid,
        title=title,
    )


def _at_step(da, rec: str, step: float):
    """The record nearest `step` among those where the variable has any finite value."""
    recs = da[rec].values
    fin = np.isfinite(da).any([d for d in da.dims if d != rec]).values
    cand = recs[fin] if fin.any() else recs
    chosen = cand[int(np.argmin(np.abs(cand.astype(float) - step)))]
    note = f"at {rec} {fmt(chosen)}"
    if float(chosen) != step:
        note += f" (the record nearest {fmt(step)})"
    return da.sel({rec: chosen}, drop=True), note


def _at_last(da, grid: list[str], rec: str):
    """Each run at its last record with a finite value (NaN for a run with none)."""
    other = [d for d in da.dims if d not in grid and d != rec]
    fin = np.isfinite(da).any(other) if other else np.isfinite(da)
    n = da.sizes[rec]
    has = fin.any(rec)
    idx = (n - 1 - fin.isel({rec: slice(None, None, -1)}).argmax(rec)).where(has, 0)
    out = da.isel({rec: idx.astype(int)}).where(has)
    used = np.unique(np.asarray(out[rec].values)[np.asarray(has.values)])
    out = out.drop_vars(rec)
    if used.size == 0:
        note = f"at the last finite record (none: no {rec} has a value)"
    elif used.size == 1:
        note = f"at the last finite record ({rec} {fmt(used[0])})"
    else:
        note = f"at each run's last finite record ({rec} {fmt(used.min())}..{fmt(used.max())})"
    return out, note


# --------------------------------------------------------------------------- drawing


def draw(p: Prepared, *, width: float = 3.4, height: float = 2.6):
    """A matplotlib Figure (Agg canvas) of a prepared request: one panel per (row, col) value,
    one line per hue value (gid "mean"), its seed band as a filled area (gid "band:<hue value>",
    "band:" without a hue)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nr, nc, nh = p.center.shape[:3]
    fig = Figure(
        figsize=(width * nc + (1.2 if p.hue else 0), height * nr + 0.25 * len(p.title) + 0.3),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axs = fig.subplots(nr, nc, squeeze=False, sharex=True, sharey=True)
    categorical = p.x_values.dtype.kind not in "iuf"
    xs = np.arange(len(p.x_values)) if categorical else p.x_values.astype(float)
    cmap = colormaps["viridis"]
    colors = [f"C{i}" if nh <= 10 else cmap(i / max(nh - 1, 1)) for i in range(nh)]
    marker = "o" if len(xs) <= 30 else None
    for r in range(nr):
        for c in range(nc):
            ax = axs[r, c]
            for h in range(nh):
                y = p.center[r, c, h]
                m = np.isfinite(y)
                label = fmt(p.hue_values[h]) if p.hue else None
                if p.hue and not m.any():
                    label += " (no values)"
                ax.plot(
                    xs[m],
                    y[m],
                    color=colors[h],
                    marker=marker,
                    ms=3,
                    lw=1.2,
                    label=label,
                    gid="mean",
                )
                if p.lo is not None and m.any():
                    lo, hi = p.lo[r, c, h][m], p.hi[r, c, h][m]
                    ax.fill_between(
                        xs[m],
                        lo,
                        hi,
                        color=colors[h],
                        alpha=0.2,
                        linewidth=0,
                        gid=f"band:{label or ''}",
                    )
            if not np.isfinite(p.center[r, c]).any():
                ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", color="0.5")
            parts = []
            if p.row:
                parts.append(f"{p.row}={fmt(p.row_values[r])}")
            if p.col:
                parts.append(f"{p.col}={fmt(p.col_values[c])}")
            if parts:
                ax.set_title(", ".join(parts), fontsize=9)
            if r == nr - 1:
                ax.set_xlabel(p.x)
            if c == 0:
                ax.set_ylabel(p.var)
            ax.grid(alpha=0.3, lw=0.5)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
    ax0 = axs[0, 0]
    if p.log:
        ax0.set_yscale("log")
    if p.x_log:
        ax0.set_xscale("log")
    if categorical or (p.x_is_grid and len(xs) <= 12):
        # a grid axis has few values: tick exactly those
        ax0.set_xticks(xs, [fmt(v) for v in p.x_values])
        ax0.minorticks_off()
    if p.hue:
        handles, labels = ax0.get_legend_handles_labels()
        fig.legend(handles, labels, title=p.hue, loc="outside right center", fontsize=8)
    fig.suptitle("\n".join(p.title), fontsize=9)
    return fig


def plot(ds, var: str, **request):
    """Check and draw one variable of a store (see `prepare` for the request); returns the
    matplotlib Figure."""
    return draw(prepare(ds, var, **request))


def save(fig, path) -> Path:
    """Write the figure as PNG or PDF (by the suffix of `path`)."""
    path = Path(path)
    fig.savefig(path, format=path.suffix.lower().lstrip("."), dpi=120)
    return path


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plot: needs matplotlib (pip install matplotlib)") from None


def run_cli(args) -> int:
    """`python -m sweeps plot`: everything is checked before anything is drawn or written."""
    _need_matplotlib()
    out = args.out or f"{store_stem(args.store)}_{args.var}.png"
    check_out(out, (".png", ".pdf"))
    ds = open_store(args.store)
    p = prepare(
        ds,
        args.var,
        x=args.x,
        hue=args.hue,
        col=args.col,
        row=args.row,
        at=args.at,
        layer=args.layer,
        sel=args.sel,
        log=args.log,
        name=store_stem(args.store),
    )
    print(save(draw(p), out))
    return 0
