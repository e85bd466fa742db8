"""P11: SGD on structured data changes few activation patterns (Li & Liang 2018).

activation_patterns: against the width m (log-log), at the end of training: the fraction of
(training point, unit) activation patterns flipped since initialization and the relative
change ||W_T - W_0||_F / ||W_0||_F of the trained layer, with least-squares slopes; both over
training per width; and the singular values of W_T - W_0 (normalized by the largest).
Points: seeds; lines: seed means.
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = ("activation_patterns",)
TOP = 2  # the XOR task's class structure lives in the 2-D plane of the embedded centres


def _runs(ds):
    keep = {"width", "seed", "step", "layer", "dw_sv_index"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def slope(widths, values) -> float:
    """Least-squares slope of log(values) against log(widths) (values: (width, seed))."""
    x = np.repeat(np.log(np.asarray(widths, float)), np.shape(values)[1])
    y = np.log(np.asarray(values, float)).ravel()
    return float(np.polyfit(x, y, 1)[0])


def first_full_accuracy(ds) -> np.ndarray:
    """Step of the first record with 100% training accuracy, (width, seed); -1 if never."""
    acc = ds.accuracy.transpose("width", "seed", "step").values
    hit = acc >= 1.0
    steps = ds.step.values
    return np.where(hit.any(-1), steps[np.argmax(hit, axis=-1)], -1)


def numbers(ds) -> dict:
    end = ds.isel(step=-1)
    widths = [int(w) for w in ds.width.values]
    flip = end.flipped.isel(layer=0).transpose("width", "seed").values
    rel = end.rel_dist.isel(layer=0).transpose("width", "seed").values
    sv = end.dw_sv.transpose("width", "seed", "dw_sv_index").values
    energy = np.nansum(sv[..., :TOP] ** 2, -1) / np.nansum(sv**2, -1)
    first = first_full_accuracy(ds)
    return dict(
        widths=widths,
        steps=int(ds.step.values[-1]),
        flipped=flip.mean(1).tolist(),
        flipped_max_at_largest=float(flip[-1].max()),
        rel_dist=rel.mean(1).tolist(),
        slope_flipped=slope(widths, flip),
        slope_rel_dist=slope(widths, rel),
        top_energy=float(energy.min()),
        top=TOP,
        test_accuracy_min=float(end.test_accuracy.min()),
        train_accuracy_min=float(end.accuracy.min()),
        first_full_accuracy_max=int(first.max()),
        never_full=int(np.sum(first < 0)),
    )


def draw(datasets) -> list:
    plt = common.setup()
    raw = datasets["activation_patterns"]
    ds = _runs(raw)
    s = json.loads(raw.attrs["spec"])["settings"]
    n = numbers(ds)
    widths = np.asarray(n["widths"], float)
    end = ds.isel(step=-1)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(0.85 * i / max(len(widths) - 1, 1)) for i in range(len(widths))]
    caption = (
        f"Two-layer ReLU net, output fixed to ±1/sqrt(m), first layer trained by SGD (lr "
        f"{float(raw.lr.values[0]):g}, batch {s['batch']}, {n['steps']} steps) on the XOR of balls "
        f"in R^{s['d']} ({s['n_train']} points); {ds.sizes['seed']} seeds."
    )

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, var, key, label in (
        (axes[0], "flipped", "slope_flipped", "fraction of activation patterns flipped"),
        (axes[1], "rel_dist", "slope_rel_dist", r"$\|W_T - W_0\|_F / \|W_0\|_F$"),
    ):
        v = end[var].isel(layer=0).transpose("width", "seed").values
        for j in range(v.shape[1]):
            ax.scatter(widths, v[:, j], s=10, color="C0")
        ax.plot(widths, v.mean(1), color="C0", lw=1)
        ref = v.mean(1)[0] * (widths / widths[0]) ** -0.5
        ax.plot(widths, ref, color="0.5", ls="--", lw=0.8, label="slope -1/2")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("width m")
        ax.set_title(f"{label}\nat step {n['steps']}: slope {n[key]:.2f}")
        ax.legend(frameon=False)
    ax = axes[2]
    for i, w in enumerate(ds.width.values):
        common.band(
            ax,
            ds.step.values,
            ds.flipped.sel(width=w).isel(layer=0),
            color=colors[i],
            label=f"m = {int(w)}",
        )
    ax.set_xlabel("SGD step")
    ax.set_title("flipped fraction over training")
    ax.set_yscale("log")
    ax.legend(frameon=False)
    ax = axes[3]
    for i, w in enumerate(ds.width.values):
        common.band(
            ax,
            np.arange(1, end.sizes["dw_sv_index"] + 1),
            end.dw_sv.sel(width=w) / end.dw_sv.sel(width=w).isel(dw_sv_index=0),
            color=colors[i],
            label=f"m = {int(w)}",
            marker=".",
            log=True,
        )
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_title(
        f"singular values of $W_T - W_0$, / the largest\ntop {TOP} carry ≥ "
        f"{100 * n['top_energy']:.1f}% of the squared norm"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(fig, caption)
    paths = common.save(fig, "activation_patterns")
    common.save_numbers("activation_patterns", n)
    return paths


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    widths = numbers["widths"]
    rows = [
        f"| {w} | {fmt(f)} | {fmt(r)} |"
        for w, f, r in zip(widths, numbers["flipped"], numbers["rel_dist"], strict=True)
    ]
    return "\n".join(
        [
            "**P11. SGD on structured data: few activation patterns change** (Li & Liang, "
            "NeurIPS 2018) — `make figures FIG=activation_patterns`",
            "",
            common.image("activation_patterns"),
            "",
            "| | authors | ours | why different |",
            "|---|---|---|---|",
            "| network | two-layer ReLU, no bias, output weights fixed random signs, first layer "
            "trained | the same, output ±1/sqrt(m) (their lr divided by m) | one lr for every width |",
            "| data | mixtures of well-separated distributions; 2-D XOR of balls as the "
            "illustration | that XOR of balls (centred) in R^20: random orthonormal embedding plus "
            "a uniform 20-D ball of radius 0.5 | CPU scale |",
            f"| training | minibatch SGD, cross-entropy | SGD lr 0.2, batch 32, "
            f"{numbers['steps']} steps, widths {', '.join(map(str, widths))} | — |",
            "",
            "The paper shows these as figures (no numbers quoted here). Ours, seed means at the "
            f"last step (100% training accuracy first reached by step "
            f"{numbers['first_full_accuracy_max']} in every run; at the end, training accuracy "
            f"≥ {fmt(numbers['train_accuracy_min'])} and test accuracy ≥ "
            f"{fmt(numbers['test_accuracy_min'])}):",
            "",
            "| width m | flipped activation patterns | ‖W_T − W_0‖_F / ‖W_0‖_F |",
            "|---|---|---|",
            *rows,
            "",
            f"Log-log slopes against the width: flipped fraction {fmt(numbers['slope_flipped'], 2)}, "
            f"relative change {fmt(numbers['slope_rel_dist'], 2)} (the scaling argument gives "
            f"−1/2); at the largest width at most {fmt(numbers['flipped_max_at_largest'])} of the "
            f"patterns flipped. The top {numbers['top']} singular values of W_T − W_0 carry at least "
            f"{fmt(100 * numbers['top_energy'])}% of its squared Frobenius norm (the task's class "
            "structure spans the 2-D plane of the centres).",
        ]
    )
