"""P4: channel normalization avoids vanishing gradients (Dai & Heckel, arXiv 1907.09539).

channel_norm_gradients: the gradient at initialization of deep linear 1-D conv nets per layer
and per depth, and of the 12-layer ReLU decoder per layer, with and without channel norm.
channel_norm_loss: the loss curves of both experiments.
Lines are the geometric mean over seeds, bands the min-max over seeds.
"""

from __future__ import annotations

import json

import numpy as np

from figures import common
from sweeps.configs.channel_norm_depth import target_signal

SWEEPS = ("channel_norm_depth", "channel_norm_decoder")

NORMS = {"none": ("no normalization", "--"), "channel": ("channel norm", "-")}
NORM_COLORS = {"none": "C0", "channel": "C1"}
GRAD_LABEL = r"gradient norm at init  $\|\partial \ell / \partial w_k\|_2$"
# What the paper reports (section 4 and its decoder experiment), drawn as gray markers.
PAPER_GRAD_NONE = {5: 1e-3, 10: 5e-6, 30: 1e-10}
PAPER_GRAD_CHANNEL = (0.01, 0.05)
PAPER_DECODER_LOSS = {"channel": 3.7e-5, "none": 0.25}
PAPER = "0.5"


def _runs(ds):
    """Drop the single-valued grid axes (lr, batch_size, ...), keeping static axes and seed."""
    keep = {"seed", "step", "layer", "depth", "norm"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def _depth_colors(plt, depths):
    cmap = plt.get_cmap("viridis")
    return {d: cmap(0.85 * i / max(len(depths) - 1, 1)) for i, d in enumerate(depths)}


def _loss_depths(depths):
    """At most three depths get a loss panel: 5, 10, 30 when swept, else first, middle, last."""
    if len(depths) <= 3:
        return depths
    if {5, 10, 30} <= set(depths):
        return [5, 10, 30]
    return [depths[0], depths[len(depths) // 2], depths[-1]]


def _norms(ds):
    return [n for n in NORMS if n in [str(v) for v in ds.norm.values]]


def draw(datasets) -> list:
    plt = common.setup()
    lin = _runs(datasets["channel_norm_depth"])
    dec = _runs(datasets["channel_norm_decoder"])
    depths = [int(d) for d in lin.depth.values]
    colors = _depth_colors(plt, depths)
    n_seed_lin, n_seed_dec = lin.sizes["seed"], dec.sizes["seed"]
    lr = float(datasets["channel_norm_depth"].lr.values[0])
    settings = json.loads(datasets["channel_norm_depth"].attrs["spec"])["settings"]
    caption_lin = (
        f"Linear nets: 1 channel, n={settings['n']}, kernel {settings['kernel']}, circular "
        f"padding, no bias, PyTorch default init U(±1/√fan_in); centred random target "
        f"({settings['target']}) from N(0,1) noise input; square loss; GD lr {lr:g}; "
        f"{n_seed_lin} seeds (line: geometric mean, band: min-max)."
    )
    caption_dec = (
        f"Decoder: 12 layers x 4 channels, kernel 3, circular, no bias, conv→ReLU→norm, 1x1 conv + "
        f"sigmoid; step target (n=1024) from N(0,1) noise; SGD lr 0.1, momentum 0.9; {n_seed_dec} seeds."
    )
    paths = []

    # ------------------------------------------------------------------ gradients at init
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    g_lin = lin.grad_norm.sel(step=1)  # record 1 holds the gradient used by step 1: at init
    ax = axes[0]
    for d in depths:
        for n in _norms(lin):
            da = g_lin.sel(depth=d, norm=n).isel(layer=slice(0, d))
            common.band(
                ax,
                np.arange(1, d + 1),
                da,
                log=True,
                color=colors[d],
                linestyle=NORMS[n][1],
                label=f"L={d}" if n == "channel" else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("layer k (1 = input side)")
    ax.set_ylabel(GRAD_LABEL)
    ax.set_title("(a) linear nets: per-layer gradient at init")
    handles = ax.get_legend_handles_labels()
    style = [plt.Line2D([], [], color="k", linestyle=NORMS[n][1], label=NORMS[n][0]) for n in NORMS]
    ax.legend(handles=handles[0] + style, loc="center right", ncol=1)

    ax = axes[1]
    mean_lin = g_lin.mean("layer", skipna=True)  # mean over the depth's layers (padding is NaN)
    for n in _norms(lin):
        common.band(
            ax,
            depths,
            mean_lin.sel(norm=n),
            log=True,
            color=NORM_COLORS[n],
            linestyle=NORMS[n][1],
            marker="o",
            label=f"{NORMS[n][0]} (this run)",
        )
    ax.plot(
        list(PAPER_GRAD_NONE),
        list(PAPER_GRAD_NONE.values()),
        "x",
        color=PAPER,
        markersize=8,
        label="paper, no norm.",
    )
    ax.vlines(
        list(PAPER_GRAD_NONE),
        *PAPER_GRAD_CHANNEL,
        color=PAPER,
        linewidth=4,
        alpha=0.6,
        label="paper, channel norm (0.01-0.05)",
    )
    ax.set_yscale("log")
    ax.set_xlabel("depth L (convolutional layers)")
    ax.set_ylabel("gradient norm at init, mean over layers")
    ax.set_title("(b) linear nets: gradient at init vs depth")
    ax.legend(loc="lower left")

    ax = axes[2]
    g_dec = dec.grad_norm.sel(step=1)
    n_layers = int(np.isfinite(g_dec.values).any(axis=tuple(range(g_dec.ndim - 1))).sum())
    for n in _norms(dec):
        common.band(
            ax,
            np.arange(1, n_layers + 1),
            g_dec.sel(norm=n).isel(layer=slice(0, n_layers)),
            log=True,
            color=NORM_COLORS[n],
            linestyle=NORMS[n][1],
            marker=".",
            label=NORMS[n][0],
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"layer k ({n_layers} = output 1x1 conv)")
    ax.set_ylabel(GRAD_LABEL)
    ax.set_title("(c) 12-layer ReLU decoder: gradient at init")
    ax.legend(loc="center right")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.caption(fig, caption_lin + "\n" + caption_dec)
    paths += common.save(fig, "channel_norm_gradients")

    # ------------------------------------------------------------------ loss curves
    shown = _loss_depths(depths)
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3.3 * (len(shown) + 1), 3.5))
    steps = lin.step.values
    s = np.flatnonzero(steps > 0)  # log x axis
    zero_loss = float(np.mean(target_signal(int(settings["n"]), settings["target"]) ** 2))
    for i, (ax, d) in enumerate(zip(axes, shown, strict=False)):
        for n in _norms(lin):
            common.band(
                ax,
                steps[s],
                lin.loss.sel(depth=d, norm=n).isel(step=s),
                log=True,
                color=NORM_COLORS[n],
                linestyle=NORMS[n][1],
                label=NORMS[n][0],
            )
        ax.axhline(zero_loss, color=PAPER, linestyle=":", linewidth=1, label="loss of output 0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iteration (gradient descent steps)")
        if i == 0:
            ax.set_ylabel("training loss (mean squared error)")
            ax.legend(loc="lower left")
        ax.set_title(f"({'abcdefg'[i]}) linear net, depth L={d}")
    lo = min(ax.get_ylim()[0] for ax in axes[:-1])
    hi = max(ax.get_ylim()[1] for ax in axes[:-1])
    for ax in axes[:-1]:
        ax.set_ylim(lo, hi)

    ax = axes[-1]
    steps = dec.step.values
    s = np.flatnonzero(steps > 0)
    for n in _norms(dec):
        common.band(
            ax,
            steps[s],
            dec.loss.sel(norm=n).isel(step=s),
            log=True,
            color=NORM_COLORS[n],
            linestyle=NORMS[n][1],
            label=NORMS[n][0],
        )
    for n, v in PAPER_DECODER_LOSS.items():
        ax.plot(
            [2000],
            [v],
            "x",
            color=PAPER,
            markersize=8,
            label="paper, after 2000 it." if n == "channel" else None,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (SGD steps, momentum 0.9)")
    ax.set_ylabel("training loss (mean squared error)")
    ax.set_title(f"({'abcdefg'[len(shown)]}) 12-layer ReLU decoder, step target")
    ax.legend(loc="lower left")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    common.caption(fig, caption_lin + "\n" + caption_dec)
    paths += common.save(fig, "channel_norm_loss")
    return paths
