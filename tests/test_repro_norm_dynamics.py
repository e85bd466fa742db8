"""P2 of REPRODUCTIONS.md at small scale, through the sweep configs the figures use.

Norm dynamics under the square loss (Xu, Rangamani, Liao, Galanti, Poggio 2023): with
normalization (batch norm, or the Lagrange-multiplier form W_k = rho_k V_k) and weight decay,
rho settles at one value whatever the initial scale; without weight decay it keeps changing and
ends wherever the start sends it; the spread of the normalized margins shrinks with weight decay.
Neural collapse (Papyan, Han, Donoho 2020; Han et al. 2022 under MSE): NC1 falls by a large
factor in the terminal phase and the centred class means approach a simplex.

Measured values (seeds 0, 1; the sweep's CPU scale, 16000 steps) are quoted next to each bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from sweeps.runner import execute
from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

NORMS = ("batch", "lagrange")


def run_sweep(name, out, *sets):
    res = resolve(load_sweep(name), parse_overrides(sets))
    path = str(out / f"{name}.zarr")
    execute(res, build_specs(res), path, progress=False)
    return xr.open_zarr(path).load()


def trend(rho, steps):
    """Relative change of rho across a window, from a least-squares line through log rho (robust
    to the SGD noise around a fixed point). rho: (..., step)."""
    t = steps - steps.mean()
    slope = np.sum(np.log(rho) * t, axis=-1) / np.sum(t * t)
    return np.expm1(np.abs(slope) * (steps[-1] - steps[0]))


@pytest.fixture(scope="module")
def norm_ds(tmp_path_factory):
    """Both normalized forms, initial scales 1 and 3, with and without weight decay, 2 seeds."""
    out = tmp_path_factory.mktemp("norm_dynamics")
    ds = run_sweep(
        "norm_dynamics",
        out,
        "norm=" + ",".join(NORMS),
        "steps=16000",
        "record_every=250",
        "seed=0,1",
        "init_scale=1,3",
    )
    ds = ds.squeeze(("lr", "batch_size", "momentum"))
    assert (ds.status == 0).all()
    assert (ds.accuracy.isel(step=-1) == 1).all(), "every run must fit the training set"
    return ds


def second_half_trend(d):
    half = d.sizes["step"] // 2
    return trend(d.rho.isel(step=slice(half, None)).values, d.step.values[half:].astype(float))


def late_rho(d):
    """rho averaged over the last quarter of the records (the SGD noise around a fixed point
    is +-10% for batch norm)."""
    return d.rho.isel(step=slice(-(d.sizes["step"] // 4), None)).mean("step")


@pytest.mark.parametrize("norm", NORMS)
def test_rho_settles_with_weight_decay(norm_ds, norm):
    d = norm_ds.sel(norm=norm, weight_decay=0.01)
    # no trend over the second half (batch norm 0.7-4.8%, Lagrange 1.7-5.8%)
    assert second_half_trend(d).max() < 0.1
    # ... and the same rho from every start: the minimum-rho solution (BN 0.49-0.53 across
    # seeds and initial scales, Lagrange 8.55-8.68)
    end = late_rho(d).values
    assert end.max() / end.min() < 1.25, end


@pytest.mark.parametrize("norm", NORMS)
def test_rho_not_pinned_without_weight_decay(norm_ds, norm):
    d0 = norm_ds.sel(norm=norm, weight_decay=0.0)
    d1 = norm_ds.sel(norm=norm, weight_decay=0.01)
    # rho keeps growing from init scale 1 (BN 15-16%, Lagrange 38% over the second half) ...
    drift = second_half_trend(d0.sel(init_scale=1.0))
    assert drift.min() > 0.08, drift
    assert drift.min() > 2 * second_half_trend(d1).mean(), drift
    r = d0.rho.values  # (seed, init_scale, step)
    assert (r[..., -1] > r[..., r.shape[-1] // 2]).all(), "rho grows without weight decay"
    # ... ends where the start sends it (init 1 vs 3: BN 35-84 vs 155-460, Lagrange 19 vs 33;
    # from init 3 the Lagrange runs interpolate early and rho then barely moves: +1.4%) ...
    end = late_rho(d0)
    assert (end.sel(init_scale=3.0) > 1.5 * end.sel(init_scale=1.0)).all()
    # ... and above the weight-decay solution (BN 70x and more, Lagrange 2.1x and more)
    assert (end > 1.5 * late_rho(d1).max()).all()


def test_margin_spread_shrinks_with_weight_decay(norm_ds):
    """Lagrange form with weight decay: std/mean of y f(x)/rho over the training set falls from
    its first record (0.17-0.89) to one plateau (0.13) from every start.

    Not asserted, as not observed at this scale: a lower spread with weight decay than without.
    Without weight decay the spread ends lower (0.013-0.045): the square loss drives every
    margin towards 1/rho as the runs approach interpolation. Batch norm with SGD reaches its
    noise plateau (std/mean 0.05-0.1 with wd, 0.02-0.05 without) as soon as it fits the data."""
    d = norm_ds.sel(norm="lagrange", weight_decay=0.01)
    spread = (d.margin_std / d.margin_mean).values  # (seed, init_scale, step)
    n = spread.shape[-1]
    early = spread[..., 1]
    late = spread[..., -(n // 4) :].mean(-1)
    assert (late < early).all(), (early, late)
    assert (late < 0.2).all(), late
    assert np.mean(early / late) > 2, (early, late)
    assert late.max() / late.min() < 1.1, late


def test_neural_collapse(tmp_path):
    ds = run_sweep(
        "neural_collapse",
        tmp_path,
        "seed=0:4",
        "steps=4000",
        "record_every=200",
        "slow_every=1",
        "width=64",
    ).squeeze(("lr", "batch_size", "weight_decay", "momentum"))
    assert (ds.status == 0).all()
    steps = ds.step.values
    C = 10
    for s in ds.seed.values:
        d = ds.sel(seed=s)
        acc, nc1 = d.accuracy.values, d.nc1.values
        # terminal phase: from the first record with 100% training accuracy (1400-1800 steps)
        t_tp = steps[np.flatnonzero(acc >= 1.0)[0]]
        assert t_tp <= steps[-1] / 2, "the terminal phase must make up half the run"
        at_tp = nc1[steps >= t_tp][0]
        assert nc1[0] / nc1[-1] > 100, (nc1[0], nc1[-1])  # measured 190-310x
        assert at_tp / nc1[-1] > 4, (at_tp, nc1[-1])  # measured 6.4-10.6x within the phase
        # class means: mean cosine at -1/(C-1) (-0.1106..-0.1109), and each pair approaches it
        assert abs(d.nc2_cos.values[-1] + 1 / (C - 1)) < 0.002, d.nc2_cos.values[-1]
        assert d.nc2.values[-1] < d.nc2.values[0] / 2.5  # 0.14-0.21 -> 0.048-0.055
        assert d.nc3.values[-1] < d.nc3.values[0] / 8  # 1.9-2.1 -> 0.11-0.14
        assert d.nc4.values[-1] < 0.005  # 0
