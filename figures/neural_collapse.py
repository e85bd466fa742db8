"""Neural collapse under the square loss (Papyan, Han, Donoho 2020; Han, Papyan, Donoho 2022).

neural_collapse: NC1 (within- over between-class variability, and the CDNV), NC2 (equinorm
and equiangularity of the centred class means, and their mean cosine against -1/(C-1)), NC3
(classifier vs class means), NC4 (classifier vs nearest class mean), and the accuracies, over
training; the shaded region is the terminal phase (100% training accuracy on every seed).
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import NullFormatter

from figures import common

SWEEPS = ("neural_collapse",)


def _fixed(ds):
    for a in ("lr", "batch_size", "weight_decay", "momentum", "init_scale"):
        if a in ds.dims:
            ds = ds.isel({a: 0})
    return ds


def terminal_step(ds) -> float:
    """Start of the terminal phase: the first record at which every seed fits every training
    example (a seed may later drop one now and then)."""
    full = np.flatnonzero((ds.accuracy >= 1.0).all("seed").values)
    return float(ds.step.values[full[0]]) if full.size else float("nan")


def draw(datasets):
    ds = _fixed(datasets["neural_collapse"]).load()
    plt = common.setup()
    C = int(ds.attrs.get("num_classes", 10))
    slow = np.isfinite(ds.nc1.isel(seed=0)).values
    slow[0] = True
    nc = ds.isel(step=np.flatnonzero(slow))
    x, xs = ds.step.values, nc.step.values
    t_tp = terminal_step(ds)
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 5.8))
    ax = axes[0, 0]
    common.band(ax, xs, nc.nc1, log=True, label="NC1 = tr(S_W S_B⁺)/C", color="C0")
    common.band(ax, xs, nc.cdnv, log=True, label="CDNV", color="C1")
    ax.set_yscale("log")
    ax.set_ylabel("within / between class variability")
    ax.set_title("NC1: features collapse to their class means")
    ax = axes[0, 1]
    common.band(ax, xs, nc.nc2, log=True, label="mean |cos + 1/(C-1)|", color="C0")
    common.band(ax, xs, nc.nc2_equinorm, log=True, label="std/mean of ‖μ_c − μ_G‖", color="C1")
    ax.set_yscale("log")
    ax.set_ylabel("deviation from a simplex ETF")
    ax.set_title("NC2: equiangular and equinorm class means")
    ax = axes[0, 2]
    common.band(ax, xs, nc.nc2_cos, color="C0", label="mean cos(μ_c − μ_G, μ_c' − μ_G)")
    ax.axhline(-1.0 / (C - 1), color="k", ls=":", lw=1, label=f"−1/(C−1) = {-1 / (C - 1):.3f}")
    ax.set_ylabel("cosine between centred class means")
    ax.set_title("NC2: mean pairwise cosine")
    ax = axes[1, 0]
    common.band(ax, xs, nc.nc3, log=True, color="C0", label="‖W/‖W‖ − M/‖M‖‖²_F")
    ax.set_yscale("log")
    ax.set_ylabel("classifier – class-mean mismatch")
    ax.set_title("NC3: classifier aligns with class means")
    ax = axes[1, 1]
    common.band(ax, xs, nc.nc4, color="C0", label="argmax f ≠ nearest class mean")
    ax.set_ylabel("fraction of training examples")
    ax.set_title("NC4: classifier = nearest class mean")
    ax.set_ylim(-0.02, max(0.1, float(nc.nc4.isel(step=slice(1, None)).max()) * 1.1))
    ax = axes[1, 2]
    common.band(ax, x, 1 - ds.accuracy, log=True, color="C0", label="training error")
    common.band(ax, x, 1 - ds.test_accuracy, log=True, color="C1", label="test error")
    common.band(ax, x, ds.loss, log=True, color="C2", label="training loss (square)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.5)
    ax.set_ylabel("error / loss")
    ax.set_title("training and test error")
    for ax in axes.flat:
        ax.set_xlabel("step (SGD iterations)")
        if np.isfinite(t_tp):
            ax.axvspan(t_tp, x[-1], color="0.92", zorder=-1)
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log" and hi / lo > 30:  # minor labels only on short log axes
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(loc="best")
    axes[0, 0].text(
        t_tp, axes[0, 0].get_ylim()[1], " terminal phase", va="top", ha="left", fontsize=7
    )
    nc1 = nc.nc1.mean("seed").values
    i_tp = int(np.searchsorted(xs, t_tp)) if np.isfinite(t_tp) else 1
    fig.suptitle(
        f"Neural collapse under the square loss: NC1 falls {nc1[0] / nc1[-1]:.0f}x over training "
        f"({nc1[min(i_tp, len(nc1) - 1)] / nc1[-1]:.0f}x within the terminal phase)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    lr = float(ds.lr) if "lr" in ds.coords else float("nan")
    wd = float(ds.weight_decay) if "weight_decay" in ds.coords else float("nan")
    mom = float(ds.momentum) if "momentum" in ds.coords else 0.0
    bs = int(ds.batch_size) if "batch_size" in ds.coords else 0
    common.caption(
        fig,
        f"all 10 digits classes, MLP with batch norm, square loss on one-hot labels, SGD lr {lr:g}, "
        f"momentum {mom:g}, wd {wd:g}, batch {bs}; {ds.sizes.get('seed', 1)} seeds (line: mean, "
        "band: min–max); statistics of the penultimate features on the training set",
    )
    return common.save(fig, "neural_collapse")
