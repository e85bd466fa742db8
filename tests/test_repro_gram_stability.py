"""P10 (Du, Lee, Li, Wang, Zhai 2019) at small scale, through the sweep config the figure uses
(sweeps/configs/gram_stability.py) with only its scale reduced: widths {64, 256, 1024}, 6 seeds,
40 GD steps (the loss falls to ~0.4 of its start within them; the rest of training only creeps
along the tiny eigenvalues). Each assertion fails if its effect is absent; the numbers beside
them were measured on this instance. The paper's sufficient condition sup_t ||G(t) - G(0)||_2 <
lambda_0/4 does NOT hold at these widths (lambda_0 = 1.9e-4): that test is a strict xfail, so it
reports if it ever starts to hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from figures.gram_stability import _runs, limit_kernel, numbers
from sweeps import runner
from sweeps.spec import build_specs, load_sweep, resolve

WIDTHS = "64,256,1024"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    res = resolve(
        load_sweep("gram_stability"),
        [("width", WIDTHS), ("seed", "0,1,2,3,4,5"), ("steps", "40"), ("record_every", "5")],
    )
    out = str(tmp_path_factory.mktemp("p10") / "gram_stability.zarr")
    runner.execute(res, build_specs(res), out, progress=False)
    raw = xr.open_zarr(out).load()
    ds = _runs(raw)
    K = limit_kernel(json.loads(raw.attrs["spec"])["settings"])
    lam0 = float(np.linalg.eigvalsh(K)[0])
    return ds, lam0, numbers(ds, lam0)


def test_runs_are_healthy_and_the_step_is_stable(sweep):
    ds, lam0, n = sweep
    assert np.all(ds.status.values == 0)
    assert lam0 == pytest.approx(1.917e-4, rel=1e-3)  # float64 quadrature, fixed data
    # lr * lambda_max(full NTK) stays near 1 (measured 1.04 at most): GD is not at the edge
    assert n["lr_times_ntk_max_eig"] < 1.5, n["lr_times_ntk_max_eig"]


def test_gram_at_init_approaches_the_limit_kernel_at_rate_one_over_sqrt_width(sweep):
    _, _, n = sweep
    # geometric seed means, measured 0.20 / 0.087 / 0.056, log-log slope -0.46; the spread over
    # seeds is large (0.08-0.55 at m = 64): the tolerance is +-0.2 around -1/2
    assert np.all(np.diff(n["dev0"]) < 0), n["dev0"]
    assert -0.7 <= n["slope_dev0"] <= -0.3, n["slope_dev0"]
    assert n["dev0_max"][-1] < 0.15, n["dev0_max"]


@pytest.mark.xfail(
    strict=True,
    reason="Du et al.'s sufficient condition needs far wider nets: at m = 1024 the drift is "
    "0.013-0.04, about 300x lambda_0/4 = 4.8e-5",
)
def test_gram_drift_stays_below_a_quarter_of_lambda0_at_the_largest_width(sweep):
    ds, lam0, _ = sweep
    sup = ds.gram_drift.isel(width=-1).max("step").values
    assert np.all(sup < lam0 / 4), (sup, lam0 / 4)


def test_gram_drift_shrinks_with_width_and_lambda_min_stays_above_half_lambda0(sweep):
    ds, lam0, n = sweep
    # relative drift sup_t ||G(t) - G(0)|| / ||G(0)||: measured 0.072 / 0.020 / 0.0043 (slope -1.0)
    assert np.all(np.diff(n["sup_rel_drift"]) < 0), n["sup_rel_drift"]
    assert n["slope_rel_drift"] < -0.5, n["slope_rel_drift"]
    # what the condition is for: lambda_min(G^(H)(t)) >= lambda_0 / 2 all along, at every width
    # but the smallest (measured min over t and seeds / lambda_0: 0.35 / 0.72 / 0.88)
    assert min(n["min_eig_over_lambda0"][1:]) >= 0.5, n["min_eig_over_lambda0"]
    assert np.all(np.diff(n["min_eig_over_lambda0"]) > 0), n["min_eig_over_lambda0"]


def test_loss_stays_below_the_linear_rate_bound(sweep):
    ds, lam0, n = sweep
    # ||y - u(t)||^2 <= (1 - lr lambda_0 / 2)^t ||y - u(0)||^2 at every record of every run
    # (equality at t = 0); not vacuous: the loss falls to 0.41-0.55 of its start
    assert max(n["loss_over_bound_max"]) <= 1.0 + 1e-6, n["loss_over_bound_max"]
    assert max(n["loss_end_over_start"]) < 0.7, n["loss_end_over_start"]


def test_relative_weight_movement_shrinks_with_width(sweep):
    _, _, n = sweep
    # ||W_k(T) - W_k(0)||_F / ||W_k(0)||_F, seed means per layer (W1, W2, W3, a), measured
    # W1 0.044 / 0.020 / 0.011, hidden 0.013 / 0.003 / 0.0008, a 0.13 / 0.073 / 0.039
    for k, rel in enumerate(n["rel_dist"]):
        assert np.all(np.diff(rel) < 0), (k, rel)
        assert n["slope_rel_dist"][k] < -0.3, (k, n["slope_rel_dist"])
