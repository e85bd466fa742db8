"""P9: orthogonal vs Gaussian initialization of deep linear networks (Hu, Xiao & Pennington,
ICLR 2020).

orthogonal_init: the final loss ratio loss_T / loss_0 (log colour, the worst of the seeds) over
depth x width for both inits, the cells reaching RATIO outlined; and the loss curves of the
widest runs of each init, loss_t / loss_0 over the GD steps, each depth a colour, against the
theorem's bound (1 - eta L sigma_min(X)^2 / (4 d_y))^t (`orthogonal.hu_rate_bound`; at the
theorem's eta it is 1 - sigma_min^2 / (8 sigma_max^2) per step, the same for every depth).
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = ("orthogonal_init",)
RATIO = 1e-3  # "trainable": every seed's loss_T / loss_0 at most this
TOL = 1e-3  # relative slack of the bound check (float32 losses)


def _runs(ds):
    keep = {"init", "depth", "width", "seed", "step"}
    return ds.isel({d: 0 for d in ds.dims if d not in keep and ds.sizes[d] == 1})


def _settings(ds) -> dict:
    return json.loads(ds.attrs["spec"])["settings"]


def loss_ratios(ds) -> np.ndarray:
    """loss_t / loss_0 as (init, depth, width, seed, step); a run that diverged or went
    non-finite is +inf from then on (never "reaching" any ratio)."""
    loss = ds.loss.transpose("init", "depth", "width", "seed", "step").values.astype(np.float64)
    bad = (ds.status.transpose("init", "depth", "width", "seed").values != 0)[..., None]
    r = loss / loss[..., :1]
    return np.where(np.isfinite(r) & ~bad, r, np.inf)


def final_ratio(ds) -> np.ndarray:
    """The worst seed's loss_T / loss_0, (init, depth, width)."""
    return loss_ratios(ds)[..., -1].max(axis=-1)


def smallest_widths(ds, ratio: float = RATIO) -> dict:
    """{init: {depth: the smallest width at which every seed reaches loss_T / loss_0 <= ratio,
    and so does every wider one, or None}}."""
    fin = final_ratio(ds)
    widths = [int(w) for w in ds.width.values]
    out = {}
    for i, init in enumerate(ds.init.values):
        per = {}
        for j, depth in enumerate(ds.depth.values):
            ok = fin[i, j] <= ratio
            # the smallest width from which every wider one is trainable too
            tail = np.flatnonzero(~ok)
            k = 0 if tail.size == 0 else int(tail[-1]) + 1
            per[str(int(depth))] = widths[k] if k < len(widths) else None
        out[str(init)] = per
    return out


def bound_ratios(ds) -> tuple[np.ndarray, np.ndarray]:
    """loss_t / bound_t of every run, (init, depth, width, seed, step), with bound_t the
    theorem's (1 - eta L sigma_min^2 / (4 d_y))^t loss_0 of that run's own loss_0, at the
    sweep's step size (lr in units of eta = `hu_lr`); and the bound itself, loss_0 = 1, per
    (depth, step)."""
    from dynamics import orthogonal as orth

    s = _settings(ds)
    data = orth.hu_data(s["d_x"], s["n"], s["d_y"], seed=s["data_seed"])
    steps = ds.step.values
    lr = float(np.atleast_1d(ds.lr.values)[0])
    bound = np.stack(
        [
            orth.hu_rate_bound(
                1.0, data.x_train, lr * orth.hu_lr(data.x_train, d, s["d_y"]), d, s["d_y"], steps
            )
            for d in (int(x) for x in ds.depth.values)
        ]
    )
    r = loss_ratios(ds)
    return r / bound[None, :, None, None, :], bound


def numbers(ds) -> dict:
    s = _settings(ds)
    widths = [int(w) for w in ds.width.values]
    depths = [int(d) for d in ds.depth.values]
    inits = [str(i) for i in ds.init.values]
    fin = final_ratio(ds)
    over, bound = bound_ratios(ds)
    # the max over the records after the first (at t = 0 the ratio is 1 by definition)
    worst = np.max(over[..., 1:], axis=(-1, -2))  # (init, depth, width), over seeds and steps
    o = inits.index("orthogonal")
    wide = [w for w in widths if w >= s["d_x"]]
    return dict(
        d_x=s["d_x"],
        n=s["n"],
        d_y=s["d_y"],
        steps=int(ds.step.values[-1]),
        seeds=int(ds.sizes["seed"]),
        widths=widths,
        depths=depths,
        ratio=RATIO,
        tol=TOL,
        rate=float(bound[0, 1] ** (1.0 / float(ds.step.values[1]))),
        final_ratio={
            init: {str(d): fin[i, j].tolist() for j, d in enumerate(depths)}
            for i, init in enumerate(inits)
        },
        smallest_width=smallest_widths(ds),
        # orthogonal runs against the bound: max over t > 0 and seeds of loss_t / bound_t
        bound_max={str(d): worst[o, j].tolist() for j, d in enumerate(depths)},
        bound_widths=wide,
        bound_max_wide=float(worst[o][:, [widths.index(w) for w in wide]].max()) if wide else None,
        bound_max_widest=float(worst[o, :, -1].max()),
        # the same for the narrowest orthogonal nets (width < d_x: outside the theorem) and the
        # widest Gaussian ones (the bound is proved for orthogonal init only)
        bound_max_narrowest=float(worst[o, :, 0].max()),
        gaussian_bound_max_widest=float(worst[inits.index("gaussian"), :, -1].max()),
        diverged=int(np.sum(ds.status.values != 0)),
        diverged_cells=[
            [inits[i], depths[j], widths[k], int(c)]
            for (i, j, k), c in np.ndenumerate(
                (ds.status.transpose("init", "depth", "width", "seed").values != 0).sum(-1)
            )
            if c
        ],
    )


def draw(datasets) -> list:
    plt = common.setup()
    from matplotlib.colors import LogNorm

    raw = datasets["orthogonal_init"]
    ds = _runs(raw)
    n = numbers(ds)
    widths, depths = n["widths"], n["depths"]
    fin = final_ratio(ds)
    r = loss_ratios(ds)
    _, bound = bound_ratios(ds)
    steps = ds.step.values
    inits = [str(i) for i in ds.init.values]
    caption = (
        f"f(x) = W_L...W_1 x / sqrt(m^(L-1) d_y), X in R^({n['d_x']} x {n['n']}), Y = W*X, d_y = "
        f"{n['d_y']}; full-batch GD on (1/2)||f(X) - Y||^2 at eta = d_y / (2 L ||X||^2), "
        f"{n['steps']} steps; {n['seeds']} seeds of the init (worst seed in the maps)."
    )
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    floor = max(float(np.min(fin[np.isfinite(fin)])), 1e-16)
    norm = LogNorm(vmin=floor, vmax=max(1.0, float(np.max(fin[np.isfinite(fin)]))))
    for k, init in enumerate(("orthogonal", "gaussian")):
        ax = axes[k]
        i = inits.index(init)
        v = np.where(np.isfinite(fin[i]), fin[i], np.nan)
        mesh = ax.pcolormesh(
            np.arange(len(widths) + 1), np.arange(len(depths) + 1), v, norm=norm, cmap="viridis"
        )
        for a in range(len(depths)):
            for b in range(len(widths)):
                ok = fin[i, a, b] <= RATIO
                ax.text(
                    b + 0.5,
                    a + 0.5,
                    common.fmt(fin[i, a, b], 1) if np.isfinite(fin[i, a, b]) else "div",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if fin[i, a, b] < 1e-3 * norm.vmax else "k",
                    fontweight="bold" if ok else "normal",
                )
        ax.set_xticks(np.arange(len(widths)) + 0.5, widths)
        ax.set_yticks(np.arange(len(depths)) + 0.5, depths)
        ax.set_xlabel("width m")
        ax.set_ylabel("depth L")
        sw = n["smallest_width"][init]
        ax.set_title(
            f"{init} init: loss_T / loss_0\nsmallest width reaching {RATIO:g}: "
            + ", ".join(str(sw[str(d)]) if sw[str(d)] else "-" for d in depths)
        )
    fig.colorbar(mesh, ax=axes[1], fraction=0.05)
    cmap = plt.get_cmap("plasma")
    colors = [cmap(0.85 * j / max(len(depths) - 1, 1)) for j in range(len(depths))]
    for k, init in enumerate(("orthogonal", "gaussian")):
        ax = axes[2 + k]
        i = inits.index(init)
        for j, d in enumerate(depths):
            v = r[i, j, -1]  # widest width, (seed, step)
            v = np.where(np.isfinite(v), v, np.nan)
            for s in range(v.shape[0]):
                ax.plot(steps, v[s], color=colors[j], lw=0.8, label=f"L = {d}" if s == 0 else None)
        ax.plot(steps, bound[0], color="k", ls="--", lw=1, label="bound")
        ax.set_yscale("log")
        ax.set_ylim(max(floor, 1e-16) / 10, 10)
        ax.set_xlabel("GD step")
        ax.set_ylabel("loss_t / loss_0")
        ax.set_title(f"{init} init, width {widths[-1]}: loss against the bound")
        ax.legend(frameon=False, fontsize=6)
    axes[2].text(
        0.02,
        0.02,
        f"max loss_t / bound_t (t > 0): {common.fmt(n['bound_max_widest'], 2)}",
        transform=axes[2].transAxes,
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    common.caption(fig, caption)
    paths = common.save(fig, "orthogonal_init")
    common.save_numbers("orthogonal_init", n)
    return paths


def _spread(widths: list, per: dict) -> int | None:
    """How many grid steps the smallest trainable width moves over the depths (None if some
    depth has no trainable width)."""
    vals = list(per.values())
    if any(v is None for v in vals):
        return None
    idx = [widths.index(v) for v in vals]
    return max(idx) - min(idx)


def _verdict(numbers: dict) -> str:
    fmt = common.fmt
    widths, depths = numbers["widths"], [str(d) for d in numbers["depths"]]
    orth, gauss = numbers["smallest_width"]["orthogonal"], numbers["smallest_width"]["gaussian"]
    out = []
    spread = _spread(widths, orth)
    narrow = [numbers["final_ratio"]["orthogonal"][d][0] for d in depths]
    if spread is not None and spread <= 1:
        out.append(
            "With orthogonal init the smallest trainable width does not depend on the depth "
            + (
                f"(width {orth[depths[0]]} at every depth)"
                if spread == 0
                else "within one grid step"
            )
            + ", as the paper claims"
            + (
                f"; but at the narrowest width ({widths[0]}, below d_x = {numbers['d_x']}, outside "
                "the theorem) the worst seed's loss_T / loss_0 still rises with the depth, "
                f"{fmt(narrow[0], 2)} at depth {depths[0]} to {fmt(narrow[-1], 2)} at depth "
                f"{depths[-1]}, so that 'width {widths[0]} at every depth' rests on the "
                f"{fmt(numbers['ratio'])} threshold there"
                if narrow[-1] > 1e3 * narrow[0]
                else ""
            )
        )
    else:
        out.append(
            "With orthogonal init the smallest trainable width moves with the depth here "
            "(against the paper's claim)"
        )
    g = [gauss[d] for d in depths]
    idx = [widths.index(v) if v is not None else len(widths) for v in g]
    if all(b >= a for a, b in zip(idx, idx[1:], strict=False)) and idx[-1] > idx[0]:
        untrained = [d for d in depths if gauss[d] is None]
        out.append(
            "with Gaussian init it grows with the depth"
            + (
                f" (no width up to {widths[-1]} trains at depth {', '.join(untrained)})"
                if untrained
                else ""
            )
            + ", as claimed; a doubling grid of "
            f"{len(widths)} widths cannot tell whether the growth is linear in the depth"
        )
    else:
        out.append("with Gaussian init it does not grow monotonically with the depth here")
    return "; ".join(out) + "."


def gallery(numbers: dict) -> str:
    fmt = common.fmt
    depths = [str(d) for d in numbers["depths"]]
    widths = numbers["widths"]
    sw = numbers["smallest_width"]
    rows = [
        f"| {d} | {sw['orthogonal'][d] or '—'} | {sw['gaussian'][d] or '—'} | "
        f"{fmt(numbers['final_ratio']['gaussian'][d][-1], 2)} | {fmt(numbers['bound_max'][d][-1], 2)} |"
        for d in depths
    ]
    wide = numbers["bound_widths"]
    bound_ok = (
        numbers["bound_max_wide"] is not None and numbers["bound_max_wide"] <= 1 + numbers["tol"]
    )
    bound = (
        f"Every orthogonal run of width ≥ d_x (widths {', '.join(map(str, wide))}) stays under the "
        f"theorem's bound (1 − η L σ_min(X)² / (4 d_y))^t loss_0 = {fmt(numbers['rate'], 4)}^t "
        f"loss_0 at every record: max loss_t / bound_t = {fmt(numbers['bound_max_wide'], 2)}"
        if bound_ok
        else f"Orthogonal runs of width ≥ d_x exceed the theorem's bound: max loss_t / bound_t = "
        f"{fmt(numbers['bound_max_wide'], 2)}"
        if wide
        else "No width reaches d_x, the theorem's condition"
    )
    return "\n".join(
        [
            "**P9. Orthogonal vs Gaussian initialization of deep linear networks** (Hu, Xiao & "
            "Pennington, ICLR 2020) — `make figures FIG=orthogonal_init`",
            "",
            common.image("orthogonal_init"),
            "",
            "| | authors | ours | why different |",
            "|---|---|---|---|",
            f"| data | X ∈ R^(1024 × 16), Y = W*X, W* ∈ R^(10 × 1024), N(0, 1) entries | X ∈ "
            f"R^({numbers['d_x']} × {numbers['n']}), d_y = {numbers['d_y']}, the same "
            "distribution | CPU scale |",
            "| network | f(x) = W_L ⋯ W_1 x / √(m^(L−1) d_y), orthogonal (WᵀW = m I) or N(0, 1) "
            f"init | the same; widths {', '.join(map(str, widths))}, depths "
            f"{', '.join(depths)} | paper: widths 10–1000, depths 1–700 |",
            f"| training | full-batch GD on ½‖f(X) − Y‖², η = d_y / (2 L ‖X‖²) | the same, "
            f"{numbers['steps']} steps, {numbers['seeds']} seeds of the init | number of steps "
            "not stated in what we read |",
            "| orthogonal init below d_x | (assumes m ≥ d_x) | W_1 with orthonormal rows, W_1 W_1ᵀ = "
            "d_x I | their widths start at 10 < d_x = 1024 too |",
            "",
            "The paper's claim: with orthogonal init the width needed for GD to converge does not "
            "depend on the depth; with Gaussian init it grows (linearly) with the depth, with a "
            "sharp trainable/untrainable boundary in the depth × width plane (their figure, no "
            f"numbers). Ours: the smallest width from which every seed and every wider net reach "
            f"loss_T / loss_0 ≤ {fmt(numbers['ratio'])} (—: none up to {widths[-1]}), the worst "
            f"seed's loss_T / loss_0 of the widest Gaussian net, and the widest orthogonal "
            "nets' max over t > 0 of loss_t / bound_t:",
            "",
            "| depth | orthogonal: smallest width | Gaussian: smallest width | Gaussian "
            f"loss_T / loss_0 at width {widths[-1]} | orthogonal loss_t / bound_t at width "
            f"{widths[-1]} |",
            "|---|---|---|---|---|",
            *rows,
            "",
            _verdict(numbers)
            + f" {bound} (the theorem also asks for a width above an unspecified constant times "
            "r κ² (d_y (1 + ‖W*‖²) + log(r / δ)), which we cannot check); the bound is loose "
            "there, the loss falls far faster than it. Outside its conditions it fails: "
            f"orthogonal nets of width {widths[0]} reach {fmt(numbers['bound_max_narrowest'], 2)} "
            f"× the bound, Gaussian nets of width {widths[-1]} "
            f"{fmt(numbers['gaussian_bound_max_widest'], 2)} ×."
            + (
                f" {numbers['diverged']} runs diverged at the theorem's step size ("
                + ", ".join(
                    f"{c} of {numbers['seeds']} {init} at depth {d}, width {w}"
                    for init, d, w, c in numbers["diverged_cells"]
                )
                + "); they count as untrained, so part of the Gaussian boundary is divergence, "
                "not a stalled loss."
                if numbers["diverged"]
                else ""
            ),
        ]
    )
