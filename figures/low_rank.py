"""P1, low-rank bias of SGD with weight decay (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794).

Four figures from the `low_rank` sweep:
  low_rank_batch  mean rank of the hidden weight matrices vs batch size, one line per weight
                  decay, one panel per lr; top row at equal epochs (the authors' protocol: every
                  batch size sees the data equally often), bottom row at equal steps;
  low_rank_time   that rank over training for every batch size, markers at equal epochs;
  low_rank_lr     the rank at the end vs learning rate, one line per weight decay;
  low_rank_dist   "dist" = ||W_{t+1} - W_t||_F / lr (mean over layers) over training.
Ranks are counted from the stored singular values at two tolerances: 1e-3 (solid) and 0.04
(dashed), relative to ||W||_F.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from figures import common

SWEEPS = ("low_rank",)
TOLS = (1e-3, 0.04)
STYLES = {1e-3: "-", 0.04: "--"}


def hidden_layers(ds) -> list[int]:
    """The hidden-to-hidden matrices (width x width): the input layer and the classifier are
    left out (digits has pixels that are constant on the training set, whose input columns only
    decay, a rank drop that says nothing about SGD)."""
    n = int(ds.sizes["layer"])
    return list(range(1, n - 1)) if n > 2 else list(range(n))


def rank_at(ds, tol: float, layers=None) -> xr.DataArray:
    """Numerical rank at `tol` (singular values of W / ||W||_F above tol) from the stored
    spectra, mean over `layers` (default: the hidden ones). Same dims as `loss`."""
    sv = ds["sv"].isel(layer=hidden_layers(ds) if layers is None else layers)
    fro = np.sqrt((sv**2).sum("sv_index", skipna=True))
    r = ((sv / fro) > tol).sum("sv_index")  # NaN padding compares False
    return r.mean("layer")


def settings(ds) -> dict:
    return json.loads(ds.attrs["spec"])["settings"]


def epochs_cut(ds) -> tuple[float, dict[int, int]]:
    """Equal epochs: the most epochs every batch size reaches, and the record step where each
    batch size reaches them (the nearest record)."""
    from sweeps.configs.low_rank import train_size

    n = train_size(**settings(ds))
    steps = ds["step"].values
    bs = [int(b) for b in ds["batch_size"].values]
    epochs = steps[-1] * min(bs) / n
    at = {b: int(steps[np.argmin(np.abs(steps - epochs * n / b))]) for b in bs}
    return epochs, at


def at_equal_epochs(da, at: dict[int, int]) -> xr.DataArray:
    return xr.concat(
        [da.sel(batch_size=b).sel(step=s, drop=True) for b, s in at.items()], dim="batch_size"
    )


def _colors(plt, n):
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.85, n)]


def _wd_label(wd) -> str:
    return "wd 0" if wd == 0 else f"wd {wd:g}"


def _legend_styles(ax):
    for tol, ls in STYLES.items():
        ax.plot([], [], ls=ls, color="0.3", label=f"tol {tol:g}")
    ax.plot([], [], ls=":", color="0.6", label="at init")
    ax.plot([], [], "x", color="r", ms=6, mew=1.5, label=f"train acc < {LOW_ACC:.0%}")


LOW_ACC = 0.9


def _mark_low_accuracy(ax, x, rank, acc, color):
    """Crosses where the seeds' mean training accuracy is below LOW_ACC (training degraded)."""
    y = rank.mean("seed").values
    bad = acc.mean("seed").values < LOW_ACC
    if bad.any():
        ax.plot(np.asarray(x)[bad], y[bad], "x", color="r", ms=7, mew=1.5, zorder=5)


def _init_lines(ax, ds):
    for tol in TOLS:
        ax.axhline(float(rank_at(ds, tol).isel(step=0).mean()), ls=":", color="0.6", lw=0.8)


def _plain_log_ticks(axis, major: bool = False):
    """No minor-tick labels; major=True puts labelled ticks at 1, 2, 5 times powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_minor_formatter(NullFormatter())
    if major:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _setup_text(ds) -> str:
    s = settings(ds)
    seeds = ds.sizes["seed"]
    return (
        f"{s['data']}, BN-MLP {s['depth']}x{s['width']}, SGD (no momentum, L2 wd), "
        f"{s['loss']}, {int(ds.step[-1])} steps, {seeds} seeds (band: min-max)"
    )


def _rank_curves(ax, x, dim, rank, acc, wds, colors, tol) -> None:
    """Rank against `dim` (seed band), one line per weight decay; runs that did not fit crossed."""
    for wd, c in zip(wds, colors, strict=True):
        da = rank.sel(weight_decay=wd).transpose("seed", dim)
        label = _wd_label(wd) if tol == TOLS[0] else None
        common.band(ax, x, da, color=c, ls=STYLES[tol], marker="o", ms=3, label=label)
        _mark_low_accuracy(ax, x, da, acc.sel(weight_decay=wd).transpose("seed", dim), c)


def draw_batch(ds, plt) -> list:
    epochs, at = epochs_cut(ds)
    lrs, wds = ds["lr"].values, ds["weight_decay"].values
    bs = ds["batch_size"].values
    colors = _colors(plt, len(wds))
    fig, axes = plt.subplots(
        2, len(lrs), figsize=(3.2 * len(lrs), 5.6), sharex=True, sharey=True, squeeze=False
    )
    acc = ds["accuracy"]
    accs = (at_equal_epochs(acc, at), acc.isel(step=-1))
    for tol in TOLS:
        r = rank_at(ds, tol)
        rows = (
            (at_equal_epochs(r, at), f"equal epochs ({epochs:.3g})"),
            (r.isel(step=-1), f"equal steps ({int(ds.step[-1])})"),
        )
        for i, (rr, what) in enumerate(rows):
            for j, lr in enumerate(lrs):
                ax = axes[i, j]
                _rank_curves(
                    ax, bs, "batch_size", rr.sel(lr=lr), accs[i].sel(lr=lr), wds, colors, tol
                )
                if tol == TOLS[0]:
                    _init_lines(ax, ds)
                ax.set_title(f"lr {lr:g}, {what}")
                ax.set_xscale("log", base=2)
                _plain_log_ticks(ax.xaxis)
                ax.set_xticks(bs, [str(b) for b in bs])
                if i == 1:
                    ax.set_xlabel("batch size B")
                if j == 0:
                    ax.set_ylabel(f"mean rank of hidden W (of {ds.sizes['sv_index']})")
    _legend_styles(axes[0, 0])
    axes[0, 0].legend(loc="lower right", ncol=2)
    common.caption(
        fig,
        f"{_setup_text(ds)}. Top: each B read where it has seen the data {epochs:.3g} times "
        "(B=4 at the last step; the authors' protocol). Bottom: all B after the same steps.",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return common.save(fig, "low_rank_batch")


def draw_time(ds, plt) -> list:
    epochs, at = epochs_cut(ds)
    tol = TOLS[-1]
    r = rank_at(ds, tol)
    lrs = [lr for lr in ds["lr"].values if lr >= 0.1] or list(ds["lr"].values)
    wds = [ds["weight_decay"].values[0], ds["weight_decay"].values[-1]]
    bs = ds["batch_size"].values
    colors = _colors(plt, len(bs))
    steps = ds["step"].values
    fig, axes = plt.subplots(
        len(wds), len(lrs), figsize=(3.4 * len(lrs), 5.4), sharex=True, sharey=True, squeeze=False
    )
    for i, wd in enumerate(wds):
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            for b, c in zip(bs, colors, strict=True):
                da = r.sel(lr=lr, weight_decay=wd, batch_size=b).transpose("seed", "step")
                common.band(ax, steps, da, color=c, label=f"B={b}")
                y = float(da.sel(step=at[int(b)]).mean())
                ax.plot([at[int(b)]], [y], "o", color=c, mec="k", mew=0.6, ms=5)
            ax.set_title(f"lr {lr:g}, {_wd_label(wd)}")
            if i == len(wds) - 1:
                ax.set_xlabel("SGD step")
            if j == 0:
                ax.set_ylabel(f"mean rank of hidden W, tol {tol:g}")
    axes[0, 0].plot([], [], "o", color="w", mec="k", mew=0.6, label=f"{epochs:.3g} epochs")
    axes[0, 0].legend(loc="lower left", ncol=2)
    common.caption(
        fig,
        f"{_setup_text(ds)}. Dots: where each B has seen the data {epochs:.3g} times; a vertical "
        "cut compares batch sizes at equal steps.",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return common.save(fig, "low_rank_time")


def draw_lr(ds, plt) -> list:
    lrs, wds = ds["lr"].values, ds["weight_decay"].values
    if len(lrs) < 2:
        return []
    all_bs = ds["batch_size"].values
    bs = sorted({int(all_bs[0]), int(all_bs[len(all_bs) // 2]), int(all_bs[-1])})
    colors = _colors(plt, len(wds))
    fig, axes = plt.subplots(1, len(bs), figsize=(3.2 * len(bs), 3.2), sharey=True, squeeze=False)
    acc = ds["accuracy"].isel(step=-1)
    for tol in TOLS:
        r = rank_at(ds, tol).isel(step=-1)
        for j, b in enumerate(bs):
            ax = axes[0, j]
            _rank_curves(
                ax, lrs, "lr", r.sel(batch_size=b), acc.sel(batch_size=b), wds, colors, tol
            )
            if tol == TOLS[0]:
                _init_lines(ax, ds)
            ax.set_xscale("log")
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
            _plain_log_ticks(ax.xaxis)
            ax.set_title(f"B={b}, after {int(ds.step[-1])} steps")
            ax.set_xlabel("learning rate")
    axes[0, 0].set_ylabel(f"mean rank of hidden W (of {ds.sizes['sv_index']})")
    _legend_styles(axes[0, 0])
    axes[0, 0].legend(loc="lower left", ncol=2)
    common.caption(fig, f"{_setup_text(ds)}.")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return common.save(fig, "low_rank_lr")


def draw_dist(ds, plt) -> list:
    lrs, wds = ds["lr"].values, ds["weight_decay"].values
    all_bs = ds["batch_size"].values
    bs = sorted({int(all_bs[0]), int(all_bs[len(all_bs) // 2]), int(all_bs[-1])})
    lrs = [lr for lr in lrs if lr >= 0.1] or list(lrs)
    colors = _colors(plt, len(wds))
    dist = ds["update_size"].mean("layer").isel(step=slice(1, None))  # NaN at step 0
    steps = dist["step"].values
    fig, axes = plt.subplots(
        len(lrs), len(bs), figsize=(3.2 * len(bs), 2.7 * len(lrs)), sharex=True, squeeze=False
    )
    for i, lr in enumerate(lrs):
        for j, b in enumerate(bs):
            ax = axes[i, j]
            for wd, c in zip(wds, colors, strict=True):
                da = dist.sel(lr=lr, batch_size=b, weight_decay=wd).transpose("seed", "step")
                common.band(ax, steps, da, color=c, log=True, label=_wd_label(wd))
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, major=True)
            ax.set_title(f"lr {lr:g}, B={b}")
            if i == len(lrs) - 1:
                ax.set_xlabel("SGD step (log)")
            if j == 0:
                ax.set_ylabel(r"dist $=\|W_{t+1}-W_t\|_F/\eta$")
    axes[0, 0].legend(loc="lower left", ncol=2)
    common.caption(
        fig,
        f"{_setup_text(ds)}. dist: mean over layers and over each {int(steps[1] - steps[0])}-step "
        "record interval; geometric mean over seeds.",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return common.save(fig, "low_rank_dist")


def draw(datasets: dict) -> list:
    plt = common.setup()
    ds = datasets["low_rank"]
    paths = []
    for fn in (draw_batch, draw_time, draw_lr, draw_dist):
        paths += fn(ds, plt)
    return paths
