"""Tests for dynamics.convex (P6, Ergen et al. 2021, arXiv 2103.01499): the paper's BN network
against a float64 numpy reference and the project's batch norm, exact hyperplane arrangements,
the d >= n closed form against the convex solver over every arrangement, the reconstruction
of weights from a convex solution, whitening invariance, and full-batch GD in float64 that
never beats the convex optimum and comes within a few percent of it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

pytest.importorskip("cvxpy")

from dynamics import convex, norms  # noqa: E402

N = 20
BETA = 0.1
LR = 0.2  # measured stable for every instance below; 0.3-0.4 oscillate on some (d = 2 and 50)
STEPS = 500


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _data(d, seed=0, n=N):
    """A planted two-ReLU target with a little noise (not centred: y's mean is not zero)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    a, b = rng.normal(size=d), rng.normal(size=d)
    y = np.maximum(X @ a / math.sqrt(d) + 0.3, 0) - 0.7 * np.maximum(X @ b / math.sqrt(d), 0)
    return X, y + 0.1 * rng.normal(size=n)


def _reference(params, X):
    """The paper's formula in float64 numpy, neuron by neuron."""
    W = np.asarray(params[0]["w"])
    g, a = np.asarray(params[0]["gamma"]), np.asarray(params[0]["alpha"])
    v = np.asarray(params[1]["w"])[0]
    n = X.shape[0]
    P = np.eye(n) - np.ones((n, n)) / n
    f = np.zeros(n)
    for j in range(W.shape[0]):
        c = P @ X @ W[j]
        f += np.maximum(g[j] * c / np.linalg.norm(c) + a[j] / math.sqrt(n), 0) * v[j]
    return f


_train = jax.jit(convex.train_bn_gd, static_argnums=(5,))


def _gd(X, y, m, seed):
    p0 = convex.bn_network(X.shape[1], m).init(jax.random.key(seed))
    p, trace = _train(p0, jnp.asarray(X), jnp.asarray(y), BETA, LR, STEPS)
    value = float(convex.bn_objective(p, jnp.asarray(X), jnp.asarray(y), BETA))
    assert np.all(np.isfinite(np.asarray(trace)))
    return value


@pytest.fixture(scope="module")
def d2():
    """n = 20, d = 2: the exact arrangements and the convex optimum over all of them."""
    X, y = _data(2)
    sol = convex.solve_convex_bn(X, y, BETA)
    return X, y, sol


# --------------------------------------------------------------------------- the network


def test_bn_network_matches_reference_and_batch_norm():
    X, _ = _data(3, 1, n=9)
    net = convex.bn_network(3, 5)
    params = net.init(jax.random.key(0))
    f = np.asarray(net.apply(params, jnp.asarray(X)))
    assert f.shape == (9, 1)
    np.testing.assert_allclose(f[:, 0], _reference(params, X), rtol=1e-12, atol=1e-12)
    # the norm-divided BN is the usual batch norm with affine gamma/sqrt(n), shift alpha/sqrt(n)
    z = jnp.asarray(X) @ params[0]["w"].T
    bn = norms.batch_norm(z, eps=0.0) * params[0]["gamma"][None, :] / 3.0
    h_std = jax.nn.relu(bn + params[0]["alpha"][None, :] / 3.0)
    _, h = net.apply_features(params, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_std), rtol=1e-12, atol=1e-12)
    # f does not depend on the scale of w_j (BN), so weight decay on w would be vacuous
    scaled = [dict(params[0], w=params[0]["w"] * 7.5), params[1]]
    np.testing.assert_allclose(np.asarray(net.apply(scaled, jnp.asarray(X))), f, rtol=1e-12)


def test_bn_network_mask_equals_smaller_batch():
    X, _ = _data(3, 2, n=12)
    net = convex.bn_network(3, 4)
    params = net.init(jax.random.key(1))
    keep = 7
    Xpad = X.copy()
    Xpad[keep:] = 100.0 * np.random.default_rng(3).normal(size=(12 - keep, 3))
    mask = np.arange(12) < keep
    full = np.asarray(net.apply(params, jnp.asarray(Xpad), jnp.asarray(mask)))[:keep]
    small = np.asarray(net.apply(params, jnp.asarray(X[:keep])))
    np.testing.assert_allclose(full, small, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    X, y = _data(2, 0, n=6)
    params = convex.bn_network(2, 3).init(jax.random.key(0))
    with pytest.raises(ValueError, match="d = 3"):
        convex.bn_apply(params, jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="y must be"):
        convex.bn_objective(params, jnp.asarray(X), jnp.ones((5,)), BETA)
    with pytest.raises(ValueError, match="rank"):
        convex.closed_form_bn(X, y, BETA)  # d = 2 < n - 1
    with pytest.raises(ValueError, match="arrangements"):
        convex.solve_convex_bn(X, y, BETA, arrangements=np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="no variation"):
        convex.centred_svd(np.ones((4, 2)))


# --------------------------------------------------------------------------- arrangements


def test_arrangements_exact_d2():
    X, _ = _data(2)
    Up = convex.centred_svd(X).Up
    exact = convex.arrangements(Up)
    # central arrangement of n generic planes in R^3: 2 (1 + (n-1) + C(n-1, 2)) cells, less
    # the all-zero pattern, which is dropped
    assert exact.shape == (2 * (1 + (N - 1) + math.comb(N - 1, 2)) - 1, N)
    # none missing: every pattern that random directions reach is in the enumeration
    sampled = convex.arrangements(Up, n_samples=20_000, seed=1)
    assert {row.tobytes() for row in sampled} <= {row.tobytes() for row in exact}
    assert len(sampled) > 0.8 * len(exact)
    # none spurious: each pattern is strictly realized, (2 D - 1) * (Up u) >= 1 for some u (LP)
    for pat in exact:
        A = -(2.0 * pat - 1.0)[:, None] * Up
        res = linprog(np.zeros(3), A_ub=A, b_ub=-np.ones(N), bounds=[(None, None)] * 3)
        assert res.status == 0, pat


def test_arrangements_square_is_all_patterns():
    X = np.random.default_rng(0).normal(size=(5, 8))
    pats = convex.arrangements(convex.centred_svd(X).Up)
    assert pats.shape == (2**5 - 1, 5)
    assert len({row.tobytes() for row in pats}) == 31


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [5, 6, 9])
def test_closed_form_matches_solver_over_all_arrangements(seed, d):
    n = 6  # d >= n - 1: U' square; all 2^n - 1 arrangements enumerated
    rng = np.random.default_rng(10 * seed + d)
    X = rng.normal(size=(n, d))
    y = rng.normal(size=n) + (0.8 if seed == 1 else 0.0)  # an offset: y's part along 1
    for beta in (0.05, 0.5, 2.0):
        sol = convex.solve_convex_bn(X, y, beta)
        cf = convex.closed_form_bn(X, y, beta)
        assert sol.solver == "CLARABEL"
        # the solver's point is feasible, so its (float64) value is an upper bound on p*
        assert sol.value >= cf.value - 1e-9 * max(1.0, cf.value)
        np.testing.assert_allclose(sol.value, cf.value, rtol=2e-7)
        # and the closed form's solution attains its value (so it is an upper bound too)
        net = convex.network_from_convex(cf)
        obj = float(convex.bn_objective(net, jnp.asarray(X), jnp.asarray(y), beta))
        np.testing.assert_allclose(obj, cf.value, rtol=1e-10)


def test_closed_form_matches_solver_n20_d50():
    X, y = _data(50)
    Up = convex.centred_svd(X).Up
    sampled = convex.arrangements(Up, n_samples=30, seed=0)
    with_signs = np.concatenate([sampled, np.stack([y > 0, y < 0])])
    cf = convex.closed_form_bn(X, y, BETA)
    a = convex.solve_convex_bn(X, y, BETA, arrangements=sampled)
    b = convex.solve_convex_bn(X, y, BETA, arrangements=with_signs)
    assert a.value > cf.value * 1.01  # 30 random patterns of 2^20 miss y's sign pattern
    np.testing.assert_allclose(b.value, cf.value, rtol=2e-7)


# --------------------------------------------------------------------------- reconstruction


def test_network_from_convex_attains_optimum(d2):
    X, y, sol = d2
    net = convex.network_from_convex(sol)
    obj = float(convex.bn_objective(net, jnp.asarray(X), jnp.asarray(y), BETA))
    np.testing.assert_allclose(obj, sol.value, rtol=1e-6)
    m = net[0]["w"].shape[0]
    wide = convex.network_from_convex(sol, m=m + 7)  # unused neurons contribute nothing
    obj_wide = float(convex.bn_objective(wide, jnp.asarray(X), jnp.asarray(y), BETA))
    np.testing.assert_allclose(obj_wide, obj, rtol=1e-12)
    with pytest.raises(ValueError, match="m must be"):
        convex.network_from_convex(sol, m=m - 1)


# --------------------------------------------------------------------------- whitening


def test_convex_optimum_whitening_invariant(d2):
    X, y, sol = d2
    r = convex.centred_svd(X).S.size
    for S in (None, np.array([30.0, 0.2])[:r]):
        Xw = convex.whiten(X, S)
        svd_w = convex.centred_svd(Xw)
        np.testing.assert_allclose(svd_w.S, np.ones(r) if S is None else S, rtol=1e-12)
        other = convex.solve_convex_bn(Xw, y, BETA)
        np.testing.assert_array_equal(other.patterns, sol.patterns)
        np.testing.assert_allclose(other.value, sol.value, rtol=1e-6)


# --------------------------------------------------------------------------- GD vs convex


@pytest.mark.parametrize("m", [40, 100])
@pytest.mark.parametrize("d", [2, 50])
def test_gd_never_below_and_near_convex_optimum(d, m, d2):
    if d == 2:
        X, y, sol = d2
        opt = sol.value
    else:
        X, y = _data(50)
        opt = convex.closed_form_bn(X, y, BETA).value
    for seed in range(2):
        value = _gd(X, y, m, seed)
        assert value >= opt * (1 - 1e-7)
        # measured at 500 steps, these instances: 0.15-0.27% above p* (d = 2), 0.23-0.99%
        # (d = 50); over 5 data x 4 init seeds the worst was 1.2% (d = 2) and 1.8% (d = 50)
        assert value <= opt * 1.02, (d, m, seed, value, opt)


def test_gd_same_objective_for_whitened_data(d2):
    X, y, sol = d2
    Xw = convex.whiten(X)
    for seed in range(2):  # measured: X 0.15%, 0.27% above p*; whitened 0.10%, 0.16%
        a, b = _gd(X, y, 40, seed), _gd(Xw, y, 40, seed)
        assert min(a, b) >= sol.value * (1 - 1e-7)
        np.testing.assert_allclose(a, b, rtol=0.02)
        assert max(a, b) <= sol.value * 1.02
    # the convex optimum is blind to the singular values, GD is not: on a copy of X with
    # condition number 100 the same budget stops far above p* (measured 90-440%), the
    # paper's point that GD favours the data's high-singular-value directions
    Xa = convex.whiten(X, np.array([10.0, 0.1]))
    assert _gd(Xa, y, 40, 0) > sol.value * 1.3


def test_scs_fallback_when_first_solver_fails():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(6, 8)), rng.normal(size=6)
    sol = convex.solve_convex_bn(X, y, 0.5, solver="NOT_A_SOLVER")
    assert sol.solver == "SCS"
    np.testing.assert_allclose(sol.value, convex.closed_form_bn(X, y, 0.5).value, rtol=1e-6)
