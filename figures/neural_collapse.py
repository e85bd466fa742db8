"""Neural collapse under the square loss (Papyan, Han, Donoho 2020; Han, Papyan, Donoho 2022).

neural_collapse: NC1 (within- over between-class variability, and the CDNV), NC2 (equinorm
and equiangularity of the centred class means, and their mean cosine against -1/(C-1)), NC3
(classifier vs class means), NC4 (classifier vs nearest class mean), and the accuracies, over
epochs; the shaded region is the terminal phase (100% training accuracy on every seed), the
dotted lines the learning-rate decays.
"""

from __future__ import annotations

import json

import numpy as np
from matplotlib.ticker import NullFormatter

from figures import common

SWEEPS = ("neural_collapse",)
NAME = "neural_collapse"


def _fixed(ds):
    for a in ("lr", "batch_size", "weight_decay", "momentum", "init_scale"):
        if a in ds.dims:
            ds = ds.isel({a: 0})
    return ds


def terminal_epoch(ds) -> float:
    """Start of the terminal phase: the first record at which every seed fits every training
    example (a seed may later drop one now and then)."""
    full = np.flatnonzero((ds.accuracy >= 1.0).all("seed").values)
    return float(ds.epoch.values[full[0]]) if full.size else float("nan")


def nc_records(ds):
    """The records where the costly statistics were computed (every slow_every; init too)."""
    slow = np.isfinite(ds.nc1.isel(seed=0)).values
    slow[0] = True
    return ds.isel(epoch=np.flatnonzero(slow))


def numbers(ds) -> dict:
    C = int(ds.attrs.get("num_classes", 10)) if "num_classes" in ds.attrs else 10
    nc = nc_records(ds)
    t_tp = terminal_epoch(ds)
    nc1 = nc.nc1.values  # (seed, record)
    i_tp = int(np.searchsorted(nc.epoch.values, t_tp)) if np.isfinite(t_tp) else 0
    i_tp = min(i_tp, nc1.shape[1] - 1)
    s = json.loads(ds.attrs["spec"])["settings"]
    return {
        "classes": C,
        "epochs": int(ds.epoch.values[-1]),
        "steps": int(ds.step.isel(seed=0).values[-1]),
        "milestones": list(s["milestones"]),
        "seeds": int(ds.sizes["seed"]),
        "lr": float(ds.lr),
        "wd": float(ds.weight_decay),
        "width": int(s["width"]),
        "depth": int(s["depth"]),
        "terminal_epoch": t_tp,
        "nc1_init": [float(v) for v in nc1[:, 0]],
        "nc1_end": [float(v) for v in nc1[:, -1]],
        "nc1_fall": [float(v) for v in nc1[:, 0] / nc1[:, -1]],
        "nc1_fall_terminal": [float(v) for v in nc1[:, i_tp] / nc1[:, -1]],
        "cos_end": [float(v) for v in nc.nc2_cos.values[:, -1]],
        "cos_target": -1.0 / (C - 1),
        "nc2_end": [float(v) for v in nc.nc2.values[:, -1]],
        "equinorm_end": [float(v) for v in nc.nc2_equinorm.values[:, -1]],
        "nc3_init": [float(v) for v in nc.nc3.values[:, 0]],
        "nc3_end": [float(v) for v in nc.nc3.values[:, -1]],
        "nc4_end": [float(v) for v in nc.nc4.values[:, -1]],
        "test_accuracy": [float(v) for v in ds.test_accuracy.values[:, -1]],
        "seconds": float(ds.attrs.get("compile_seconds", 0))
        + float(ds.attrs.get("run_seconds", 0)),
    }


def draw(datasets):
    ds = _fixed(datasets["neural_collapse"]).load()
    plt = common.setup()
    C = 10
    nc = nc_records(ds)
    x, xs = ds.epoch.values, nc.epoch.values
    t_tp = terminal_epoch(ds)
    s = json.loads(ds.attrs["spec"])["settings"]
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
    ax.set_ylim(-0.02, max(0.1, float(nc.nc4.isel(epoch=slice(1, None)).max()) * 1.1))
    ax = axes[1, 2]
    common.band(ax, x, 1 - ds.accuracy, log=True, color="C0", label="training error")
    common.band(ax, x, 1 - ds.test_accuracy, log=True, color="C1", label="test error")
    common.band(ax, x, ds.loss, log=True, color="C2", label="training loss (square)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.5)
    ax.set_ylabel("error / loss")
    ax.set_title("training and test error")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        if np.isfinite(t_tp):
            ax.axvspan(t_tp, x[-1], color="0.92", zorder=-1)
        for m in s["milestones"]:
            ax.axvline(m, color="0.6", ls=":", lw=0.8)
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log" and hi / lo > 30:  # minor labels only on short log axes
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(loc="best")
    axes[0, 0].text(
        t_tp, axes[0, 0].get_ylim()[1], " terminal phase", va="top", ha="left", fontsize=7
    )
    n = numbers(ds)
    fig.suptitle(
        f"Neural collapse under the square loss: NC1 falls {np.mean(n['nc1_fall']):.0f}x over "
        f"training ({np.mean(n['nc1_fall_terminal']):.0f}x within the terminal phase)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    common.caption(
        fig,
        f"all 10 digits classes, MLP {s['depth']}x{s['width']} with BN and biases, square loss "
        f"on one-hot labels, SGD lr {n['lr']:g} (÷10 at epochs "
        f"{', '.join(str(m) for m in s['milestones'])}), momentum {float(ds.momentum):g}, "
        f"wd {n['wd']:g}, batch {int(ds.batch_size)}; {n['seeds']} seeds (line: mean, band: "
        "min–max); penultimate features of the training set in eval mode",
    )
    common.save_numbers(NAME, n)
    return common.save(fig, "neural_collapse")


def _range(v, digits=2):
    lo, hi = min(v), max(v)
    a, b = common.fmt(lo, digits), common.fmt(hi, digits)
    return a if a == b else f"{a}–{b}"


def gallery(n: dict) -> str:
    ms = ", ".join(str(m) for m in n["milestones"])
    lines = [
        "**P2. Neural collapse** (Papyan, Han, Donoho, PNAS 2020; Han, Papyan, Donoho, ICLR 2022) — "
        "`make figures FIG=neural_collapse`",
        "",
        common.image("neural_collapse"),
        "",
        "Protocol (`sweeps/configs/neural_collapse.py`; the P2 authors' repository has no "
        "neural-collapse code, so this is Papyan, Han & Donoho's, from their papers):",
        "",
        "| | Papyan et al. 2020 / Han et al. 2022 | ours (CPU scale) | why different |",
        "|---|---|---|---|",
        "| data | MNIST, CIFAR-10/100, SVHN, ... (no augmentation) | all 10 digits classes "
        "| CPU scale |",
        f"| net | VGG / ResNet / DenseNet | MLP {n['depth']}x{n['width']}, BN, biases | CPU "
        "scale |",
        "| loss | MSE on one-hot labels (Han et al.) | same | — |",
        f"| optimizer | SGD momentum 0.9, wd 5e-4, batch 128, lr tuned, ÷10 at 1/3 and 2/3 "
        f"of 350 epochs | same, lr {n['lr']:g}, ÷10 at epochs {ms} | — |",
        "| statistics | NC1–NC4 of the training features | same (eval-mode features) | — |",
        "",
        "| claim | authors | ours |",
        "|---|---|---|",
        "| NC1 falls in the terminal phase | by orders of magnitude | "
        f"{_range(n['nc1_init'])} → {_range(n['nc1_end'])} ({_range(n['nc1_fall'], 3)}x; "
        f"{_range(n['nc1_fall_terminal'])}x after 100% training accuracy at epoch "
        f"{n['terminal_epoch']:g}) |",
        f"| class-mean cosines → −1/(C−1) = {common.fmt(n['cos_target'], 4)} | yes | "
        f"{_range(n['cos_end'], 4)} (mean \\|cos + 1/(C−1)\\| {_range(n['nc2_end'])}, "
        f"equinorm std/mean {_range(n['equinorm_end'])}) |",
        "| classifier ∝ class means (NC3) | → 0 | "
        f"{_range(n['nc3_init'])} → {_range(n['nc3_end'])} |",
        "| classifier = nearest class mean (NC4) | → 0 | "
        f"{_range(n['nc4_end'])} of training examples disagree |",
        "",
        f"{n['seeds']} seeds, {n['epochs']} epochs ({n['steps']} steps), test accuracy "
        f"{_range(n['test_accuracy'], 3)}; sweep {common.fmt(n['seconds'], 2)} s (compile + run).",
    ]
    return "\n".join(lines) + "\n"
