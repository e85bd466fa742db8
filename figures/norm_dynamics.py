"""Norm dynamics under the square loss (Xu, Rangamani, Liao, Galanti, Poggio, Research 2023).

norm_dynamics_rho:     rho and the per-layer Frobenius norms over training, with and without
                       weight decay, for batch norm, the Lagrange-multiplier form and no
                       normalization; colour = initial scale of every layer.
norm_dynamics_margins: spread of the normalized margins y f(x) / rho over training
                       (std / mean over the training set), and their mean.
norm_dynamics_init:    end of training against the initial scale: normalized margins without
                       normalization or weight decay, and rho for every form.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import NullFormatter

from figures import common

SWEEPS = ("norm_dynamics",)
NAMES = {"batch": "batch norm (SGD + momentum)", "lagrange": "Lagrange W=ρV", "none": "no norm"}
WD_STYLE = {0: "--", 1: "-"}


def _fixed(ds):
    """The first value of every traced axis the figures do not vary."""
    for a in ("lr", "batch_size", "momentum"):
        if a in ds.dims:
            ds = ds.isel({a: 0})
    return ds


def _forms(ds):
    return [str(v) for v in ds.norm.values] if "norm" in ds.dims else [None]


def _form(ds, norm):
    return ds.sel(norm=norm) if norm is not None else ds


def _trained(d):
    """(weight_decay, init_scale) -> whether every seed reaches 100% training accuracy; the
    others never leave the origin (small init of the Lagrange form, or of the plain net with wd)."""
    return (d.accuracy.isel(step=-1) == 1).all("seed")


def _colors(plt, n):
    return plt.cm.viridis(np.linspace(0.0, 0.85, n))


def _setup_text(ds) -> str:
    lr = float(ds.lr) if "lr" in ds.coords else float("nan")
    mom = float(ds.momentum) if "momentum" in ds.coords else 0.0
    bs = int(ds.batch_size) if "batch_size" in ds.coords else 0
    return (
        f"square loss, ±1 targets, batch {bs}, lr {lr:g} (momentum {mom:g} for batch norm / no "
        f"norm; Lagrange: projected SGD, no momentum); {ds.sizes.get('seed', 1)} seeds "
        "(line: mean, band: min–max)"
    )


def _wd_legend(plt, ax, ds) -> None:
    """The axis's own legend entries plus one line style per weight decay."""
    handles = [
        plt.Line2D([], [], color="k", ls=WD_STYLE[min(i, 1)], label=f"wd {w:g}")
        for i, w in enumerate(ds.weight_decay.values)
    ]
    h0, l0 = ax.get_legend_handles_labels()
    ax.legend(h0 + handles, l0 + [h.get_label() for h in handles], loc="best", ncol=2)


def draw_rho(ds):
    plt = common.setup()
    forms = _forms(ds)
    scales = ds.init_scale.values
    cols = _colors(plt, len(scales))
    fig, axes = plt.subplots(2, len(forms), figsize=(3.6 * len(forms), 5.6), squeeze=False)
    x = ds.step.values
    for j, norm in enumerate(forms):
        d = _form(ds, norm)
        ax = axes[0, j]
        trained = _trained(d)
        lows, highs = [], []
        for iw, wd in enumerate(d.weight_decay.values):
            for c, s in zip(cols, scales, strict=True):
                if not bool(trained.sel(weight_decay=wd, init_scale=s)):
                    continue
                r = d.rho.sel(weight_decay=wd, init_scale=s)
                lows.append(float(r.isel(step=slice(1, None)).min()))
                highs.append(float(r.max()))
                lab = f"init {s:g}" if iw == len(d.weight_decay) - 1 else None
                common.band(
                    ax,
                    x,
                    d.rho.sel(weight_decay=wd, init_scale=s),
                    color=c,
                    ls=WD_STYLE[min(iw, 1)],
                    log=True,
                    label=lab,
                )
        ax.set_yscale("log")
        ax.set_title(f"{NAMES.get(norm, norm)}: ρ = ∏ₖ ‖Wₖ‖_F")
        ax.set_xlabel("step (SGD iterations)")
        ax.set_ylabel("ρ (product of Frobenius norms)")
        if lows:
            ax.set_ylim(0.5 * min(lows), 2 * max(highs))
        ax = axes[1, j]
        s1 = scales[np.argmin(np.abs(np.log(scales)))]  # the init scale closest to 1
        lcols = plt.cm.tab10(np.arange(ds.sizes["layer"]))
        for iw, wd in enumerate(d.weight_decay.values):
            for k in range(ds.sizes["layer"]):
                common.band(
                    ax,
                    x,
                    d.layer_norm.sel(weight_decay=wd, init_scale=s1).isel(layer=k),
                    color=lcols[k],
                    ls=WD_STYLE[min(iw, 1)],
                    label=f"layer {k + 1}" if iw == 0 else None,
                )
        ax.set_title(f"per-layer norms, init scale {s1:g}")
        ax.set_xlabel("step (SGD iterations)")
        ax.set_ylabel("‖Wₖ‖_F")
        ax.legend(loc="upper left", ncol=1)
    _wd_legend(plt, axes[0, 0], ds)
    fig.suptitle(
        "With weight decay ρ settles at the same value from every initial scale; "
        "without it ρ depends on the start (and keeps growing with batch norm)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    common.caption(
        fig,
        _setup_text(ds) + "; solid: wd 0.01, dashed: wd 0; runs that never leave the origin "
        "(no 100% training accuracy) are not drawn",
    )
    return common.save(fig, "norm_dynamics_rho")


def draw_margins(ds):
    plt = common.setup()
    forms = _forms(ds)
    scales = ds.init_scale.values
    cols = _colors(plt, len(scales))
    fig, axes = plt.subplots(2, len(forms), figsize=(3.6 * len(forms), 5.4), squeeze=False)
    x = ds.step.values[1:]  # margins at initialization are those of a random function
    for j, norm in enumerate(forms):
        d = _form(ds, norm)
        trained = _trained(d)
        d = d.isel(step=slice(1, None))
        for iw, wd in enumerate(d.weight_decay.values):
            for c, s in zip(cols, scales, strict=True):
                if not bool(trained.sel(weight_decay=wd, init_scale=s)):
                    continue
                sel = d.sel(weight_decay=wd, init_scale=s)
                kw = dict(color=c, ls=WD_STYLE[min(iw, 1)])
                lab = f"init {s:g}" if iw == len(d.weight_decay) - 1 else None
                common.band(
                    axes[0, j], x, sel.margin_std / sel.margin_mean, log=True, label=lab, **kw
                )
                common.band(axes[1, j], x, sel.margin_mean, log=True, **kw)
        axes[0, j].set_title(f"{NAMES.get(norm, norm)}: margin spread")
        axes[0, j].set_ylabel("std / mean of y f(x)/ρ over training set")
        axes[1, j].set_title("mean normalized margin")
        axes[1, j].set_ylabel("mean of y f(x)/ρ")
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("step (SGD iterations)")
    _wd_legend(plt, axes[0, 0], ds)
    fig.suptitle(
        "Margins concentrate as training approaches interpolation; weight decay fixes the "
        "spread at a plateau and raises the normalized margin",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    common.caption(
        fig,
        _setup_text(ds)
        + "; runs that never leave the origin (no 100% training accuracy) are not drawn",
    )
    return common.save(fig, "norm_dynamics_margins")


def draw_init(ds):
    plt = common.setup()
    forms = _forms(ds)
    scales = ds.init_scale.values
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    end = ds.isel(step=-1)
    ax = axes[0]
    plain = "none" if "none" in forms else forms[-1]
    d = _form(end, plain).isel(weight_decay=0)
    for name, c in (("margin_mean", "C0"), ("margin_min", "C1")):
        v = d[name].transpose("seed", "init_scale").values
        ok = (d.accuracy == 1).transpose("seed", "init_scale").values
        v = np.where(ok, v, np.nan)
        ax.plot(
            scales,
            np.nanmean(v, 0),
            "o-",
            color=c,
            label=name.replace("margin_", "") + " over data",
        )
        ax.fill_between(scales, np.nanmin(v, 0), np.nanmax(v, 0), color=c, alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("initial Frobenius norm of every layer")
    ax.set_ylabel("normalized margin y f(x)/ρ at the end")
    w0 = float(ds.weight_decay.values[0])
    ax.set_title(f"{NAMES.get(plain, plain)}, wd {w0:g}: margin vs initial scale")
    ax.legend()
    ax = axes[1]
    for j, norm in enumerate(forms):
        for iw, wd in enumerate(ds.weight_decay.values):
            d = _form(end, norm).sel(weight_decay=wd)
            v = d.rho.transpose("seed", "init_scale").values
            ok = (d.accuracy == 1).transpose("seed", "init_scale").values
            v = np.where(ok, v, np.nan)
            ax.plot(
                scales,
                np.exp(np.nanmean(np.log(v), 0)),
                marker="o",
                color=f"C{j}",
                ls=WD_STYLE[min(iw, 1)],
                label=f"{norm}, wd {wd:g}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("initial Frobenius norm of every layer")
    ax.set_ylabel("ρ at the end")
    ax.set_title("final ρ (runs reaching 100% training accuracy)")
    ax.legend(ncol=1, fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(
        fig,
        _setup_text(ds) + f"; end of training, step {int(ds.step.values[-1])}",
    )
    return common.save(fig, "norm_dynamics_init")


def draw(datasets):
    ds = _fixed(datasets["norm_dynamics"]).load()
    return [*draw_rho(ds), *draw_margins(ds), *draw_init(ds)]
