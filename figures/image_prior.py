"""P5: un-trained networks as image priors (Heckel & Hand, ICLR 2019; Heckel & Soltanolkotabi,
ICLR 2020 and ICML 2020).

image_prior_fit: (a) the deep decoder's training loss on an image and on noise of the same norm;
  (b) its PSNR to the clean image while it fits a noisy one (best iteration marked), per noise
  level; (c) the training loss of those fits.
image_prior_cs: (a) PSNR after fitting m measurements (pixel mask, Gaussian A) against the
  least-norm solution A^+ y, vs m/n; (b) the training loss of the authors' two settings.
image_prior_generator: the two-layer generator G(C) = relu(U C) v: (a) recovery error vs m for
  a low- and a high-frequency signal, with A^+ y; (b) the leading singular values of its Jacobian
  at initialization vs the dual kernel's eigenvalues; (c) the Jacobian's leading singular vectors
  against the dual kernel's eigenvectors (squared overlaps); (d) how much of each leading vector
  stays in the dual kernel's (solid) and the initial (dashed) leading span during training.
Lines are means over seeds, bands the min-max.
"""

from __future__ import annotations

import json

import numpy as np

from figures import common

SWEEPS = (
    "image_prior_fit",
    "image_prior_denoise",
    "image_prior_cs",
    "generator_recovery",
    "generator_jacobian",
)
NAME = "image_prior"
PAPER = "0.5"
# typed from what the authors' notebooks print (docs/protocols/P5.md section 4): the fitting
# losses at iteration 10000 (of a 10010-step run; 3e-6 is printed to six decimals), and the
# MSEs of the denoising and inpainting runs, whose PSNRs (peak 1) are computed here: the
# notebooks print the MSEs, not the PSNRs.


def _psnr(mse: float) -> float:
    return float(10.0 * np.log10(1.0 / mse))


PAPER_FIT = {"image": 3e-6, "noise": 8.867e-3, "steps": 10000}
PAPER_DENOISE = {"psnr": _psnr(0.001325), "noisy": _psnr(0.012402), "steps": 1890}
PAPER_CS = {"psnr": _psnr(0.001789), "fraction": 1 / 3, "loss": 0.0}


def _runs(ds):
    """Drop the single-valued traced axes (lr, batch_size, weight_decay)."""
    return ds.isel({d: 0 for d in ("lr", "batch_size", "weight_decay") if d in ds.dims})


def _settings(ds) -> dict:
    return json.loads(ds.attrs["spec"])["settings"]


def _rate(ds) -> dict:
    n = int(np.prod([ds.sizes[d] for d in ds.status.dims]))
    return {
        "runs": n,
        "run_seconds": float(ds.attrs["run_seconds"]),
        "compile_seconds": float(ds.attrs["compile_seconds"]),
        "runs_per_second": n / float(ds.attrs["run_seconds"]),
    }


def _least_norm_error(signal_name, m, n, data_seed):
    """||A^+ y - x|| / ||x|| for the generator sweep's signal and operator (host, float64)."""
    from dynamics import kernels, priors
    from sweeps.configs.generator_recovery import signal

    x = signal(signal_name, n, data_seed)
    A = priors.gaussian_operator(m, n, data_seed).astype(np.float64)
    return float(np.linalg.norm(kernels.least_norm_solution(A, A @ x) - x))


def draw(datasets) -> list:
    plt = common.setup()
    numbers: dict = {}
    paths = []
    paths += _draw_fit(plt, datasets, numbers)
    paths += _draw_cs(plt, datasets, numbers)
    paths += _draw_generator(plt, datasets, numbers)
    numbers["sweeps"] = {s: _rate(datasets[s]) for s in SWEEPS}
    common.save_numbers(NAME, numbers)
    return paths


# --------------------------------------------------------------------------- fitting, denoising


def _draw_fit(plt, datasets, numbers) -> list:
    fit = _runs(datasets["image_prior_fit"])
    den = _runs(datasets["image_prior_denoise"])
    sf, sd = _settings(datasets["image_prior_fit"]), _settings(datasets["image_prior_denoise"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))

    ax = axes[0]
    steps = fit.step.values
    s = steps > 0
    widths = [int(k) for k in fit.channels.values]
    cmap = plt.get_cmap("viridis")
    numbers["fit"] = {}
    for i, k in enumerate(widths):
        color = cmap(0.8 * i / max(len(widths) - 1, 1))
        for target, style in (("image", "-"), ("noise", "--")):
            da = fit.loss.sel(channels=k, target=target).isel(step=s)
            common.band(
                ax, steps[s], da, log=True, color=color, linestyle=style, label=f"{target}, k={k}"
            )
        last = fit.loss.sel(channels=k).isel(step=-1).mean("seed")
        numbers["fit"][str(k)] = {
            "image": float(last.sel(target="image")),
            "noise": float(last.sel(target="noise")),
            "ratio": float(last.sel(target="image") / last.sel(target="noise")),
            "steps": int(steps[-1]),
        }
    ax.plot(
        [PAPER_FIT["steps"]] * 2,
        [PAPER_FIT["image"], PAPER_FIT["noise"]],
        "x",
        color=PAPER,
        markersize=8,
        label="paper, k=256, 256x256",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (Adam, lr 0.01)")
    ax.set_ylabel("training MSE")
    ax.set_title("(a) image vs noise of the same norm")
    ax.legend(loc="lower left", ncol=2)

    ax = axes[1]
    steps = den.step.values
    numbers["denoise"] = {}
    sigmas = [float(v) for v in den.sigma.values]
    for i, sg in enumerate(sigmas):
        color = f"C{i}"
        psnr = den.clean_psnr.sel(sigma=sg)
        line = common.band(ax, steps, psnr, color=color, label=f"σ={sg:g}/255")
        mean = psnr.mean("seed").values
        j = int(np.nanargmax(mean))
        ax.plot(steps[j], mean[j], "o", color=line.get_color())
        noisy = float(den.target_psnr.sel(sigma=sg).isel(step=0).mean("seed"))
        ax.axhline(noisy, color=color, linestyle=":", linewidth=1)
        best_each = psnr.max("step")
        numbers["denoise"][f"{sg:g}"] = {
            "noisy": noisy,
            "best": float(best_each.mean()),
            "best_step": int(steps[j]),
            "last": float(psnr.isel(step=-1).mean()),
            "gain": float(best_each.mean()) - noisy,
        }
    ax.set_ylim(bottom=min(numbers["denoise"][f"{s:g}"]["noisy"] for s in sigmas) - 3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR to the clean image (dB, peak 1)")
    ax.set_title("(b) denoising: PSNR to the clean image (● best, ⋯ noisy)")
    ax.legend(loc="lower right")

    ax = axes[2]
    for i, sg in enumerate(sigmas):
        common.band(
            ax,
            steps[1:],
            den.loss.sel(sigma=sg).isel(step=slice(1, None)),
            log=True,
            color=f"C{i}",
            label=f"to the noisy image, σ={sg:g}",
        )
        common.band(
            ax,
            steps[1:],
            den.clean_mse.sel(sigma=sg).isel(step=slice(1, None)),
            log=True,
            color=f"C{i}",
            linestyle="--",
            label=f"to the clean image, σ={sg:g}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE")
    ax.set_title("(c) fitting the noisy image")
    ax.legend(loc="upper right")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.caption(
        fig,
        f"Deep decoder (decodernw): {sf['n_up'] + 1} blocks of 1x1 conv (no bias) → bilinear x2 → "
        f"ReLU → BN (affine, one image), 1x1 conv + sigmoid; input U[0, 0.1) at "
        f"{sf['size'] // 2 ** sf['n_up']}x{sf['size'] // 2 ** sf['n_up']}; "
        f"{sf['size']}x{sf['size']} grayscale '{sf['image']}'; Adam lr 0.01; "
        f"denoising k={sd['channels']}, Gaussian noise clipped to [0, 1]; "
        f"{fit.sizes['seed']} / {den.sizes['seed']} seeds.",
    )
    return common.save(fig, "image_prior_fit")


# --------------------------------------------------------------------------- compressive sensing


def _draw_cs(plt, datasets, numbers) -> list:
    from sweeps.configs.image_prior_cs import baseline_psnr

    cs = _runs(datasets["image_prior_cs"])
    st = _settings(datasets["image_prior_cs"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    fracs = [float(f) for f in cs.fraction.values]
    numbers["cs"] = {}
    for i, op in enumerate(str(o) for o in cs.operator.values):
        final = cs.clean_psnr.sel(operator=op).isel(step=-1)
        common.band(
            ax,
            fracs,
            final.transpose("seed", "fraction"),
            color=f"C{i}",
            marker="o",
            label=f"deep decoder, {op}",
        )
        base = [baseline_psnr({**st, "operator": op, "fraction": f}) for f in fracs]
        ax.plot(fracs, base, color=f"C{i}", linestyle="--", marker=".", label=f"A⁺y, {op}")
        numbers["cs"][op] = {
            f"{f:.4g}": {
                "psnr": float(final.sel(fraction=f).mean()),
                "baseline": b,
                "loss": float(cs.loss.sel(operator=op, fraction=f).isel(step=-1).mean()),
                "min_loss_2nd_half": float(
                    cs.loss.sel(operator=op, fraction=f)
                    .isel(step=slice(cs.sizes["step"] // 2, None))
                    .min()
                ),
            }
            for f, b in zip(fracs, base, strict=True)
        }
    ax.plot(
        [PAPER_CS["fraction"]],
        [PAPER_CS["psnr"]],
        "x",
        color=PAPER,
        markersize=8,
        label="paper, mask, 256x256, 10⁵ it.",
    )
    ax.set_xlabel("measurements m / n (mask: keep probability)")
    ax.set_ylabel("PSNR to the true image (dB)")
    ax.set_title("(a) compressive sensing vs least-norm")
    ax.legend(loc="center right")

    ax = axes[1]
    steps = cs.step.values
    for i, (op, f) in enumerate((("mask", 1 / 3), ("gaussian", 0.25))):
        if op in cs.operator.values and any(np.isclose(fracs, f)):
            fsel = fracs[int(np.argmin(np.abs(np.asarray(fracs) - f)))]
            common.band(
                ax,
                steps[1:],
                cs.loss.sel(operator=op, fraction=fsel).isel(step=slice(1, None)),
                log=True,
                color=f"C{i}",
                label=f"{op}, m/n={fsel:.3g}",
            )
    ax.axhline(1e-4, color=PAPER, linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (Adam, lr 0.005)")
    ax.set_ylabel("training loss (mask: mean over all n pixels)")
    ax.set_title("(b) the training loss goes to ~0")
    ax.legend(loc="upper right")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.caption(
        fig,
        f"cs deepdecoder: {st['depth']} blocks of {st['channels']} channels, {st['in_size']}→"
        f"{st['size']} (every block upsamples), input U[0, 0.1); {st['size']}x{st['size']} "
        f"grayscale '{st['image']}' / max; {st['steps']} Adam steps; {cs.sizes['seed']} seed(s).",
    )
    return common.save(fig, "image_prior_cs")


# --------------------------------------------------------------------------- two-layer generator


def _draw_generator(plt, datasets, numbers) -> list:
    from dynamics import kernels, priors
    from sweeps.configs.generator_recovery import generator_U

    rec = _runs(datasets["generator_recovery"])
    jac = _runs(datasets["generator_jacobian"])
    sr, sj = _settings(datasets["generator_recovery"]), _settings(datasets["generator_jacobian"])
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))

    ax = axes[0]
    ms = [int(m) for m in rec.m.values]
    numbers["recovery"] = {}
    for i, sig in enumerate(("low", "high")):
        err = rec.clean_rel_error.sel(signal_name=sig).isel(step=-1)
        common.band(
            ax,
            ms,
            err.transpose("seed", "m"),
            color=f"C{i}",
            marker="o",
            label=f"generator, {sig} frequencies",
        )
        ls = [_least_norm_error(sig, m, sr["n"], sr["data_seed"]) for m in ms]
        ax.plot(ms, ls, color=f"C{i}", linestyle="--", marker=".", label=f"A⁺y, {sig}")
        numbers["recovery"][sig] = {
            str(m): {"error": float(err.sel(m=m).mean()), "least_norm": e}
            for m, e in zip(ms, ls, strict=True)
        }
    ax.axhline(0.2, color=PAPER, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"Gaussian measurements m (n = {sr['n']})")
    ax.set_ylabel("relative error ||G(C) - x|| / ||x||")
    ax.set_title(f"(a) recovery after {sr['steps']} GD steps")
    ax.legend(loc="upper right")

    U = generator_U(sj["n"], sj["kernel_sigma"])
    top = jac.sizes["jac_index"]
    lam, E = priors.dual_kernel_eigvecs(U, top)
    ks = [int(k) for k in jac.k.values]
    ax = axes[1]
    ax.plot(np.arange(1, top + 1), lam, "k-", marker="s", label="dual kernel eigenvalues")
    for i, k in enumerate(ks):
        sv2 = jac.jac_sv.sel(k=k).isel(step=0) ** 2
        common.band(
            ax,
            np.arange(1, top + 1),
            sv2.transpose("seed", "jac_index"),
            color=f"C{i}",
            marker=".",
            label=f"σ_j(J)², k={k}, init",
        )
    ax.set_xlabel("index j")
    ax.set_ylabel("eigenvalue")
    ax.set_title("(b) spectrum of J Jᵀ vs the dual kernel")
    ax.legend(loc="lower left")

    ax = axes[2]
    kmax = max(ks)
    V = np.asarray(jac.jac_vec.sel(k=kmax).isel(seed=0, step=0).values, np.float64)
    ov = (V @ E.T) ** 2
    im = ax.imshow(ov, vmin=0, vmax=1, cmap="magma")
    freqs = np.abs(np.fft.rfft(E, axis=1)).argmax(1)
    ax.set_xticks(range(top), [f"{f}" for f in freqs])
    ax.set_yticks(range(top), [str(j + 1) for j in range(top)])
    ax.set_xlabel("dual kernel eigenvector (its frequency)")
    ax.set_ylabel(f"singular vector u_j of J (k={kmax}, init)")
    ax.set_title("(c) squared overlaps ⟨u_j, e_i⟩²")
    fig.colorbar(im, ax=ax, fraction=0.046)

    ax = axes[3]
    steps = jac.step.values
    numbers["jacobian"] = {}
    for i, k in enumerate(ks):
        ref = jac.jac_ref.sel(k=k).mean("jac_index")
        drift = jac.jac_drift.sel(k=k).mean("jac_index")
        ok = np.isfinite(ref.isel(seed=0).values)
        common.band(
            ax, steps[ok], ref.isel(step=ok), color=f"C{i}", label=f"dual kernel span, k={k}"
        )
        common.band(ax, steps[ok], drift.isel(step=ok), color=f"C{i}", linestyle="--")
        numbers["jacobian"][str(k)] = {
            "ref_init_min": float(jac.jac_ref.sel(k=k).isel(step=0).min()),
            "ref_init_mean": float(jac.jac_ref.sel(k=k).isel(step=0).mean()),
            "ref_end_mean": float(ref.isel(step=-1).mean()),
            "drift_end_mean": float(drift.isel(step=-1).mean()),
            "drift_end_min": float(jac.jac_drift.sel(k=k).isel(step=-1).min()),
            "fit_error_best": float(jac.clean_rel_error.sel(k=k).mean("seed").min()),
            "fit_error_end": float(jac.clean_rel_error.sel(k=k).isel(step=-1).mean()),
        }
    S = kernels.generator_dual_kernel(U)
    numbers["jacobian"]["dual_kernel_decay"] = float(
        np.linalg.eigvalsh(S)[::-1][sj["n"] // 4] / lam[0]
    )
    ax.set_ylim(0.5, 1.02)
    ax.set_xlabel("iteration (GD on a noisy step)")
    ax.set_ylabel("mean_j ||P u_j||² (— dual kernel, -- initial J)")
    ax.set_title("(d) leading vectors during training")
    ax.legend(loc="lower left")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.caption(
        fig,
        f"G(C) = relu(U C) v, U circulant of the authors' Gaussian kernel (σ={sr['kernel_sigma']}), "
        f"v = ±1/√k, C ~ N(0, {sr['omega']}²), full-batch GD; (a) n={sr['n']}, k={sr['k']}, "
        f"low: frequencies 0-3, high: {5 * sr['n'] // 16}-{5 * sr['n'] // 16 + 3}; (b-d) fitting a "
        f"step + N(0, {sj['noise']}²), n={sj['n']}, top {top} vectors; {jac.sizes['seed']} seeds.",
    )
    return common.save(fig, "image_prior_generator")


# --------------------------------------------------------------------------- gallery


def gallery(numbers: dict) -> str:
    f = common.fmt
    fit = numbers["fit"]
    kfit = max(fit, key=int)
    den = numbers["denoise"]
    cs = numbers["cs"]
    rec = numbers["recovery"]
    jac = {k: v for k, v in numbers["jacobian"].items() if k.isdigit()}
    kj = max(jac, key=int)
    kmin = min(jac, key=int)
    mask = cs.get("mask", {}).get("0.3333")
    gauss = cs.get("gaussian", {}).get("0.25")
    rates = numbers["sweeps"]
    den_rows = "\n".join(
        f"| denoising, σ = {s}/255: PSNR of the noisy image → best (iteration) → last | "
        f"19.07 → **28.78** (σ = 30, 1890 it.) → returned by `find_best` | "
        f"{f(v['noisy'])} → **{f(v['best'])}** (it. {v['best_step']}) → {f(v['last'])} dB |"
        for s, v in den.items()
    )
    cs_rows = []
    if mask:
        cs_rows.append(
            f"| compressive sensing, mask 1/3: PSNR (A⁺y) · final training loss | **27.47** dB · "
            f"0.000000 (10⁵ it.) | **{f(mask['psnr'])}** ({f(mask['baseline'])}) dB · "
            f"{f(mask['loss'])} (min over the 2nd half {f(mask['min_loss_2nd_half'])}) |"
        )
    if gauss:
        cs_rows.append(
            f"| compressive sensing, Gaussian m = n/4: PSNR (A⁺y) · final loss | not printed | "
            f"**{f(gauss['psnr'])}** ({f(gauss['baseline'])}) dB · {f(gauss['loss'])} (min "
            f"{f(gauss['min_loss_2nd_half'])}) |"
        )
    m_rec = "32" if "32" in rec["low"] else sorted(rec["low"], key=int)[0]
    rate_line = ", ".join(
        f"`{s}` {v['runs']} runs in {f(v['run_seconds'])} s ({f(v['runs_per_second'])} runs/s, "
        f"compile {f(v['compile_seconds'])} s)"
        for s, v in rates.items()
    )
    return f"""**P5. Un-trained networks as image priors** (Heckel & Hand 2019; Heckel & Soltanolkotabi
2020) — `make figures FIG=image_prior`

A deep decoder, a convolutional generator with fixed upsampling, fits a natural image much faster
than noise; so fitted to a noisy image its PSNR to the clean one rises, peaks and falls (early
stopping denoises), and fitted to m < n measurements it interpolates them while staying close to
the true image. For the two-layer generator G(C) = relu(U C) v with a circulant U, gradient descent
fits first along its Jacobian's leading singular vectors, which are the dual kernel's low-frequency
eigenvectors and barely move.

{common.image("image_prior_fit")}
{common.image("image_prior_cs")}
{common.image("image_prior_generator")}

| | authors | ours | why different |
|---|---|---|---|
| image | astronaut 512² RGB (denoising), phantom 256² (image vs noise), art.jpeg 256² (CS) | scikit-learn's "china", 64² grayscale (central square, area-resized) | CPU scale; the authors' images are not bundled |
| decoder | decodernw [k]×d: d+1 blocks 1x1 conv (no bias) → bilinear x2 → ReLU → BN (affine, train mode), 1x1 conv + sigmoid; cs: `deepdecoder` resizing to ceil(scale^n·16) | the same (`dynamics.priors.deep_decoder`); 4 upsamplings from 4x4 | scale only |
| width, length | k = 128 (denoising), 256 (fit, CS); 1900 / 10⁴ / 10⁵ iterations | k = 32, 64; 1500 / 2000 / 3000 steps | CPU time |
| input, init | U[0, 0.1), PyTorch defaults (BN γ = 1 from PyTorch 1.2; U(0, 1) before) | the same, γ = 1 (`gamma_init="uniform"` for ≤ 1.1) | PyTorch version of the runs unknown |
| optimizer | Adam, lr 0.01 (fit, denoising), 0.005 (CS) | the same (optax) | |
| noise | N(0, σ²) per pixel, clipped to [0, 1]; noise target U[0, 1) scaled to the image's norm | the same | |
| best iteration | `find_best`: the net of the lowest training loss | the whole PSNR curve is recorded; best = its maximum | shows the U shape |
| CS operators | mask keeping 1/3 of the pixels (printed run), A ~ N(0, 1/m), m = n/4 | mask and Gaussian at m/n ∈ {{1/8, 1/4, 1/3, 1/2}} | a curve instead of one point |
| two-layer generator | dual kernel and an identity-U plot only (no training code) | GD on G(C), circulant U of their Gaussian kernel, n = 128 | the papers' model, no code to follow |
| Jacobian figure | Fig 7: 4-layer 1-D decoder, Adam (and a gradient-accumulation bug) | the two-layer generator, closed-form J Jᵀ, GD on a noisy step | the theory's model; exact J |

| quantity | authors | ours |
|---|---|---|
| image vs noise: training MSE at the end (k = {kfit}, {fit[kfit]["steps"]} steps) | 3e-6 vs 8.9e-3 (k = 256, 10⁴ it.) | **{f(fit[kfit]["image"])}** vs **{f(fit[kfit]["noise"])}** (ratio {f(fit[kfit]["ratio"])}) |
{den_rows}
{chr(10).join(cs_rows)}
| generator, m = {m_rec}: relative error, low vs high frequencies (A⁺y) | — | **{f(rec["low"][m_rec]["error"])}** ({f(rec["low"][m_rec]["least_norm"])}) vs **{f(rec["high"][m_rec]["error"])}** ({f(rec["high"][m_rec]["least_norm"])}) |
| Jacobian's top vectors in the dual kernel's top span at init, k = {kmin} / {kj} (min over vectors) | — | {f(jac[kmin]["ref_init_min"])} / **{f(jac[kj]["ref_init_min"])}** |
| ... still in the initial span after training (mean), k = {kmin} / {kj} | — | {f(jac[kmin]["drift_end_mean"])} / **{f(jac[kj]["drift_end_mean"])}** |

The image reaches a far lower loss than noise, but at 64x64 it is a harder target than the authors'
piecewise-constant phantom, so the gap is a factor of {f(1 / fit[kfit]["ratio"])} rather than 3000.
Denoising gains less than the authors' 9.7 dB: a 64x64 resize of a photograph has more detail per
pixel than a 512x512 one. Sweeps on this 2-core machine (shared): {rate_line}.
"""
