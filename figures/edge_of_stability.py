"""The edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021).

edge_of_stability: left, the sharpness lambda_max of the full training loss over gradient
descent steps for each lr, with its stability threshold 2/lr dashed; right, the training loss.
Lines: seed means; bands: min-max over seeds.
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = ("edge_of_stability",)
REACHED = 0.95  # the sharpness has reached the edge once lambda_max >= REACHED * 2/lr


def _runs(ds):
    keep = {"seed", "lr", "step"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def numbers(ds) -> dict:
    """Per lr (seeds pooled): lambda_max at init, its peak, the step at which each seed first
    reaches REACHED x 2/lr (-1: never), and from then on the min / mean / max of
    lambda_max / (2/lr); the loss at the start and the end and the fraction of loss records
    (every record_every steps) above the previous one."""
    out = {}
    for lr in ds.lr.values:
        x = ds.sel(lr=lr)
        sh = x.sharpness.dropna("step", how="all").transpose("seed", "step")
        ratio = sh.values * lr / 2
        hit = ratio >= REACHED
        first = np.where(hit.any(1), np.argmax(hit, axis=1), -1)
        late = np.concatenate(
            [r[f:] for r, f in zip(ratio, first, strict=True) if f >= 0] or [[np.nan]]
        )
        loss = x.loss.transpose("seed", "step").values
        up = np.diff(loss, axis=1) > 0
        out[f"{float(lr):g}"] = dict(
            two_over_lr=float(2 / lr),
            lambda0=[float(v) for v in sh.isel(step=0).values],
            peak=float(sh.max()),
            reached_step=[int(sh.step.values[f]) if f >= 0 else -1 for f in first],
            late_ratio=[float(late.min()), float(late.mean()), float(late.max())],
            loss_start=float(loss[:, 0].mean()),
            loss_end=float(loss[:, -1].mean()),
            loss_up_fraction=float(up.mean()),
            diverged=int(np.sum(x.status.values == 1)),
        )
    return out


def draw(datasets) -> list:
    plt = common.setup()
    raw = datasets["edge_of_stability"]
    ds = _runs(raw)
    s = json.loads(raw.attrs["spec"])["settings"]
    cmap = plt.get_cmap("plasma")
    lrs = ds.lr.values
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sh = ds.sharpness.dropna("step", how="all")
    for i, lr in enumerate(lrs):
        c = cmap(0.8 * i / max(len(lrs) - 1, 1))
        common.band(axes[0], sh.step.values, sh.sel(lr=lr), color=c, label=f"lr {lr:g}", marker=".")
        axes[0].axhline(2 / lr, color=c, ls="--", lw=0.8)
        common.band(
            axes[1], ds.step.values, ds.loss.sel(lr=lr), color=c, label=f"lr {lr:g}", lw=0.8
        )
    axes[0].set_xlabel("GD step")
    axes[0].set_ylabel(r"sharpness $\lambda_{max}$ (dashed: 2/lr)")
    axes[0].legend(frameon=False)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("GD step")
    axes[1].set_ylabel(f"training loss (every {s['record_every']} steps)")
    fig.suptitle("Progressive sharpening up to 2/lr, then the edge of stability", y=1.0)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(
        fig,
        f"Full-batch GD on {s['n_train']} unit-norm digits, square loss, tanh MLP 64-{s['width']}x"
        f"{s['depth'] - 1}-10 without biases; sharpness by Lanczos every "
        f"{s['record_every'] * s['slow_every']} steps; {ds.sizes['seed']} seeds.",
    )
    paths = common.save(fig, "edge_of_stability")
    common.save_numbers("edge_of_stability", dict(steps=int(ds.step.values[-1]), by_lr=numbers(ds)))
    return paths


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    rows = []
    for lr, n in numbers["by_lr"].items():
        lo, mean, hi = n["late_ratio"]
        rows.append(
            f"| {lr} | {fmt(n['two_over_lr'])} | {fmt(min(n['lambda0']))}-{fmt(max(n['lambda0']))} | "
            f"{fmt(n['peak'])} | {', '.join(str(v) for v in n['reached_step'])} | "
            f"{fmt(lo)} / {fmt(mean)} / {fmt(hi)} | "
            f"{fmt(n['loss_start'])} → {fmt(n['loss_end'])} | {fmt(n['loss_up_fraction'], 2)} |"
        )
    return "\n".join(
        [
            "**The edge of stability** (Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021) — "
            "`make figures FIG=edge_of_stability`",
            "",
            common.image("edge_of_stability"),
            "",
            "| | authors | ours | why different |",
            "|---|---|---|---|",
            "| data, loss | 5000 CIFAR-10 images, square loss (and cross-entropy) | 512 sklearn digits, "
            "unit-norm rows, square loss | CPU scale |",
            "| network | fully connected tanh nets (and CNNs, ResNets, Transformers) | tanh MLP "
            "64-64x5-10, no biases, He-Gaussian | CPU scale |",
            "| optimizer, sharpness | full-batch GD at several lr; λmax by Lanczos on the "
            'training set | the same (`sampling="full"`, `sharpness`), lr 0.4, 0.67, 1.0, '
            f"{numbers['steps']} steps | — |",
            "",
            "The paper's result is a figure: λmax rises to 2/lr and hovers there. Ours (the "
            "step at which each seed's λmax first reaches 0.95 · 2/lr; from then on λmax / (2/lr) "
            "over every later measurement of every seed, 1 = the edge):",
            "",
            "| lr | 2/lr | λmax at init | peak λmax | step reaching the edge (per seed) | "
            "λmax / (2/lr) from then on (min / mean / max) | training loss, start → end | "
            "fraction of loss records above the previous |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
