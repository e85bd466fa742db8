"""P8: a one-neuron ResNet is a universal approximator, a width-d ReLU net is not (Lin &
Jegelka 2018).

one_neuron_resnet_regions: the decision region {f > 0} on [-3, 3]^2 at the end of training of
every run at the larger lr, one row per network (one-neuron ResNet, fully connected width 2 and
width 3, all 10 hidden layers deep), with the unit disc and the ring drawn.
one_neuron_resnet_accuracy: test accuracy of every run, and the fraction of positive
predictions on circles of radius 5 and 20 (0: the positive region does not reach them).
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = ("one_neuron_resnet",)
NAMES = {
    "resnet": "one-neuron ResNet",
    "fc2": "fully connected, width 2",
    "fc3": "fully connected, width 3",
}
DEAD = 2


def _runs(ds):
    keep = {"arch", "depth", "seed", "lr", "step", "decision_point"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def _settings(ds) -> dict:
    return json.loads(ds.attrs["spec"])["settings"]


def numbers(ds) -> dict:
    """Per depth and network over all runs (seeds x lr): how many died (output constant on the
    data), test accuracy of the live runs, and how many live runs predict +1 on the far circle
    (radius 20) and at most how much of it."""
    out = {}
    for depth in ds.depth.values:
        per = {}
        for arch in ds.arch.values:
            x = ds.sel(depth=depth, arch=arch)
            status = x.status.values.ravel()
            live = status == 0
            acc = x.test_accuracy.isel(step=-1).values.ravel()[live]
            far = x.positive_r20.isel(step=-1).values.ravel()[live]
            mid = x.positive_r5.isel(step=-1).values.ravel()[live]
            per[str(arch)] = dict(
                runs=int(status.size),
                dead=int(np.sum(status == DEAD)),
                live=int(np.sum(live)),
                test_accuracy=[float(acc.min()), float(np.median(acc)), float(acc.max())]
                if acc.size
                else None,
                live_above_095=int(np.sum(acc >= 0.95)),
                far_positive_runs=int(np.sum(far > 0)),
                far_positive_max=float(far.max()) if far.size else None,
                mid_positive_max=float(mid.max()) if mid.size else None,
                bounded_and_095=int(np.sum((acc >= 0.95) & (far == 0))),
            )
        out[str(int(depth))] = per
    return out


def _circles(ax, s):
    t = np.linspace(0, 2 * np.pi, 200)
    for r, ls in ((1.0, "-"), (s["ring"][0], "--"), (s["ring"][1], "--")):
        ax.plot(r * np.cos(t), r * np.sin(t), color="k", lw=0.6, ls=ls)


def draw(datasets) -> list:
    plt = common.setup()
    ds = _runs(datasets["one_neuron_resnet"])
    s = _settings(datasets["one_neuron_resnet"])
    depth = int(ds.depth.values[len(ds.depth.values) // 2])
    d = ds.sel(depth=depth)
    lr = float(d.lr.values.max())
    seeds = d.seed.values
    n = int(s["grid_n"])
    lim = float(s["grid_lim"])
    paths = []
    caption = (
        f"{s['n_train']} training points (disc r<=1: +1, ring {s['ring'][0]}<=r<={s['ring'][1]}: -1), "
        f"logistic loss, Adam lr {lr:g}, {s['steps']} steps of batch {s['batch']}; "
        f"{depth} hidden layers; fully connected nets initialized alive (geometry.live_init)."
    )

    fig, axes = plt.subplots(
        len(d.arch), len(seeds), figsize=(2.0 * len(seeds), 2.1 * len(d.arch) + 0.4)
    )
    for row, arch in zip(axes, d.arch.values, strict=True):
        for ax, seed in zip(row, seeds, strict=True):
            x = d.sel(arch=arch, seed=seed, lr=lr)
            f = x.decision.isel(step=-1).values.reshape(n, n)
            ax.imshow(
                f > 0,
                extent=(-lim, lim, -lim, lim),
                origin="lower",
                cmap="Blues",
                vmin=0,
                vmax=1.6,
                interpolation="nearest",
            )
            _circles(ax, s)
            dead = int(x.status) == DEAD
            acc = float(x.test_accuracy.isel(step=-1))
            far = float(x.positive_r20.isel(step=-1))
            ax.set_title(
                ("dead: " if dead else "") + f"acc {acc:.3f}, r=20: {100 * far:.1f}% +",
                fontsize=7,
            )
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(NAMES.get(str(arch), str(arch)))
    fig.suptitle(
        "Decision region f > 0 (blue) after training, seed by seed; lines: r = 1, and the ring",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    common.caption(fig, caption)
    paths += common.save(fig, "one_neuron_resnet_regions")

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.1))
    archs = list(ds.arch.values)
    for j, (var, label) in enumerate(
        (
            ("test_accuracy", "test accuracy"),
            ("positive_r5", "fraction f > 0 on the circle r = 5"),
            ("positive_r20", "fraction f > 0 on the circle r = 20"),
        )
    ):
        ax = axes[j]
        for i, arch in enumerate(archs):
            for k, dep in enumerate(ds.depth.values):
                x = ds.sel(arch=arch, depth=dep)
                v = x[var].isel(step=-1).values.ravel()
                st = x.status.values.ravel()
                jitter = (
                    i + 0.25 * (k - (len(ds.depth) - 1) / 2) + 0.04 * np.arange(v.size) / v.size
                )
                ax.scatter(
                    jitter[st == 0],
                    v[st == 0],
                    s=12,
                    color=f"C{k}",
                    label=f"depth {dep}" if i == 0 else None,
                )
                ax.scatter(
                    jitter[st == DEAD],
                    v[st == DEAD],
                    s=12,
                    facecolors="none",
                    edgecolors="0.5",
                    label="dead" if i == 0 and k == 0 else None,
                )
        ax.set_xticks(
            range(len(archs)),
            [NAMES.get(str(a), str(a)).replace(", ", "\n") for a in archs],
            fontsize=7,
        )
        ax.set_ylabel(label)
        if var == "test_accuracy":
            ax.axhline(0.95, color="0.5", ls=":", lw=0.8)
    axes[0].legend(frameon=False, fontsize=7)
    fig.suptitle(
        "Every run (seeds x lr): accuracy, and whether the positive region reaches far circles",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(fig, caption)
    paths += common.save(fig, "one_neuron_resnet_accuracy")
    common.save_numbers("one_neuron_resnet", dict(depth=depth, lr=lr, by_depth=numbers(ds)))
    return paths


def _verdict(numbers: dict) -> str:
    """The sentence the table supports, from the numbers."""
    out = []
    for depth, per in numbers["by_depth"].items():
        res, fc2 = per.get("resnet"), per.get("fc2")
        if res:
            ok = res["bounded_and_095"] == res["runs"]
            out.append(
                f"depth {depth}: "
                + (
                    "every ResNet run reaches accuracy ≥ 0.95 with no positive prediction at r = 20"
                    if ok
                    else f"{res['bounded_and_095']} of {res['runs']} ResNet runs reach accuracy ≥ "
                    "0.95 with no positive prediction at r = 20"
                )
            )
        if fc2 and fc2["live"]:
            unbounded = fc2["far_positive_runs"] == fc2["live"]
            out.append(
                (
                    "every live width-2 run predicts +1 on the far circle (each level-set "
                    "component of a width-d ReLU net is unbounded)"
                    if unbounded
                    else f"{fc2['far_positive_runs']} of {fc2['live']} live width-2 runs predict "
                    "+1 on the far circle"
                )
                + f", and {fc2['live_above_095']} of them reach accuracy 0.95"
            )
    return "; ".join(out) + "."


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    rows = []
    for depth, per in numbers["by_depth"].items():
        for arch in [a for a in NAMES if a in per]:
            n = per[arch]
            acc = n["test_accuracy"]
            rows.append(
                f"| {NAMES.get(arch, arch)} | {depth} | {n['live']} of {n['runs']} | "
                + (f"{fmt(acc[0])} / {fmt(acc[1])} / {fmt(acc[2])}" if acc else "—")
                + f" | {n['far_positive_runs']} of {n['live']} | "
                + (fmt(n["far_positive_max"]) if n["far_positive_max"] is not None else "—")
                + f" | {n['bounded_and_095']} |"
            )
    return "\n".join(
        [
            "**P8. A one-neuron ResNet is a universal approximator** (Lin & Jegelka, NeurIPS "
            "2018) — `make figures FIG=one_neuron_resnet`",
            "",
            common.image("one_neuron_resnet_regions"),
            "",
            "| | authors | ours | why different |",
            "|---|---|---|---|",
            "| task | d = 2, unit ball vs a surrounding ring (section 3) | 2000 train / 2000 test "
            "points, disc r ≤ 1 vs ring 1.5 ≤ r ≤ 2.5 | ring radii and counts not stated in what "
            "we read |",
            "| networks | one-neuron ResNet blocks x + V relu(Ux + b); fully connected width d | "
            "the same blocks + linear readout with bias; fully connected width 2 and 3 (control), "
            "biases, 10 hidden layers each | one depth at CPU scale |",
            "| init | not stated | He-Gaussian, zero biases; fully connected nets redrawn until "
            "alive on the data | narrow deep ReLU nets are mostly dead at init |",
            "| training | not stated | logistic loss, Adam lr {0.003, 0.01}, batch 128, 2000 steps, "
            "4 seeds | — |",
            "",
            "The paper shows this as a figure (no numbers). Ours, over all runs of each network "
            "(dead: the output is constant on the data):",
            "",
            "| network | depth | live runs | test accuracy of live runs (min / median / max) | "
            "live runs with f > 0 on the circle r = 20 | largest such fraction | live runs with "
            "accuracy ≥ 0.95 and none positive at r = 20 |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            _verdict(numbers),
        ]
    )
