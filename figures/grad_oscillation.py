"""P3: gradient oscillation (Morchdi, Zhou, Ding, Wang, Allerton 2023).

grad_oscillation_time: the adjacent-gradient cosine cos(g_t^l, g_{t+1}^l) of every layer over
training (mean over each 10-step record interval), at the smallest lr, at the lr where
oscillation sets in, and at the largest lr; one row per network.
grad_oscillation_lr: per layer, the fraction of steps whose gradient is negatively correlated
with the previous one, and the mean cosine, against the learning rate.
grad_oscillation_sharpness: lambda_max * lr / 2 over training (1 = the edge of stability).
Lines are the mean over seeds, bands the min-max over seeds.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr
from matplotlib.lines import Line2D

from figures import common

SWEEPS = ("grad_oscillation", "grad_oscillation_cnn")

COS_LABEL = r"adjacent-gradient cosine  $\cos(g_t^l, g_{t+1}^l)$"
NEG_LABEL = r"fraction of steps with $\cos(g_t^l, g_{t+1}^l) < 0$"
LR_LABEL = "learning rate (GD step size)"
STEP_LABEL = "GD step"
ACTS = {"relu": "ReLU", "tanh": "tanh"}
ONSET = 0.05  # the onset lr: the smallest whose seed-mean global negative fraction exceeds this


def networks(datasets) -> list[tuple[str, xr.Dataset]]:
    """(title, runs with dims seed, lr, step, layer) for every network of the two sweeps."""
    out = []
    mlp = datasets["grad_oscillation"]
    depth = json.loads(mlp.attrs["spec"])["settings"].get("depth", mlp.sizes["layer"])
    if "activation" in mlp.dims:
        for act in mlp.activation.values:
            out.append(
                (f"MLP, {depth} layers, {ACTS.get(str(act), act)}", _runs(mlp.sel(activation=act)))
            )
    else:
        out.append((f"MLP, {depth} layers", _runs(mlp)))
    cnn = datasets["grad_oscillation_cnn"]
    out.append((f"CNN, {cnn.sizes['layer']} layers, tanh", _runs(cnn)))
    return out


def _runs(ds):
    keep = {"seed", "lr", "step", "layer"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def run_average(ds, name: str) -> xr.DataArray:
    """Mean over the whole run of a per-interval statistic, weighted by the adjacent pairs in
    each interval (the first interval has one pair fewer: step 1 has no predecessor)."""
    v = ds[name].sel(step=ds.step > 0)
    steps = v.step.values
    pairs = np.diff(np.concatenate([[0], steps])).astype(float)
    pairs[0] -= 1
    w = xr.DataArray(pairs, dims="step", coords={"step": steps})
    return (v * w).sum("step", skipna=False) / w.sum()


def onset_lr(ds) -> float:
    """The smallest lr whose seed-mean fraction of negatively correlated whole gradients exceeds
    ONSET (the largest lr if none does)."""
    frac = run_average(ds, "grad_cos_neg_frac_global").mean("seed")
    lrs = frac.lr.values
    hit = lrs[frac.values > ONSET]
    return float(hit.min() if hit.size else lrs.max())


def lambda0(ds) -> xr.DataArray:
    """lambda_max at initialization per seed (the step-0 sharpness; it does not depend on lr)."""
    return ds.sharpness.sel(step=0).isel(lr=0)


def _layer_colors(plt, n):
    cmap = plt.get_cmap("viridis")
    return [cmap(0.9 * k / max(n - 1, 1)) for k in range(n)]


def _layer_label(k, n):
    if k == 0:
        return "layer 1 (input)"
    if k == n - 1:
        return f"layer {n} (output)"
    return f"layer {k + 1}"


def _caption(datasets) -> str:
    mlp, cnn = datasets["grad_oscillation"], datasets["grad_oscillation_cnn"]
    s = json.loads(mlp.attrs["spec"])["settings"]
    steps = int(mlp.step.values[-1])
    rec = int(mlp.step.values[1] - mlp.step.values[0])
    lam_m = lambda0(_runs(mlp.isel(activation=0) if "activation" in mlp.dims else mlp))
    lam_c = lambda0(_runs(cnn))
    return (
        f"Full-batch GD, {steps} steps, on {s.get('n_train') or 'all 1438'} unit-norm digits, square loss, no bias; "
        f"cosines averaged over {rec}-step intervals; {mlp.sizes['seed']} seeds (line: mean, band: min-max). "
        f"2/λmax at init: MLP {float(2 / lam_m.max()):.2f}-{float(2 / lam_m.min()):.2f}, "
        f"CNN {float(2 / lam_c.max()):.1f}-{float(2 / lam_c.min()):.1f}."
    )


def draw(datasets) -> list:
    plt = common.setup()
    nets = networks(datasets)
    caption = _caption(datasets)
    paths = []

    # ------------------------------------------------------------------ cosine over time
    fig, axes = plt.subplots(
        len(nets), 3, figsize=(11, 2.4 * len(nets) + 0.6), sharex=True, sharey=True
    )
    for row, (title, ds) in zip(axes, nets, strict=True):
        lrs = ds.lr.values
        picks = [("smallest lr", lrs.min()), ("onset lr", onset_lr(ds)), ("largest lr", lrs.max())]
        n = ds.sizes["layer"]
        colors = _layer_colors(plt, n)
        for ax, (what, lr) in zip(row, picks, strict=True):
            d = ds.sel(lr=lr).sel(step=ds.step > 0)
            steps = d.step.values
            for k in range(n):
                cos = d.grad_cos.isel(layer=k)
                if k in (0, n - 1):  # input and output layer: seed mean and min-max band
                    common.band(ax, steps, cos, color=colors[k], lw=1.2)
                else:  # hidden layers: seed mean only, to keep the panel readable
                    ax.plot(steps, cos.mean("seed"), color=colors[k], lw=0.6, alpha=0.8)
            ax.axhline(0, color="0.5", lw=0.6, ls=":")
            ax.set_title(f"{title}: {what} {lr:g}")
            ax.set_ylim(-1.05, 1.05)
        row[0].set_ylabel("cosine (10-step mean)")
    for ax in axes[-1]:
        ax.set_xlabel(STEP_LABEL)
    proxies = [
        Line2D([], [], color=c, lw=w) for c, w in ((plt.get_cmap("viridis")(0.0), 1.2), ("C2", 0.6))
    ] + [Line2D([], [], color=plt.get_cmap("viridis")(0.9), lw=1.2)]
    fig.legend(
        proxies,
        ["input layer (seed mean, min-max band)", "hidden layers (seed mean)", "output layer"],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.975),
        ncol=3,
        frameon=False,
    )
    fig.suptitle(COS_LABEL + " per layer over training", y=1.0)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    common.caption(fig, caption)
    paths += common.save(fig, "grad_oscillation_time")

    # ------------------------------------------------------------------ against the lr
    fig, axes = plt.subplots(3, len(nets), figsize=(3.6 * len(nets), 7.6), sharey="row")
    for col, (title, ds) in zip(axes.T, nets, strict=True):
        ok = (ds.status == 0).all("seed").values
        ds = ds.isel(lr=ok)  # stable learning rates only
        lrs = ds.lr.values
        n = ds.sizes["layer"]
        colors = _layer_colors(plt, n)
        frac = run_average(ds, "grad_cos_neg_frac")
        cos = run_average(ds, "grad_cos")
        for k in range(n):
            for ax, v in ((col[0], frac), (col[1], cos)):
                common.band(
                    ax,
                    lrs,
                    v.isel(layer=k),
                    color=colors[k],
                    label=_layer_label(k, n),
                    marker="o",
                    ms=2.5,
                    lw=1.0,
                )
        common.band(
            col[2],
            lrs,
            cos.isel(layer=0) - cos.isel(layer=-1),
            color="k",
            marker="o",
            ms=2.5,
            lw=1.0,
        )
        lam = lambda0(ds)
        ticks = [t for t in (0.03, 0.1, 0.3, 1, 3, 10) if lrs.min() * 0.9 <= t <= lrs.max() * 1.1]
        for ax in col:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.axvspan(float(2 / lam.max()), float(2 / lam.min()), color="0.88", lw=0)
        col[2].set_xlabel(LR_LABEL)
        col[0].axhline(0.5, color="0.5", lw=0.6, ls=":")
        col[1].axhline(0.0, color="0.5", lw=0.6, ls=":")
        col[2].axhline(0.0, color="0.5", lw=0.6, ls=":")
        col[0].set_title(title)
        col[0].legend(loc="upper left", frameon=False, fontsize=6)
    axes[0, 0].set_ylabel("fraction of steps with\n" + r"$\cos(g_t^l, g_{t+1}^l) < 0$")
    axes[1, 0].set_ylabel("mean adjacent-gradient\ncosine (whole run)")
    axes[2, 0].set_ylabel("mean cosine: input layer\nminus output layer")
    axes[0, 0].set_ylim(-0.03, 1.03)
    axes[1, 0].set_ylim(-1.05, 1.05)
    axes[2, 0].text(
        0.02,
        0.03,
        "< 0: the input layer oscillates more",
        transform=axes[2, 0].transAxes,
        fontsize=7,
        color="0.3",
    )
    fig.suptitle(
        "Gradient oscillation against the learning rate  (gray span: 2/λmax at initialization, "
        "over seeds; dotted: fraction 1/2, i.e. median cosine 0)",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.caption(fig, caption)
    paths += common.save(fig, "grad_oscillation_lr")

    # ------------------------------------------------------------------ edge of stability
    fig, axes = plt.subplots(1, len(nets), figsize=(3.6 * len(nets), 3.4), sharey=True)
    for ax, (title, ds) in zip(axes, nets, strict=True):
        lrs = ds.lr.values
        cmap = plt.get_cmap("plasma")
        sh = ds.sharpness.dropna("step", how="all")
        for i, lr in enumerate(lrs):
            common.band(
                ax,
                sh.step.values,
                sh.sel(lr=lr) * lr / 2,
                color=cmap(0.85 * i / max(len(lrs) - 1, 1)),
                label=f"lr {lr:g}",
                log=True,
                lw=1.0,
                marker=".",
                ms=3,
            )
        ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylim(3e-3, 2.0)  # room for the legend below the curves
        ax.legend(loc="lower center", ncol=5, frameon=False, fontsize=6, columnspacing=0.8)
    axes[0].set_ylabel(r"$\lambda_{max} \cdot$ lr / 2  (1: edge of stability)")
    fig.suptitle(
        "Sharpness against the stability threshold of GD, 2/lr (Lanczos, every 100 steps)",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    common.caption(fig, caption)
    paths += common.save(fig, "grad_oscillation_sharpness")
    common.save_numbers("grad_oscillation", numbers(nets))
    return paths


def numbers(nets) -> dict:
    """What the gallery quotes, per network: 2/lambda_max at init over seeds; the fraction of
    negatively correlated adjacent gradients (seed mean, over layers) at the smallest and the
    largest stable lr; whether every layer's median cosine is below 0 there (fraction > 1/2);
    and the input-minus-output mean cosine at the onset lr."""
    out = {}
    for title, ds in nets:
        lam = lambda0(ds)
        ok = (ds.status == 0).all("seed").values
        stable = ds.isel(lr=ok)
        frac = run_average(stable, "grad_cos_neg_frac").mean("seed")
        cos = run_average(ds, "grad_cos").mean("seed")
        lo, hi = float(stable.lr.min()), float(stable.lr.max())
        onset = onset_lr(ds)
        out[title] = dict(
            two_over_lambda=[float(2 / lam.max()), float(2 / lam.min())],
            lr_smallest=lo,
            lr_largest_stable=hi,
            neg_frac_smallest=float(frac.sel(lr=lo).max()),
            neg_frac_largest=[float(frac.sel(lr=hi).min()), float(frac.sel(lr=hi).max())],
            every_layer_median_below_zero=bool((frac.sel(lr=hi) > 0.5).all()),
            lr_onset=onset,
            input_minus_output_at_onset=float(
                cos.sel(lr=onset).isel(layer=0) - cos.sel(lr=onset).isel(layer=-1)
            ),
        )
    return out


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    rows = []
    claim = []
    for title, n in numbers.items():
        lo, hi = n["neg_frac_largest"]
        rows.append(
            f"| {title} | {fmt(n['two_over_lambda'][0])}-{fmt(n['two_over_lambda'][1])} | "
            f"{fmt(n['neg_frac_smallest'])} at lr {fmt(n['lr_smallest'])} | "
            f"{fmt(lo)}-{fmt(hi)} at lr {fmt(n['lr_largest_stable'])} | "
            f"{'yes' if n['every_layer_median_below_zero'] else 'no'} | "
            f"{fmt(n['input_minus_output_at_onset'], 2)} at lr {fmt(n['lr_onset'])} |"
        )
        d = n["input_minus_output_at_onset"]
        claim.append(f"{title}: {fmt(d, 2)} ({'holds' if d < 0 else 'the opposite'})")
    return "\n".join(
        [
            "**P3. Gradient oscillation** (Morchdi, Zhou, Ding, Wang, Allerton 2023) — "
            "`make figures FIG=grad_oscillation`",
            "",
            common.image("grad_oscillation_lr"),
            "",
            "No public code: the paper's setting (deep MLPs and CNNs trained by gradient descent, "
            "learning rates up to about 2/λmax) at CPU scale: full-batch GD on 512 unit-norm "
            "digits, square loss, no biases, a 6-layer MLP (tanh and ReLU) and a 4-layer tanh "
            "CNN; λmax (top Hessian eigenvalue, Lanczos) at initialization sets the lr grid. "
            "The fraction of adjacent-gradient pairs with negative cosine, per layer "
            "(seed mean over the run), by network:",
            "",
            "| network | 2/λmax at init | neg. fraction, small lr | neg. fraction, largest "
            "stable lr (over layers) | every layer's median cosine < 0 | input − output mean "
            "cosine at the onset lr |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "The paper's claim that with a small lr input layers oscillate more than output "
            "layers (input − output < 0) at the lr where oscillation sets in: "
            + "; ".join(claim)
            + ". The sharpness over training (`grad_oscillation_sharpness.png`) shows the runs "
            "at the largest lr sitting at the edge of stability, λmax ≈ 2/lr.",
        ]
    )
