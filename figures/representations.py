"""P12: representation statistics and identical-output networks (Choi, Lee, Shin, Rhee, arXiv
1811.03666).

representations_stats: every statistic of every hidden layer's representation on the test
images against test accuracy, over the sweep's networks (lr x weight decay x seeds), with the
Spearman rank correlation per layer.
representations_ion: identical-output networks built from one trained network's final
parameters (kept in the store): its last hidden representation, and the same network with that
representation passed through an inserted linear layer and moved by an affine map (whitened,
or mixed toward one common direction), with dead units appended, or with units rescaled; the
statistics move, the outputs do not.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from dynamics import losses as _losses
from dynamics import representations as rep
from figures import common

SWEEPS = ("representations",)
STATS = ("zero_frac", "dead", "rank", "eff_rank", "abs_corr", "amplitude")
LABELS = {
    "zero_frac": "fraction of zeros",
    "dead": "dead units",
    "rank": "numerical rank",
    "eff_rank": "effective rank",
    "abs_corr": "mean |correlation|",
    "amplitude": "mean |h|",
}
# the statistics' names in gallery tables (a "|" would end a table cell)
TABLE_LABELS = {**LABELS, "abs_corr": "mean abs. correlation", "amplitude": "mean abs(h)"}
ION_RUN = dict(seed=0, lr=3e-3, weight_decay=0.0)  # the network the constructions start from
N_DEAD = 50
MIX = 10.0  # A = I + MIX 1 1^T / m: every unit gets a common component


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size)
        for u in np.unique(v):  # ties share their mean rank
            r[v == u] = r[v == u].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _final(ds):
    return ds.isel(epoch=-1, batch_size=0) if "batch_size" in ds.dims else ds.isel(epoch=-1)


def stat_numbers(ds) -> dict:
    end = _final(ds)
    acc = end.test_accuracy.values.ravel()
    n_hidden = int(
        np.sum(~np.isnan(end[f"rep_{STATS[0]}"].isel(seed=0, lr=0, weight_decay=0).values))
    )
    out = dict(test_accuracy=[float(acc.min()), float(acc.max())], runs=int(acc.size), layers={})
    for k in range(n_hidden):
        per = {}
        for s in STATS:
            v = end[f"rep_{s}"].isel(layer=k).values.ravel()
            per[s] = dict(range=[float(v.min()), float(v.max())], spearman=spearman(v, acc))
        out["layers"][str(k + 1)] = per
    return out


def _stats(h) -> dict:
    f = {
        "zero_frac": rep.zero_fraction,
        "dead": rep.dead_units,
        "rank": rep.representation_rank,
        "eff_rank": rep.effective_rank,
        "abs_corr": rep.mean_abs_correlation,
        "amplitude": rep.activation_amplitude,
    }
    return {k: float(fn(jnp.asarray(h))) for k, fn in f.items()}


def identical_outputs(params, data, activation: str = "relu") -> dict:
    """The identical-output networks of one trained ReLU MLP, their last hidden (or inserted
    linear) representation's statistics on the test set, test accuracy and the largest change
    of any logit."""
    params = [{k: np.asarray(v, np.float32) for k, v in p.items()} for p in params]
    acts = (activation,) * (len(params) - 1)
    x = jnp.asarray(data.x_test)
    y0, _, reps = rep.dense_forward(params, x, acts)
    last = len(params) - 2
    h = np.asarray(reps[last], np.float64)
    m = h.shape[1]

    def result(p, a, layer):
        y, _, r = rep.dense_forward(p, x, a)
        acc = float(_losses.accuracy(y, jnp.asarray(data.y_test)))
        out = _stats(r[layer])
        out.update(
            test_accuracy=acc,
            max_logit_change=float(jnp.max(jnp.abs(y - y0))),
            max_abs_logit=float(jnp.max(jnp.abs(y0))),
        )
        return out

    lin, lin_acts = rep.insert_linear_layer(params, acts, last)
    mu = h.mean(0)
    cov = np.cov(h, rowvar=False, bias=True)
    ev, U = np.linalg.eigh(cov + 1e-3 * np.trace(cov) / m * np.eye(m))
    white = U @ np.diag(ev**-0.5) @ U.T
    mix = np.eye(m) + MIX * np.ones((m, m)) / m
    scales = np.exp(np.random.default_rng(0).uniform(np.log(0.1), np.log(10.0), m))
    return {
        "trained": result(params, acts, last),
        "linear layer inserted": result(lin, lin_acts, last + 1),
        "whitened": result(
            rep.affine_identical_output(lin, lin_acts, last + 1, white, -white @ mu),
            lin_acts,
            last + 1,
        ),
        "mixed": result(
            rep.affine_identical_output(lin, lin_acts, last + 1, mix), lin_acts, last + 1
        ),
        f"{N_DEAD} dead units appended": result(
            rep.append_dead_units(params, acts, last, N_DEAD), acts, last
        ),
        "units rescaled (0.1-10)": result(
            rep.rescale_units(params, acts, last, scales), acts, last
        ),
    }


def draw(datasets) -> list:
    from sweeps.configs.representations import load_data
    from sweeps.states import load_params

    plt = common.setup()
    raw = datasets["representations"]
    s = json.loads(raw.attrs["spec"])["settings"]
    end = _final(raw)
    stats = stat_numbers(raw)
    acc = end.test_accuracy.values.ravel()
    layers = list(stats["layers"])
    caption = (
        f"{s['dataset']} ReLU MLP {s['hidden']}, Adam with L2 weight decay, {s['epochs']} epochs, "
        f"batch {s['batch']}; {stats['runs']} networks (lr x weight decay x seeds); statistics on "
        "the test images."
    )
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.6))
    for ax, st in zip(axes.ravel(), STATS, strict=True):
        for k, layer in enumerate(layers):
            v = end[f"rep_{st}"].isel(layer=k).values.ravel()
            r = stats["layers"][layer][st]["spearman"]
            ax.scatter(v, acc, s=10, color=f"C{k}", label=f"layer {layer}: ρ {r:.2f}")
        ax.set_xlabel(LABELS[st])
        ax.legend(frameon=False, fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    fig.suptitle("Representation statistics against test accuracy (ρ: Spearman)", y=1.0)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    common.caption(fig, caption)
    paths = common.save(fig, "representations_stats")

    store = common.store_path("representations")
    params = load_params(store, **ION_RUN)[0]
    data = load_data(s["dataset"], s["data_root"])
    ion = identical_outputs(params, data)
    names = list(ion)
    fig, axes = plt.subplots(1, 5, figsize=(13, 3.4))
    for ax, st in zip(axes, ("abs_corr", "zero_frac", "dead", "rank", "amplitude"), strict=True):
        vals = [ion[n][st] for n in names]
        ax.barh(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(LABELS[st])
    top = max(ion[n]["max_logit_change"] for n in names)
    accs = sorted({round(ion[n]["test_accuracy"], 6) for n in names})
    fig.suptitle(
        f"Identical-output networks: test accuracy {', '.join(f'{a:.4f}' for a in accs)} for all; "
        f"largest logit change {top:.1e} (logits up to {ion[names[0]]['max_abs_logit']:.0f})",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(
        fig,
        f"From the trained network seed {ION_RUN['seed']}, lr {ION_RUN['lr']:g}, weight decay "
        f"{ION_RUN['weight_decay']:g}: its last hidden representation, or an inserted linear "
        "layer's (A h + c, undone in the next layer).",
    )
    paths += common.save(fig, "representations_ion")
    common.save_numbers(
        "representations",
        dict(stats=stats, ion=list(ion.items()), ion_run=ION_RUN, n_dead=N_DEAD, mix=MIX),
    )
    return paths


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    stats, ion = numbers["stats"], numbers["ion"]  # ion: [name, values] in construction order
    trained = dict(ion)["trained"]
    rho_rows = []
    for st in STATS:
        cells = []
        for per in stats["layers"].values():
            lo, hi = per[st]["range"]
            r = per[st]["spearman"]
            rho = "—, constant" if np.isnan(r) else fmt(r, 2)
            cells.append(f"{fmt(lo)}-{fmt(hi)} (ρ {rho})")
        rho_rows.append(f"| {TABLE_LABELS[st]} | " + " | ".join(cells) + " |")
    ion_rows = [
        f"| {name} | {fmt(v['test_accuracy'], 4)} | {fmt(v['max_logit_change'], 2)} | "
        f"{fmt(v['abs_corr'])} | {fmt(v['zero_frac'])} | {fmt(v['dead'])} | {fmt(v['rank'])} | "
        f"{fmt(v['eff_rank'])} | {fmt(v['amplitude'])} |"
        for name, v in ion
    ]
    lo, hi = stats["test_accuracy"]
    max_rho, max_key = max(
        (abs(per[st]["spearman"]), (layer, st))
        for layer, per in stats["layers"].items()
        for st in STATS
        if not np.isnan(per[st]["spearman"])
    )
    head = " | ".join(f"layer {layer}" for layer in stats["layers"])
    return "\n".join(
        [
            "**P12. Representations: correlation, sparsity, dead units and rank** (Choi, Lee, "
            "Shin, Rhee, arXiv 1811.03666) — `make figures FIG=representations`",
            "",
            common.image("representations_ion"),
            "",
            common.image("representations_stats"),
            "",
            "| | authors | ours | why different |",
            "|---|---|---|---|",
            "| data, network | MNIST and CIFAR, MLPs and CNNs | sklearn digits, ReLU MLP "
            "64-100-100-100-10 with biases | CPU scale |",
            "| spread of networks | representation regularizers | lr × L2 weight decay × seeds "
            "(18 Adam runs) | the regularizers need hidden layers in the loss, not in the library |",
            "| identical-output network | an invertible affine map of a linear layer's "
            "representation, undone in the next layer | the same on an inserted linear layer, "
            "plus appended dead units and positive rescaling | — |",
            "",
            f"Across {stats['runs']} networks (test accuracy {fmt(lo)}-{fmt(hi)}), range of each "
            "statistic and its Spearman correlation with test accuracy:",
            "",
            f"| statistic | {head} |",
            "|---|" + "---|" * len(stats["layers"]),
            *rho_rows,
            "",
            f"The largest |ρ| over statistics and layers is {fmt(max_rho, 2)} "
            f"({TABLE_LABELS[max_key[1]]}, layer {max_key[0]}), over {stats['runs']} networks.",
            "",
            "Identical-output networks from one trained network (the paper gives the "
            "construction, no numbers to compare; logits of the trained network up to "
            f"{fmt(trained['max_abs_logit'])} in magnitude):",
            "",
            "| network | test accuracy | largest logit change | mean abs. correlation | zeros | "
            "dead | rank | eff. rank | mean abs(h) |",
            "|---|---|---|---|---|---|---|---|---|",
            *ion_rows,
        ]
    )
