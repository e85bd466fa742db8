"""Tests for dynamics.kernels: quadrature against closed forms (arc-cosine, Isserlis, Gaussian
characteristic function), Du et al.'s limit kernel against the empirical Gram matrix of their
network as the width grows, the generator's Jacobian against autodiff and its expected J J^T
against the dual kernel, the least-norm solution against LAPACK's."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite import hermgauss

from dynamics import kernels as K


def _sphere(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _covs(batch, seed):
    """Random 2x2 covariances, the first few exactly singular (correlation +-1) or degenerate."""
    rng = np.random.default_rng(seed)
    a, c = rng.uniform(0.05, 4.0, (2, batch))
    rho = rng.uniform(-1.0, 1.0, batch)
    rho[:3], rho[3:6] = 1.0, -1.0
    b = rho * np.sqrt(a * c)
    a[6], b[6] = 0.0, 0.0  # u identically zero
    cov = np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2)
    cov[7] = [[2.0, 2.0], [2.0, 2.0]]  # identical points
    return cov


def _rel(A, B):
    return np.linalg.norm(A - B, 2) / np.linalg.norm(B, 2)


def _np_gram(model, params, x, wrt):
    return np.asarray(K.empirical_ntk_gram(model.apply, params, jnp.asarray(x, jnp.float32), wrt))


# --------------------------------------------------------------------------- quadrature


def test_quadrature_matches_arccos_closed_forms():
    cov = _covs(200, 0)
    relu = lambda u, v: np.maximum(u, 0) * np.maximum(v, 0)
    step = lambda u, v: ((u > 0) & (v > 0)).astype(np.float64)
    for f, degree in ((relu, 1), (step, 0)):
        exact = K.arccos_expectation(cov, degree)
        np.testing.assert_allclose(K.gaussian_expectation_2d(f, cov), exact, rtol=0, atol=1e-12)
    # the closed forms themselves at hand-checked points
    np.testing.assert_allclose(K.arccos_expectation(np.eye(2), 1), 1 / (2 * np.pi))
    np.testing.assert_allclose(K.arccos_expectation(np.eye(2), 0), 0.25)
    np.testing.assert_allclose(K.arccos_expectation(np.full((2, 2), 3.0), 1), 1.5)
    np.testing.assert_allclose(K.arccos_expectation(np.array([[1, -1], [-1, 1.0]]), 0), 0.0)


def test_quadrature_smooth_closed_forms_both_rules():
    cov = _covs(100, 1)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    cases = [
        (lambda u, v: u * v, b),
        (lambda u, v: u**2 * v**2, a * c + 2 * b**2),  # Isserlis
        (lambda u, v: np.cos(u - v), np.exp(-(a + c - 2 * b) / 2)),  # characteristic function
        (lambda u, v: np.cos(u) * np.cos(v), 0.5 * np.exp(-(a + c) / 2) * (np.exp(-b) + np.exp(b))),
    ]
    for method in K.QUADRATURES:
        for f, exact in cases:
            got = K.gaussian_expectation_2d(f, cov, method=method)
            np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)
    # analytic activations: the two rules agree (polar is the reference for non-smooth ones)
    sp = lambda u, v: np.logaddexp(0, u) * np.logaddexp(0, v)
    np.testing.assert_allclose(
        K.gaussian_expectation_2d(sp, cov, method="hermite"),
        K.gaussian_expectation_2d(sp, cov),
        rtol=1e-10,
    )


def test_quadrature_singular_block_is_one_dimensional():
    # identical points: E[s(u) s(v)] = E[s(u)^2], checked by a 1-D Gauss-Hermite rule
    x, w = hermgauss(200)
    for var in (0.3, 1.0, 5.0):
        z = np.sqrt(2 * var) * x
        ref = np.sum(w * np.logaddexp(0, z) ** 2) / np.sqrt(np.pi)
        got = K.gaussian_expectation_2d(
            lambda u, v: np.logaddexp(0, u) * np.logaddexp(0, v), np.full((2, 2), var)
        )
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    relu2 = lambda u, v: np.maximum(u, 0) * np.maximum(v, 0)
    np.testing.assert_allclose(K.gaussian_expectation_2d(relu2, np.full((2, 2), 3.0)), 1.5)


def test_quadrature_rejects_bad_covariances():
    f = lambda u, v: u * v
    with pytest.raises(ValueError, match="shape"):
        K.gaussian_expectation_2d(f, np.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        K.gaussian_expectation_2d(f, np.array([[1.0, 0.5], [0.2, 1.0]]))
    with pytest.raises(ValueError, match="positive semidefinite"):
        K.gaussian_expectation_2d(f, np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="method"):
        K.gaussian_expectation_2d(f, np.eye(2), method="simpson")


# --------------------------------------------------------------------------- Du et al.'s kernel


def test_c_sigma():
    x, w = hermgauss(300)
    z = np.sqrt(2) * x
    assert K.c_sigma("relu") == 2.0
    for name, s in (("softplus", lambda z: np.logaddexp(0, z)), ("tanh", np.tanh)):
        ref = 1.0 / (np.sum(w * s(z) ** 2) / np.sqrt(np.pi))
        np.testing.assert_allclose(K.c_sigma(name), ref, rtol=1e-10)


def test_limit_ntk_relu_closed_forms_and_quadrature_agree():
    x = _sphere(8, 4, 0)
    # one hidden layer: Du et al.'s two-layer H^infty, times c_sigma = 2
    cos = np.clip(x @ x.T, -1, 1)
    two_layer = 2 * cos * (np.pi - np.arccos(cos)) / (2 * np.pi)
    np.testing.assert_allclose(K.limit_ntk(x, 1, "relu"), two_layer, atol=1e-12)
    for depth in (2, 3):
        exact = K.limit_ntk(x, depth, "relu")
        np.testing.assert_allclose(K.limit_ntk(x, depth, "relu", method="polar"), exact, atol=1e-10)


def test_limit_ntk_is_psd_and_lambda0_positive():
    x = _sphere(12, 5, 1)
    for arch, depth in (("mlp", 1), ("mlp", 3), ("resnet", 3)):
        Kh = K.limit_ntk(x, depth, "softplus", arch=arch)
        assert Kh.dtype == np.float64 and Kh.shape == (12, 12)
        np.testing.assert_allclose(Kh, Kh.T, atol=1e-15)
        lam0 = K.lambda_min(Kh)
        np.testing.assert_allclose(lam0, np.linalg.eigvalsh(Kh)[0])
        assert lam0 > 0
    # a parallel pair (identical inputs) makes K^(H) singular: lambda_0 = 0
    x2 = np.concatenate([x[:3], x[:1]])
    assert abs(K.lambda_min(K.limit_ntk(x2, 2, "softplus"))) < 1e-12
    with pytest.raises(ValueError, match="depth"):
        K.limit_ntk(x, 1, arch="resnet")
    with pytest.raises(ValueError, match="activation"):
        K.limit_ntk(x, 2, "gelu")


@pytest.fixture(scope="module")
def two_layer():
    x = _sphere(10, 5, 2)
    model = K.du_mlp(5, 64, 1, activation="softplus")
    return x, model, model.init(jax.random.PRNGKey(0))


def test_two_layer_gram_closed_form(two_layer):
    x, model, params = two_layer
    W = np.asarray(params[0]["w"], np.float64)
    a = np.asarray(params[1]["w"], np.float64)[0]
    c, m = K.c_sigma("softplus"), 64
    pre = x @ W.T
    D = (1 / (1 + np.exp(-pre))) * a  # a_r sigma'(w_r . x_i)
    G_W = c / m * (D @ D.T) * (x @ x.T)  # sum_r a_r^2 s'(w_r x_i) s'(w_r x_j) <x_i, x_j> c/m
    S = np.logaddexp(0, pre)
    G_a = c / m * (S @ S.T)
    np.testing.assert_allclose(_np_gram(model, params, x, (0,)), G_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np_gram(model, params, x, (-2,)), G_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np_gram(model, params, x, None), G_W + G_a, rtol=1e-5, atol=1e-6)


def test_gram_converges_to_limit_at_rate_one_over_sqrt_width():
    x = _sphere(10, 5, 3)
    Kl = K.limit_ntk(x, 1, "softplus")
    # root-mean-square over 32 initializations; over six other sets of seeds the slope was -0.47
    # to -0.52
    widths, errs = (64, 256, 1024, 4096), []
    for m in widths:
        model = K.du_mlp(5, m, 1, activation="softplus")
        params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(m), 32))
        gram = functools.partial(K.empirical_ntk_gram, model.apply, wrt=(0,))
        G = np.asarray(jax.jit(jax.vmap(gram, in_axes=(0, None)))(params, jnp.asarray(x)))
        errs.append(np.sqrt(np.mean([_rel(g, Kl) ** 2 for g in G])))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    print(f"relative Gram error {np.round(errs, 4)}, log-log slope {slope:.3f}")
    assert -0.6 < slope < -0.4, (errs, slope)


@pytest.mark.parametrize(
    "arch, depth, activation, radius",
    [
        # tanh at |x| = 2: taking the last expectation under K^(H-2) instead would be off by 41%
        ("mlp", 2, "tanh", 2.0),
        ("mlp", 3, "softplus", 1.0),
        # without the mean terms b^(h) of the skip path the limit would be off by 38%
        ("resnet", 3, "softplus", 1.0),
    ],
)
def test_deep_gram_matches_limit(arch, depth, activation, radius):
    x = radius * _sphere(10, 5, 4)
    Kl = K.limit_ntk(x, depth, activation, arch=arch)
    model = K.du_mlp(5, 1024, depth, activation=activation, arch=arch)
    gram = jax.jit(lambda p: K.empirical_ntk_gram(model.apply, p, jnp.asarray(x), (depth - 1,)))
    # the mean over 4 initializations (one alone is off by 2-13% at this width)
    G = np.mean([np.asarray(gram(model.init(jax.random.PRNGKey(s)))) for s in range(4)], axis=0)
    assert _rel(G, Kl) < 0.08, _rel(G, Kl)


def test_empirical_ntk_transforms_and_helpers(two_layer):
    x, model, params = two_layer
    xj = jnp.asarray(x, jnp.float32)
    G = K.empirical_ntk_gram(model.apply, params, xj, (0,))
    assert G.dtype == jnp.float32 and G.shape == (10, 10)
    gram = functools.partial(K.empirical_ntk_gram, model.apply, wrt=(0,))
    np.testing.assert_allclose(jax.jit(gram)(params, xj), G, rtol=1e-6)
    stacked = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(1), 3))
    Gv = jax.vmap(gram, in_axes=(0, None))(stacked, xj)
    for s in range(3):
        one = jax.tree_util.tree_map(lambda a, s=s: a[s], stacked)
        np.testing.assert_allclose(Gv[s], gram(one, xj), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        G64 = K.empirical_ntk_gram(model.apply, p64, jnp.asarray(x, jnp.float64), (0,))
        assert G64.dtype == jnp.float64
        np.testing.assert_allclose(G64, G, rtol=1e-5)
    # helpers
    Gn = np.asarray(G, np.float64)
    np.testing.assert_allclose(K.gram_drift(G, G), 0.0, atol=0)
    np.testing.assert_allclose(K.gram_drift(2 * G, G), 1.0, rtol=1e-6)
    E = np.diag(np.arange(10.0)) * 1e-2
    np.testing.assert_allclose(
        K.gram_drift(G + E, G), np.linalg.norm(E, 2) / np.linalg.norm(Gn, 2), rtol=1e-4
    )
    np.testing.assert_allclose(K.gram_min_eig(G), np.linalg.eigvalsh(Gn)[0], rtol=1e-3)
    np.testing.assert_allclose(K.gram_min_eig(Gv), np.linalg.eigvalsh(np.asarray(Gv))[:, 0], 1e-3)
    with pytest.raises(ValueError, match="wrt"):
        K.empirical_ntk_gram(model.apply, params, xj, (2,))
    with pytest.raises(ValueError, match="wrt"):
        K.empirical_ntk_gram(model.apply, params, xj, (0, -2))
    with pytest.raises(ValueError, match="output"):
        K.empirical_ntk_gram(lambda p, x: model.apply(p, x).T, params, xj)
    with pytest.raises(ValueError, match="features"):
        model.apply(params, xj[:, :4])


def test_linear_rate_bound():
    np.testing.assert_allclose(
        K.linear_rate_bound(2.0, 0.1, 0.5, [0, 1, 10]), 2 * 0.975 ** np.array([0, 1, 10])
    )
    with pytest.raises(ValueError, match="lambda0"):
        K.linear_rate_bound(1.0, 10.0, 1.0, 3)


# --------------------------------------------------------------------------- the generator


def _bump(n, width):
    lag = np.minimum(np.arange(n), n - np.arange(n))  # circular distance to 0
    return np.exp(-0.5 * (lag / width) ** 2)


def test_circulant():
    U = K.circulant([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(U, [[1, 2, 3], [3, 1, 2], [2, 3, 1]])


def test_dual_kernel_of_circulant_is_diagonalized_by_fourier_modes():
    n = 64
    Sigma = K.generator_dual_kernel(K.circulant(_bump(n, 2.0)))
    # circulant: every row is the first one shifted
    np.testing.assert_allclose(Sigma, K.circulant(Sigma[0]), atol=1e-12)
    lam = np.fft.fft(Sigma[0]).real
    F = np.exp(2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n) / np.sqrt(n)
    np.testing.assert_allclose(Sigma @ F, F * lam[None, :], atol=1e-10)
    np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(Sigma), atol=1e-10)
    assert lam.min() > -1e-10  # an expectation of J J^T
    # eigenvalue of frequency k = 0 .. n/2: strictly decaying in the frequency, to about 1% of
    # the top one (U U^T's fall to 1e-16: the arccos factor keeps Sigma positive definite)
    half = lam[: n // 2 + 1]
    assert np.all(np.diff(half) < 0), half
    assert 0 < half[-1] < 0.02 * half[0], half


def test_generator_jacobian_matches_autodiff():
    rng = np.random.default_rng(5)
    n, k = 12, 7
    U = K.circulant(_bump(n, 1.5))
    C, v = rng.normal(size=(n, k)), rng.choice([-1.0, 1.0], k) / np.sqrt(k)
    G = lambda C: jax.nn.relu(jnp.asarray(U, jnp.float32) @ C) @ jnp.asarray(v, jnp.float32)
    J_ad = jax.jacfwd(G)(jnp.asarray(C, jnp.float32)).reshape(n, n * k)
    np.testing.assert_allclose(K.generator_jacobian(U, C, v), J_ad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compose"):
        K.generator_jacobian(U, C, v[:-1])


def test_jacobian_gram_approaches_dual_kernel():
    # E[J J^T] over C of iid Gaussian entries (any scale), v_l = +-1/sqrt(k), equals Sigma
    rng = np.random.default_rng(6)
    n = 32
    U = K.circulant(_bump(n, 2.0) + 0.3 * rng.normal(size=n))  # mixed-sign filter
    Sigma = K.generator_dual_kernel(U)
    errs = {}
    for k in (250, 4000):
        C = 0.01 * rng.normal(size=(n, k))
        v = rng.choice([-1.0, 1.0], k) / np.sqrt(k)
        J = K.generator_jacobian(U, C, v)
        errs[k] = np.linalg.norm(J @ J.T - Sigma) / np.linalg.norm(Sigma)
    assert errs[4000] < 0.03 and errs[4000] < 0.5 * errs[250], errs


def test_least_norm_solution():
    rng = np.random.default_rng(7)
    A, y = rng.normal(size=(20, 50)), rng.normal(size=20)
    x = K.least_norm_solution(A, y)
    np.testing.assert_allclose(x, np.linalg.lstsq(A, y, rcond=None)[0], atol=1e-12)
    np.testing.assert_allclose(A @ x, y, atol=1e-12)
    np.testing.assert_allclose(x, A.T @ np.linalg.solve(A @ A.T, y), atol=1e-12)
    # rank-deficient (repeated rows, inconsistent right-hand side) and several right-hand sides
    B = np.concatenate([A[:10], A[:10]])
    Y = rng.normal(size=(20, 3))
    np.testing.assert_allclose(
        K.least_norm_solution(B, Y), np.linalg.lstsq(B, Y, rcond=None)[0], atol=1e-10
    )
    with pytest.raises(ValueError, match="A must be"):
        K.least_norm_solution(A, y[:5])


# --------------------------------------------------------------------------- Gram observables


@pytest.mark.parametrize("arch,activation", [("mlp", "softplus"), ("resnet", "tanh")])
def test_du_layer_grams_match_the_jacobian(arch, activation):
    x = _sphere(7, 4, 3)
    model = K.du_mlp(4, 24, 3, activation=activation, arch=arch, c_res=0.7)
    params = model.init(jax.random.key(2))
    g = np.asarray(
        K.du_layer_grams(
            params, jnp.asarray(x, jnp.float32), activation=activation, arch=arch, c_res=0.7
        ),
        np.float64,
    )
    assert g.shape == (4, 7, 7)
    for k in range(4):
        np.testing.assert_allclose(g[k], _np_gram(model, params, x, (k,)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.sum(0), _np_gram(model, params, x, None), rtol=1e-5, atol=1e-6)
    # vmap over stacked params (a sweep's runs) gives each run's Grams
    stacked = jax.tree.map(lambda *a: jnp.stack(a), params, model.init(jax.random.key(3)))
    gv = jax.vmap(
        lambda p: K.du_layer_grams(
            p, jnp.asarray(x, jnp.float32), activation=activation, arch=arch, c_res=0.7
        )
    )(stacked)
    np.testing.assert_allclose(np.asarray(gv[0]), g, rtol=1e-6, atol=1e-7)


def _gram_ctx(params, init, data):
    from dynamics.recording import RecordContext

    return RecordContext(params, (), None, data, None, 0, None, lambda: init)


def test_ntk_gram_observables_equal_hand_computed_values():
    x = _sphere(9, 5, 1)
    model = K.du_mlp(5, 32, 2)
    p0, p1 = model.init(jax.random.key(0)), model.init(jax.random.key(1))
    data = dyn_data(x)
    R = K.limit_ntk(x, 2, "softplus")
    stats = ("min_eig", "max_eig", "drift", "rel_drift", "ref_dev")
    grams = functools.partial(K.du_layer_grams, activation="softplus")
    for wrt in ((1,), None):
        by_jac = K.ntk_gram_observables("x_train", model, wrt=wrt, stats=stats, reference=R)
        by_layers = K.ntk_gram_observables(
            "x_train", layer_grams=grams, wrt=wrt, stats=stats, reference=R, prefix="g"
        )
        assert [o.name for o in by_layers] == [f"g_{s}" for s in stats]
        G, G0 = _np_gram(model, p1, x, wrt), _np_gram(model, p0, x, wrt)
        ev = np.linalg.eigvalsh(G)
        want = dict(
            min_eig=ev[0],
            max_eig=ev[-1],
            drift=np.linalg.norm(G - G0, 2),
            rel_drift=np.linalg.norm(G - G0, 2) / np.linalg.norm(G0, 2),
            ref_dev=np.linalg.norm(G - R, 2) / np.linalg.norm(R, 2),
        )
        for obs in (by_jac, by_layers):
            ctx = _gram_ctx(p1, p0, data)
            got = {s: float(o.fn(ctx)) for s, o in zip(stats, obs, strict=True)}
            for s in stats:
                assert got[s] == pytest.approx(want[s], rel=2e-4, abs=1e-6), (wrt, s)
            # at initialization (params = init params) the drift is zero
            assert float(obs[2].fn(_gram_ctx(p0, p0, data))) == pytest.approx(0.0, abs=1e-5)


def dyn_data(x):
    from dynamics.train import RunData

    xj = jnp.asarray(x, jnp.float32)
    y = jnp.zeros((x.shape[0],), jnp.float32)
    return RunData(xj, y, xj, y, xj[:0], y[:0])


def test_ntk_gram_observables_in_a_run_use_the_runs_initial_parameters():
    import dynamics as dyn

    x = _sphere(10, 5, 4)
    y = np.where(np.arange(10) % 2, 1.0, -1.0)
    data = dyn.Dataset(
        x.astype(np.float32), y.astype(np.float32), x[:0].astype(np.float32), y[:0], 0, "s"
    )
    model = K.du_mlp(5, 48, 2)
    grams = functools.partial(K.du_layer_grams, activation="softplus")
    spec = dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=20,
        record_every=10,
        sampling="full",
        eval_size=None,
        observables=K.ntk_gram_observables(
            "x_train", layer_grams=grams, wrt=(1,), prefix="gram", stats=("min_eig", "drift")
        ),
        keep_state=True,
    )
    tr = jax.device_get(jax.jit(dyn.make_run(spec))(dyn.Hparams(lr=0.2), jax.random.key(5)))
    init = model.init(jax.random.split(jax.random.key(5))[0])  # make_run's init key
    final = tr["final_state"].state.params
    G0, G = _np_gram(model, init, x, (1,)), _np_gram(model, final, x, (1,))
    assert tr["gram_drift"][0] == pytest.approx(0.0, abs=1e-6)
    assert tr["gram_min_eig"][0] == pytest.approx(np.linalg.eigvalsh(G0)[0], rel=1e-3)
    assert tr["gram_min_eig"][-1] == pytest.approx(np.linalg.eigvalsh(G)[0], rel=1e-3)
    assert tr["gram_drift"][-1] == pytest.approx(np.linalg.norm(G - G0, 2), rel=1e-3)
    assert tr["gram_drift"][-1] > 1e-3  # training moved the Gram matrix


def test_ntk_gram_observables_reject_bad_arguments():
    model = K.du_mlp(5, 8, 2)
    with pytest.raises(ValueError, match="stats"):
        K.ntk_gram_observables("x_train", model, stats=("trace",))
    with pytest.raises(ValueError, match="reference"):
        K.ntk_gram_observables("x_train", model, stats=("ref_dev",))
    with pytest.raises(ValueError, match="model or layer_grams"):
        K.ntk_gram_observables("x_train")
    with pytest.raises(ValueError, match="probe"):
        K.ntk_gram_observables("x_nowhere", model)
