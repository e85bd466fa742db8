"""P7: normalization, weight decay and the effective learning rate (Hoffer, Banner, Golan,
Soudry, arXiv 1803.01814 "Norm matters"; Zhang, Wang, Xu, Grosse, arXiv 1810.12281 "Three
mechanisms of weight decay regularization"), from sweeps/configs/norm_matters.py,
norm_matters_exact.py, lp_batchnorm.py, lp_batchnorm_stress.py and weight_decay_adam.py.

norm_matters_norms: the authors' weight-decay experiment on a BN MLP (SGD + momentum): ||W_k||
                    and lr / ||W_k||^2 per hidden layer with wd, without wd (classifier
                    decayed only) and without wd with the authors' per-channel lr correction;
                    test accuracy; how far the corrected run's row directions are from the wd
                    run's, under the authors' per-epoch correction with momentum and under the
                    exact per-step identity (full-batch GD, float64, BN eps 0).
norm_matters_lp:    test accuracy of L2 / L1 / top-10 batch norm trained in float32, bfloat16
                    and float16 (evaluated in the run's precision), and in float16 with the
                    inputs x 1000 (our stress test: no change in exact arithmetic).
norm_matters_adam:  Adam with L2 and with decoupled weight decay over a grid of wd: test
                    accuracy, the first layer's norm and the training loss at the end.
Lines are seed means (NaN-skipping: a diverged run drops out), bands the seed min-max.
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = (
    "norm_matters",
    "norm_matters_exact",
    "lp_batchnorm",
    "lp_batchnorm_stress",
    "weight_decay_adam",
)
NAME = "norm_matters"
RUN_STYLE = {"wd": "-", "no_wd": "--", "corrected": ":"}
RUN_LABEL = {"wd": "wd on", "no_wd": "wd off", "corrected": "wd off + lr correction"}
RUN_COLOR = {"wd": "C0", "no_wd": "C1", "corrected": "C2"}
NORM_LABEL = {"l2": "L2", "l1": "L1", "linf": "top-10 (L∞)"}
PRECISION_COLOR = {"float32": "C0", "bfloat16": "C1", "float16": "C2"}


def _squeeze(ds):
    for a in ("lr", "batch_size", "weight_decay", "momentum"):
        if a in ds.dims and ds.sizes[a] == 1:
            ds = ds.isel({a: 0})
    return ds


def _settings(ds) -> dict:
    return json.loads(ds.attrs["spec"])


def _dirs(ds):
    """Row directions (run, seed, epoch, hidden_layer, row, col) in float64: hi + lo parts
    where the sweep stored them so."""
    if "directions_hilo" in ds:
        d = ds.directions_hilo
        return d.isel(part=0).astype("float64") + d.isel(part=1).astype("float64")
    return ds.directions.astype("float64")


def one_minus_cos(ds, run, ref="wd"):
    """1 - mean over rows and hidden layers of cos(u_run, u_ref): (seed, epoch)."""
    d = _dirs(ds)
    # skipna=False: a diverged run's NaN records stay NaN (a NaN-skipping sum would be 0)
    cos = (d.sel(run=run) * d.sel(run=ref)).sum("col", skipna=False)
    return 1 - cos.mean(["row", "hidden_layer"], skipna=False)


def max_gap(ds, run, ref="wd"):
    """max over rows, entries and hidden layers of |u_run - u_ref|: (seed, epoch)."""
    d = _dirs(ds)
    return np.abs(d.sel(run=run) - d.sel(run=ref)).max(["row", "col", "hidden_layer"], skipna=False)


def _stats(v) -> list:
    """[mean, min, max] over finite entries (NaN for none)."""
    v = np.asarray(v, float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [float("nan")] * 3
    return [float(v.mean()), float(v.min()), float(v.max())]


def numbers(datasets) -> dict:
    nm = _squeeze(datasets["norm_matters"])
    ex = _squeeze(datasets["norm_matters_exact"])
    lp = _squeeze(datasets["lp_batchnorm"])
    st = _squeeze(datasets["lp_batchnorm_stress"])
    ad = _squeeze(datasets["weight_decay_adam"])
    out: dict = {}
    s = _settings(nm)["settings"]
    g = _settings(nm)["grid"]
    q = int(s["epochs"]) // 4
    out["authors"] = {
        "epochs": int(s["epochs"]),
        "steps_per_epoch": int(np.ravel(nm.step.isel(epoch=1).values)[0]) // int(nm.epoch[1]),
        "width": int(s["width"]),
        "depth": int(s["depth"]),
        "lr": float(g["lr"][0]),
        "wd": float(g["weight_decay"][0]),
        "seeds": int(nm.sizes["seed"]),
        "runs": {},
    }
    for r in nm.run.values:
        r = str(r)
        d = nm.sel(run=r)
        ln = d.layer_norm.isel(layer=slice(0, int(s["depth"])))
        el = d.effective_lr.isel(layer=slice(0, int(s["depth"])))
        at_q = {"epoch": q}
        out["authors"]["runs"][r] = {
            "diverged": int((d.status != 0).sum()),
            "test_accuracy": _stats(d.test_accuracy.isel(epoch=-1)),
            "norm_first_quarter": _stats(ln.sel(at_q).mean("layer")),
            "norm_init": _stats(ln.isel(epoch=0).mean("layer")),
            "norm_final": _stats(ln.isel(epoch=-1).mean("layer")),
            "eff_lr_first_quarter": _stats(el.sel(at_q).mean("layer")),
            "eff_lr_init": _stats(el.isel(epoch=0).mean("layer")),
        }
        if r != "wd":
            out["authors"]["runs"][r]["one_minus_cos_final"] = _stats(
                one_minus_cos(nm, r).isel(epoch=-1)
            )
    # the corrected run's lr factors ||w_i||^2 / ||w_i^WD||^2 at the end (largest over rows)
    ratio = (nm.row_norms.sel(run="corrected") / nm.row_norms.sel(run="wd")) ** 2
    out["authors"]["factor_final"] = _stats(ratio.isel(epoch=-1).max(["row", "hidden_layer"]))
    steps = nm.diverged_step.sel(run="corrected").values.ravel()
    out["authors"]["diverged_steps"] = [int(x) for x in steps if x >= 0]
    se = _settings(ex)
    out["exact"] = {
        "steps": int(se["settings"]["steps"]),
        "lr": float(se["grid"]["lr"][0]),
        "wd": float(se["grid"]["weight_decay"][0]),
        "n_train": int(se["settings"]["n_train"]),
        "finished": int((ex.status == 0).sum()),
        "runs": int(ex.status.size),
        "max_gap": float(max_gap(ex, "corrected").max()),
        "norm_ratio_final": _stats(
            (ex.layer_norm.sel(run="corrected") / ex.layer_norm.sel(run="wd")).isel(
                epoch=-1, layer=slice(0, int(se["settings"]["depth"]))
            )
        ),
    }
    out["lp"] = {
        "epochs": int(_settings(lp)["settings"]["epochs"]),
        "seeds": int(lp.sizes["seed"]),
        "k": int(_settings(lp)["settings"]["k"]),
        "acc": {},
        "stress": {},
    }
    for p in lp.bn_p.values:
        p = str(p)
        out["lp"]["acc"][p] = {
            str(c): {
                "eval32": _stats(lp.test_accuracy.sel(bn_p=p, precision=c).isel(epoch=-1)),
                "eval_half": _stats(lp.test_accuracy_half.sel(bn_p=p, precision=c).isel(epoch=-1)),
                "diverged": int((lp.status.sel(bn_p=p, precision=c) != 0).sum()),
            }
            for c in lp.precision.values
        }
        sp = st.sel(bn_p=p).isel(precision=0)
        out["lp"]["stress"][p] = {
            "diverged": int((sp.status != 0).sum()),
            "runs": int(sp.status.size),
            "eval_half": _stats(sp.test_accuracy_half.isel(epoch=-1)),
        }
    out["lp"]["input_scale"] = float(_settings(st)["settings"]["input_scale"])
    wds = [float(w) for w in ad.weight_decay.values]
    acc = ad.test_accuracy.isel(epoch=-1)
    out["adam"] = {"wd": wds, "seeds": int(ad.sizes["seed"]), "epochs": int(ad.epoch.values[-1])}
    for dec in ad.decay.values:
        dec = str(dec)
        m = acc.sel(decay=dec).mean("seed").values
        best = int(np.nanargmax(m[1:])) + 1
        out["adam"][dec] = {
            "acc_mean": [float(x) for x in m],
            "best_wd": wds[best],
            "best_acc": _stats(acc.sel(decay=dec).isel(weight_decay=best)),
            "loss_final": [float(x) for x in ad.loss.isel(epoch=-1).sel(decay=dec).mean("seed")],
        }
    out["adam"]["baseline"] = _stats(acc.sel(decay="l2").isel(weight_decay=0))
    return out


def draw(datasets) -> list:
    plt = common.setup()
    nm = _squeeze(datasets["norm_matters"])
    ex = _squeeze(datasets["norm_matters_exact"])
    lp = _squeeze(datasets["lp_batchnorm"])
    st = _squeeze(datasets["lp_batchnorm_stress"])
    ad = _squeeze(datasets["weight_decay_adam"])
    nums = numbers(datasets)
    a = nums["authors"]
    depth = a["depth"]
    paths = []

    # ------------------------------------------------------------------ weight decay
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ep = nm.epoch.values
    layer_colors = plt.cm.viridis(np.linspace(0.0, 0.8, depth))
    ax = axes[0, 0]
    for r in nm.run.values:
        for k in range(depth):
            common.band(
                ax,
                ep,
                nm.layer_norm.sel(run=r, layer=k),
                color=layer_colors[k],
                linestyle=RUN_STYLE[str(r)],
                label=f"layer {k + 1}" if r == "wd" else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$\|W_k\|_F$")
    ax.set_title("(a) weight norms, hidden layers")
    style = [
        plt.Line2D([], [], color="k", linestyle=RUN_STYLE[r], label=RUN_LABEL[r]) for r in RUN_STYLE
    ]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + style, loc="upper left", ncol=2)

    ax = axes[0, 1]
    for r in ("wd", "no_wd"):
        for k in range(depth):
            common.band(
                ax,
                ep[1:],
                nm.effective_lr.sel(run=r, layer=k).isel(epoch=slice(1, None)),
                color=layer_colors[k],
                linestyle=RUN_STYLE[r],
                log=True,
            )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"lr / $\|W_k\|_F^2$ (lr after the schedule)")
    ax.set_title("(b) effective step size, wd on (solid) / off (dashed)")

    ax = axes[0, 2]
    for r in nm.run.values:
        r = str(r)
        n_div = a["runs"][r]["diverged"]
        label = RUN_LABEL[r] + (f" ({n_div} of {a['seeds']} diverged)" if n_div else "")
        common.band(
            ax,
            ep[1:],
            100 * nm.test_accuracy.sel(run=r).isel(epoch=slice(1, None)),
            color=RUN_COLOR[r],
            linestyle=RUN_STYLE[r],
            label=label,
        )
    ax.set_ylim(90, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("(c) test accuracy (the authors' figure 1)")
    ax.legend(loc="lower right")

    ax = axes[1, 0]
    for r in ("corrected", "no_wd"):
        common.band(
            ax,
            ep[1:],
            one_minus_cos(nm, r).isel(epoch=slice(1, None)),
            color=RUN_COLOR[r],
            linestyle=RUN_STYLE[r],
            label=RUN_LABEL[r],
            log=True,
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("1 - mean cos(row directions, wd run's)")
    ax.set_title("(d) authors' correction: directions vs the wd run")
    ax.legend(loc="lower right")

    ax = axes[1, 1]
    es = ex.epoch.values  # full batch: one step per epoch
    for r in ex.run.values:
        for k in range(depth):
            common.band(
                ax,
                es,
                ex.layer_norm.sel(run=r, layer=k),
                color=layer_colors[k],
                linestyle=RUN_STYLE[str(r)],
            )
    ax.set_xlabel("GD step")
    ax.set_ylabel(r"$\|W_k\|_F$")
    ax.set_title("(e) exact identity: norms, wd (solid) / corrected (dotted)")

    ax = axes[1, 2]
    gap = max_gap(ex, "corrected").isel(epoch=slice(1, None))
    common.band(
        ax,
        es[1:],
        np.maximum(gap, 1e-18),
        color=RUN_COLOR["corrected"],
        log=True,
        label="corrected vs wd (float64)",
    )
    ax.axhline(np.finfo(np.float64).eps, color="0.5", linestyle=":", label="float64 eps")
    ax.set_yscale("log")
    ax.set_ylim(1e-17, 1e-12)
    ax.set_xlabel("GD step")
    ax.set_ylabel(r"max $|u_i - u_i^{wd}|$ over rows")
    ax.set_title("(f) exact identity: directions")
    ax.legend(loc="upper left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    common.caption(
        fig,
        f"(a-d) BN MLP on digits, {depth} hidden layers of {a['width']} (Linear+bias -> BN -> "
        f"ReLU), SGD lr {a['lr']:g} x0.1 each quarter, momentum 0.9, batch 128, wd "
        f"{a['wd']:g} (wd off: classifier only), {a['epochs']} epochs; correction: per row lr "
        "||w||^2/||w_WD(end of epoch)||^2 on the momentum buffer. (e-f) full-batch GD, lr "
        f"{nums['exact']['lr']:g}, wd {nums['exact']['wd']:g}, float64, BN eps 0, lr' = lr "
        "r'^2/((1 - lr wd) r^2) per row and step.",
    )
    paths += common.save(fig, "norm_matters_norms")

    # ------------------------------------------------------------------ Lp batch norm
    fig, ax = plt.subplots(1, 1, figsize=(8, 3.6))
    norms_ = [str(p) for p in lp.bn_p.values]
    precs = [str(c) for c in lp.precision.values]
    width = 0.8 / (len(precs) + 1)
    for j, c in enumerate(precs):
        v = 100 * lp.test_accuracy_half.sel(precision=c).isel(epoch=-1).values  # (norm, seed)
        x = np.arange(len(norms_)) + (j - len(precs) / 2) * width
        mean = np.nanmean(v, 1)
        ax.bar(x, mean, width, color=PRECISION_COLOR[c], label=c)
        ax.errorbar(
            x,
            mean,
            yerr=[mean - np.nanmin(v, 1), np.nanmax(v, 1) - mean],
            fmt="none",
            ecolor="k",
            capsize=2,
        )
    x = np.arange(len(norms_)) + (len(precs) / 2) * width
    for i, p in enumerate(norms_):
        v = 100 * st.sel(bn_p=p).isel(precision=0).test_accuracy_half.isel(epoch=-1).values
        if np.all(np.isnan(v)):
            ax.text(
                x[i],
                91,
                "diverged\n(all seeds)",
                ha="center",
                va="bottom",
                fontsize=7,
                color="C3",
                rotation=90,
            )
        else:
            ax.bar(x[i], np.nanmean(v), width, color="C3")
            ax.errorbar(
                x[i],
                np.nanmean(v),
                yerr=[[np.nanmean(v) - np.nanmin(v)], [np.nanmax(v) - np.nanmean(v)]],
                fmt="none",
                ecolor="k",
                capsize=2,
            )
    handles = [plt.Rectangle((0, 0), 1, 1, color=PRECISION_COLOR[c], label=c) for c in precs]
    handles.append(
        plt.Rectangle(
            (0, 0), 1, 1, color="C3", label=f"float16, inputs x{nums['lp']['input_scale']:g} (ours)"
        )
    )
    ax.set_xticks(np.arange(len(norms_)), [NORM_LABEL[p] for p in norms_])
    ax.set_ylim(90, 101)
    ax.set_ylabel("test accuracy (%), eval in the run's precision")
    ax.set_title("L2 / L1 / top-10 batch norm across precisions")
    ax.legend(handles=handles, loc="upper center", ncol=4)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.caption(
        fig,
        f"BN MLP on digits (3 x 64), SGD lr 0.1, momentum 0.9, wd 1e-4, {nums['lp']['epochs']} "
        "epochs (lr x0.1 at 24, 37, 49), batch 128; half precision: forward and backward in "
        f"half with float32 master weights, batch sums in float32; {nums['lp']['seeds']} seeds "
        "(bar: mean, whiskers: min-max).",
    )
    paths += common.save(fig, "norm_matters_lp")

    # ------------------------------------------------------------------ Adam
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    wds = np.asarray(nums["adam"]["wd"])
    pos = wds > 0
    for dec, color in (("l2", "C0"), ("decoupled", "C1")):
        d = ad.sel(decay=dec).isel(epoch=-1)
        label = "L2 (in the gradient)" if dec == "l2" else "decoupled (AdamW)"
        common.band(
            axes[0],
            wds[pos],
            100 * d.test_accuracy.isel(weight_decay=pos),
            color=color,
            marker="o",
            label=label,
        )
        common.band(
            axes[1],
            wds[pos],
            d.layer_norm.isel(layer=0, weight_decay=pos),
            color=color,
            marker="o",
            label=label,
            log=True,
        )
        common.band(
            axes[2],
            wds[pos],
            d.loss.isel(weight_decay=pos),
            color=color,
            marker="o",
            label=label,
            log=True,
        )
    base = ad.sel(decay="l2").isel(epoch=-1, weight_decay=0)
    axes[0].axhline(
        100 * float(base.test_accuracy.mean()), color="0.5", linestyle=":", label="wd 0"
    )
    axes[1].axhline(float(base.layer_norm.isel(layer=0).mean()), color="0.5", linestyle=":")
    axes[2].axhline(float(base.loss.mean()), color="0.5", linestyle=":")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("weight decay wd")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].set_ylim(90, 100)
    lowest = 100 * float(ad.sel(decay="l2").isel(epoch=-1, weight_decay=-1).test_accuracy.mean())
    axes[0].text(
        wds[-1], 90.3, f"L2 at wd {wds[-1]:g}: {lowest:.0f}%", ha="right", fontsize=7, color="C0"
    )
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel(r"$\|W_1\|_F$ at the end")
    axes[2].set_ylabel("training loss at the end")
    axes[0].set_title("(a) test accuracy")
    axes[1].set_title("(b) first layer's norm")
    axes[2].set_title("(c) training loss")
    axes[0].legend(loc="lower left")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    common.caption(
        fig,
        f"Adam lr 1e-3 (x0.1 at 30/60/90% of {nums['adam']['epochs']} epochs), betas "
        "(0.9, 0.999), eps 1e-8, batch 128; BN MLP on digits (3 x 64, non-affine BN, Glorot "
        f"init); decay on every parameter; {nums['adam']['seeds']} seeds.",
    )
    paths += common.save(fig, "norm_matters_adam")
    common.save_numbers(NAME, nums)
    return paths


def _acc(s) -> str:
    """A [mean, min, max] accuracy as a percentage with its seed range."""
    if not np.isfinite(s[0]):
        return "—"
    return f"{100 * s[0]:.1f}% ({100 * s[1]:.1f}-{100 * s[2]:.1f})"


def _range(s) -> str:
    """min-max of a [mean, min, max], or one value where they agree to 3 digits."""
    lo, hi = f"{s[1]:.3g}", f"{s[2]:.3g}"
    return lo if lo == hi else f"{lo}-{hi}"


def _accuracy_sentence(runs) -> str:
    """Whether the authors' accuracy gap (wd off below wd on) shows here, from the numbers."""
    on, off = runs["wd"]["test_accuracy"][0], runs["no_wd"]["test_accuracy"][0]
    if off < on - 0.005:
        return f"As in the authors' figure, wd off ends lower ({100 * (on - off):.1f} points)."
    return (
        "Unlike the authors' CIFAR-10 figure, wd off does not end lower here "
        f"({100 * off:.1f}% against {100 * on:.1f}%)."
    )


def _adam_sentence(ad) -> str:
    """Which form's best test accuracy is higher here, from the numbers."""
    d, l2 = ad["decoupled"]["best_acc"][0], ad["l2"]["best_acc"][0]
    if d > l2:
        return (
            f"Here too: decoupled decay's best is {100 * (d - l2):.1f} points above L2's, while "
            "L2 at the decays that help decoupled destroys training (panel c)."
        )
    return f"Not here: L2's best is {100 * (l2 - d):.1f} points above decoupled decay's."


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    a, e, lp, ad = numbers["authors"], numbers["exact"], numbers["lp"], numbers["adam"]
    runs = a["runs"]
    run_rows = [
        f"| {name} | {_acc(runs[r]['test_accuracy'])} | {fmt(runs[r]['norm_first_quarter'][0])}"
        f" | {fmt(runs[r]['eff_lr_first_quarter'][0])} | "
        + (fmt(runs[r]["one_minus_cos_final"][0]) if r != "wd" else "—")
        + f" | {runs[r]['diverged']} of {a['seeds']} |"
        for r, name in (("wd", "wd on"), ("no_wd", "wd off"), ("corrected", "wd off + correction"))
    ]
    lp_rows = []
    for p, name in (("l2", "L2"), ("l1", "L1"), ("linf", f"top-{lp['k']}")):
        cells = [_acc(lp["acc"][p][c]["eval_half"]) for c in ("float32", "bfloat16", "float16")]
        s = lp["stress"][p]
        stress = (
            f"diverged ({s['diverged']} of {s['runs']})"
            if s["diverged"] == s["runs"]
            else _acc(s["eval_half"])
        )
        lp_rows.append(f"| {name} | " + " | ".join(cells) + f" | {stress} |")
    l2_32 = lp["acc"]["l2"]["float32"]["eval_half"][0]
    deficits = {p: l2_32 - lp["acc"][p]["float32"]["eval_half"][0] for p in ("l1", "linf")}
    wd_grid = ", ".join(fmt(w) for w in ad["wd"][1:])
    return "\n".join(
        [
            "**P7. Normalization, weight decay and the effective learning rate** (Hoffer, "
            "Banner, Golan, Soudry, arXiv 1803.01814; Zhang, Wang, Xu, Grosse, arXiv "
            "1810.12281) — `make figures FIG=norm_matters`",
            "",
            common.image("norm_matters_norms"),
            "",
            "| weight decay vs lr correction | authors (eladhoffer/norm_matters, "
            "`normmatters_wd/`) | ours | why different |",
            "|---|---|---|---|",
            "| network | VGG11: conv (bias) → BN (affine) → ReLU, linear classifier; torch 0.3 "
            "init (BN weight U(0, 1)) | MLP on digits, "
            f"{a['depth']} × {a['width']}: Linear (bias) → BN → ReLU, linear classifier; "
            "the same init | CPU scale |",
            f"| optimizer | SGD lr 0.1, momentum 0.9, wd 5e-4 on every parameter, batch 128, "
            f"lr × 0.1 every 20 of 80 epochs | the same, {a['epochs']} epochs of "
            f"{a['steps_per_epoch']} steps, lr × 0.1 every {a['epochs'] // 4} | 80 epochs of "
            "digits are 960 steps, shorter than the norms' decay time (1000 steps) |",
            "| runs | wd on; wd off except the classifier; wd off + per-channel lr × "
            "‖w‖²/‖w_WD‖² (WD norms at the end of the epoch, on the momentum buffer) | the "
            'same: `dyn.sgd(decay_mask=..., lr_scale=dyn.steps.norm_matched_lr(form="authors"))`, '
            "the reference from the wd run of the same seed | — |",
            "| data | CIFAR-10, crop + flip | digits, per-pixel standardized, no augmentation "
            f"| CPU scale; {a['seeds']} seeds (authors: 1) |",
            "",
            "Our numbers (authors: figure 1 and the poster show the three curves reaching the "
            "same test accuracy, wd off lower; no number in the text we quote). Test accuracy "
            "at the end (seed mean, range), ‖W‖ and lr/‖W‖² at the end of the first lr phase "
            "(mean over hidden layers and seeds), 1 − mean cosine of the row directions with "
            "the wd run's at the end, runs that diverged:",
            "",
            "| run | test accuracy | ‖W‖ | lr/‖W‖² | 1 − cos vs wd | diverged |",
            "|---|---|---|---|---|---|",
            *run_rows,
            "",
            "With weight decay the norms stop growing and the effective step lr/‖W‖² settles "
            "where the decay balances the gradient's growth; without it the norms keep "
            "growing and the step shrinks. "
            + _accuracy_sentence(runs)
            + " The authors' approximate correction (per epoch, through momentum) keeps the "
            "wd run's test accuracy in the runs that finish but not its directions (its rows "
            "end farther from the wd run's than the uncorrected run's); its factors "
            "‖w‖²/‖w_WD‖² grow with the decay-free norms (largest over rows at the end: "
            f"{fmt(a['factor_final'][1])}-{fmt(a['factor_final'][2])} in the runs that finish), "
            f"and {runs['corrected']['diverged']} of {a['seeds']} corrected runs diverged"
            + (
                f" (at step {', '.join(map(str, a['diverged_steps']))})"
                if a["diverged_steps"]
                else ""
            )
            + ". The exact form of the identity (no momentum, "
            "per step, BN eps 0: `norm_matters_exact`, full-batch GD in float64, "
            f"{e['steps']} steps, lr {fmt(e['lr'])}, wd {fmt(e['wd'])}) follows the wd run's "
            f"row directions to {fmt(e['max_gap'], 2)} (max over rows, layers, records and "
            f"seeds; {e['finished']} of {e['runs']} runs) while its norms end "
            f"{_range(e['norm_ratio_final'])}× the wd run's.",
            "",
            common.image("norm_matters_lp"),
            "",
            "| Lp batch norm | authors (norm_matters `models/lp_norm.py`, convNet.pytorch) | ours "
            "| why different |",
            "|---|---|---|---|",
            "| norms | L2: (x−μ)/√(mean (x−μ)² + 1e-5); L1: (x−μ)/(√(π/2) mean \\|x−μ\\| + 1e-5); "
            "top-k: (x−μ)/(c_n mean top-k \\|x−μ\\| + 1e-5), n = N·H·W | the same "
            f'(`norm="batch", bn_p=...`), k = {lp["k"]} (convNet.pytorch; norm_matters\' '
            "default is 1) | — |",
            "| running statistics | 0.1 of the old value, average of the reciprocal scale | "
            "PyTorch's (momentum 0.1 on the divisor) for all three | one convention for the "
            "three norms |",
            "| half precision | the whole model in half (`model.type(half)`), no master copy, "
            "no loss scaling | forward and backward in half, batch sums accumulated in float32 "
            "(PyTorch's reduction), float32 master weights, no loss scaling; eval in the run's "
            "precision | the library keeps float32 master weights |",
            f"| network, schedule | ResNet-56 on CIFAR-10, SGD lr 0.1, momentum 0.9, wd 1e-4, "
            f"lr × 0.1 at 81/122/164 | MLP on digits (3 × 64), the same optimizer, "
            f"{lp['epochs']} epochs, lr × 0.1 at the same fractions | CPU scale |",
            "",
            f"Test accuracy, eval in the run's precision ({lp['seeds']} seeds; mean, range); "
            f"last column: float16 with the inputs × {lp['input_scale']:g}, our stress "
            "test (a BN after the first layer makes it a no-op in exact arithmetic):",
            "",
            f"| BN | float32 | bfloat16 | float16 | float16, inputs × {lp['input_scale']:g} |",
            "|---|---|---|---|---|",
            *lp_rows,
            "",
            "Authors: L1 and top-k batch norm match L2's accuracy, and in half precision L1 "
            "trains where L2 does not (figures; ResNet on CIFAR-10 / ImageNet). Ours: in "
            f"float32 L1 ends {100 * deficits['l1']:.2f} and top-k "
            f"{100 * deficits['linf']:.2f} points below L2 (seed ranges overlap); at this "
            "scale float16 does not hurt L2 (the pre-activations stay far below the overflow "
            "of their squares, where \\|x − μ\\| > 256); with the inputs scaled so that they do, L2 "
            "diverges in float16 and L1 and top-k train as before.",
            "",
            common.image("norm_matters_adam"),
            "",
            "| Adam: L2 vs decoupled | authors (gd-zhang/Weight-Decay) | ours | why different |",
            "|---|---|---|---|",
            '| optimizer | Adam lr 1e-3, (0.9, 0.999), eps 1e-8; "l2": wd w in the gradient; '
            '"wd": w ← w − lr (step + wd w) | the same: `dyn.adam(weight_decay=...)`, "l2" and '
            '"decoupled" | — |',
            f"| values | decoupled wd 0.3 (no Adam + L2 config with wd > 0) | both on one grid, "
            f"wd ∈ {{{wd_grid}}} | lr·wd·steps sets the decoupled shrink: our 216 steps per lr "
            "phase need wd ~ 30 for the authors' exp(−7) |",
            "| network | VGG16 / ResNet32 with non-affine BN, Glorot init, zero biases; 200 epochs, "
            f"lr × 0.1 every 60 | MLP on digits (3 × 64), the same BN and init; "
            f"{ad['epochs']} epochs, lr × 0.1 at the same fractions | CPU scale |",
            "",
            "Our numbers: the best test accuracy of each form over the grid "
            f"(wd 0: {_acc(ad['baseline'])}): L2 {_acc(ad['l2']['best_acc'])} at wd "
            f"{fmt(ad['l2']['best_wd'])}; decoupled {_acc(ad['decoupled']['best_acc'])} at wd "
            f"{fmt(ad['decoupled']['best_wd'])}. Zhang et al. find decoupled decay the better "
            "regularizer for Adam (figures and tables on CIFAR; no number we quote). "
            + _adam_sentence(ad),
        ]
    )
