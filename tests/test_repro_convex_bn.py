"""P6 (Ergen et al., arXiv 2103.01499) as runs of the library, through the sweep config the
figure uses (sweeps/configs/convex_bn.py): the run (half-sum square loss, weight decay beta on
gamma, alpha and v only through `decay_mask`, full-batch GD in float64) is exactly
`convex.train_bn_gd`; its objective never goes below the convex optimum p* and comes within a
few percent of it; p* is the same for whitened and ill-conditioned copies of X (same U), GD's
result is not (the paper's implicit bias)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("cvxpy")

import dynamics as dyn  # noqa: E402
from dynamics import convex  # noqa: E402
from sweeps.configs import convex_bn  # noqa: E402

SETTINGS = dict(
    record_every=500, n=24, width=40, condition=100.0, beta=0.1, data_seed=0, steps=3000
)
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _hp():
    return dyn.train.as_hparams(dyn.Hparams(lr=0.05, weight_decay=0.1))


def _runs(spec):
    run = jax.jit(jax.vmap(dyn.make_run(spec), in_axes=(None, 0)))
    trace = run(_hp(), jax.vmap(jax.random.key)(jnp.asarray(SEEDS, jnp.uint32)))
    assert np.all(np.asarray(trace["status"]) == 0)
    return {k: np.asarray(v) for k, v in trace.items() if k != "final_state"}


@pytest.fixture(scope="module")
def d2_runs():
    out = {}
    for spectrum in ("original", "white", "ill"):
        out[spectrum] = _runs(convex_bn.build(d=2, spectrum=spectrum, **SETTINGS))
    return out


def test_library_run_is_gradient_descent_on_the_paper_objective():
    spec = convex_bn.build(d=2, spectrum="original", **{**SETTINGS, "steps": 200, "width": 8})
    spec = dataclasses.replace(spec, keep_state=True, record_every=200)
    key = jax.random.key(3)
    trace = jax.jit(dyn.make_run(spec))(_hp(), key)
    p0 = jax.tree.map(lambda a: a.astype(jnp.float64), spec.model.init(jax.random.split(key)[0]))
    X, y = jnp.asarray(spec.data.x_train), jnp.asarray(spec.data.y_train)
    hp = _hp()  # float32 lr and beta, as the run holds them
    want, _ = jax.jit(convex.train_bn_gd, static_argnums=(5,))(
        p0, X, y, hp.weight_decay.astype(jnp.float64), hp.lr.astype(jnp.float64), 200
    )
    got = trace["final_state"].state.params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    # and the recorded objective is the paper's, at the final parameters
    obj = float(convex.bn_objective(got, X, y, hp.weight_decay.astype(jnp.float64)))
    np.testing.assert_allclose(float(trace["objective"][-1]), obj, rtol=1e-6)


def test_gd_never_below_and_near_the_convex_optimum(d2_runs):
    for spectrum in ("original", "white"):
        gap = d2_runs[spectrum]["gap"]  # (seeds, records): (objective - p*) / p*
        assert np.all(gap >= -1e-12), (spectrum, gap.min())
        # measured (the convex_bn sweeps, same seeds) at 3000 steps: 0.17-0.28% above p*
        # (original), 0.09-0.18% (white)
        assert np.all(gap[:, -1] < 0.02), (spectrum, gap[:, -1])
    # d = 50 > n: the closed form's optimum, the same bounds
    gap = _runs(convex_bn.build(d=50, spectrum="original", **SETTINGS))["gap"]
    assert np.all(gap >= -1e-12) and np.all(gap[:, -1] < 0.02), gap[:, -1]


def test_convex_optimum_whitening_invariant_gd_is_not(d2_runs):
    p = {s: d2_runs[s]["p_star"][0, 0] for s in d2_runs}
    for s in ("white", "ill"):
        np.testing.assert_allclose(p[s], p["original"], rtol=1e-6)
    # the ill-conditioned copy (condition number 100, same U) is never below p* either, but
    # GD stops much farther from it with the same budget (measured at 3000 steps: 1.4-6.3%
    # above p* against 0.17-0.28% for the original X): the implicit bias of GD, which sees S
    ill, orig = d2_runs["ill"]["gap"], d2_runs["original"]["gap"]
    assert np.all(ill >= -1e-12)
    assert ill[:, -1].mean() > 5 * orig[:, -1].mean(), (ill[:, -1], orig[:, -1])
