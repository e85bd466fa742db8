"""dynamics/orthogonal.py (Hu, Xiao & Pennington 2020) against closed forms: the orthogonal
init's Gram matrices, the network as the explicit product W_L ... W_1 x / sqrt(m^{L-1} d_y),
the gradient of their loss against the textbook formula, their step size and rate against
numpy, and bad input naming its field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import orthogonal as orth
from dynamics.steps import Batch


@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (16, 64), (4, 32), (96, 96)])
def test_semi_orthogonal_gram_is_m_identity(shape):
    out, fan_in = shape
    w = np.asarray(orth.semi_orthogonal(jax.random.PRNGKey(3), shape), np.float64)
    assert w.shape == shape
    m = max(out, fan_in)
    gram = w.T @ w if out >= fan_in else w @ w.T
    np.testing.assert_allclose(gram / m, np.eye(min(out, fan_in)), atol=2e-5)
    # entries of variance 1, as the Gaussian init's
    assert abs(np.mean(w**2) - 1.0) < 0.1 * max(1.0, np.sqrt(m / w.size) * 10)


def test_semi_orthogonal_is_haar_not_a_fixed_matrix():
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    w = np.asarray(jax.vmap(lambda k: orth.semi_orthogonal(k, (8, 8)))(keys), np.float64)
    # different keys, different matrices; E[W] = 0 and E[W_ij^2] = 1 over the Haar measure
    assert np.abs(w[0] - w[1]).max() > 0.1
    assert np.abs(w.mean(0)).max() < 0.25  # std of a mean of 400 unit-variance entries: 0.05
    np.testing.assert_allclose((w**2).mean(0), 1.0, atol=0.3)
    # det +1 and -1 both occur (Haar on O(m), not SO(m))
    dets = np.sign(np.linalg.det(w))
    assert 0.3 < np.mean(dets > 0) < 0.7


def _product(params, x, width, depth, d_y):
    """f(X) = W_L ... W_1 X / sqrt(m^{L-1} d_y) in float64, examples as rows."""
    ws = [np.asarray(p["w"], np.float64) for p in params]
    h = np.asarray(x, np.float64).T
    for w in ws:
        h = w @ h
    return (h / np.sqrt(float(width) ** (depth - 1) * d_y)).T


@pytest.mark.parametrize("init", orth.HU_INITS)
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_hu_linear_is_the_scaled_product(init, depth):
    d_x, width, d_y, n = 12, 16, 3, 7
    model = orth.hu_linear(d_x, width, depth, d_y, init=init)
    params = jax.jit(model.init)(jax.random.PRNGKey(depth))
    assert len(params) == depth
    shapes = [p["w"].shape for p in params]
    if depth == 1:
        assert shapes == [(d_y, d_x)]
    else:
        assert shapes == [(width, d_x)] + [(width, width)] * (depth - 2) + [(d_y, width)]
    if init == "orthogonal" and depth > 1:
        w1 = np.asarray(params[0]["w"], np.float64)
        np.testing.assert_allclose(w1.T @ w1, width * np.eye(d_x), atol=1e-3 * width)
        wl = np.asarray(params[-1]["w"], np.float64)
        np.testing.assert_allclose(wl @ wl.T, width * np.eye(d_y), atol=1e-3 * width)
    x = np.random.default_rng(depth).standard_normal((n, d_x)).astype(np.float32)
    got = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x)), np.float64)
    want = _product(params, x, width, depth, d_y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_orthogonal_init_preserves_norms_through_depth():
    # W^T W = m I per layer: ||f(x)|| / ||x|| is the output layer's alone, whatever the depth
    d_x, width, d_y = 8, 32, 32
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, d_x)), jnp.float32)
    for depth in (12,):
        model = orth.hu_linear(d_x, width, depth, d_y, init="orthogonal")
        params = jax.jit(model.init)(jax.random.PRNGKey(1))
        y = np.asarray(jax.jit(model.apply)(params, x), np.float64)
        np.testing.assert_allclose(
            np.linalg.norm(y, axis=1) ** 2 * d_y / width,
            np.linalg.norm(np.asarray(x, np.float64), axis=1) ** 2,
            rtol=1e-3,
        )


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_grad_of_hu_loss_is_the_closed_form(depth):
    d_x, width, d_y, n = 6, 10, 3, 5
    rng = np.random.default_rng(depth)
    model = orth.hu_linear(d_x, width, depth, d_y, init="gaussian")
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    x = rng.standard_normal((n, d_x)).astype(np.float32)
    y = rng.standard_normal((n, d_y)).astype(np.float32)

    def loss(p):
        return orth.hu_loss(model.apply(p, jnp.asarray(x)), jnp.asarray(y))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    # slow reference: L = 1/2 ||c W_L ... W_1 X - Y||^2, c = m^{-(L-1)/2} d_y^{-1/2};
    # dL/dW_k = c (W_L ... W_{k+1})^T (F - Y) (W_{k-1} ... W_1 X)^T
    ws = [np.asarray(p["w"], np.float64) for p in params]
    c = 1.0 / np.sqrt(float(width) ** (depth - 1) * d_y)
    X, Y = x.T.astype(np.float64), y.T.astype(np.float64)
    F = c * np.linalg.multi_dot([*ws[::-1], X]) if depth > 1 else c * ws[0] @ X
    np.testing.assert_allclose(float(value), 0.5 * np.sum((F - Y) ** 2), rtol=1e-5)
    for k in range(depth):
        above = np.eye(d_y)  # W_L ... W_{k+1}
        for w in ws[:k:-1]:
            above = above @ w
        below = X
        for w in ws[:k]:
            below = w @ below
        want = c * above.T @ (F - Y) @ below.T
        got = np.asarray(grads[k]["w"], np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_hu_loss_is_a_sum_and_masks_padding():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.standard_normal((6, 3)).astype(np.float32)
    want = 0.5 * np.sum((pred.astype(np.float64) - y) ** 2)
    assert float(orth.hu_loss(pred, y)) == pytest.approx(want, rel=1e-6)
    # weights 1/b on the b = 4 kept examples, 0 on two padded ones: the sum over the kept
    w = np.array([0.25, 0.25, 0.25, 0.25, 0.0, 0.0], np.float32)
    kept = 0.5 * np.sum((pred[:4].astype(np.float64) - y[:4]) ** 2)
    assert float(orth.hu_loss(pred, y, jnp.asarray(w))) == pytest.approx(kept, rel=1e-6)
    pred[4:] = 1e3  # padding never counts
    assert float(orth.hu_loss(pred, y, jnp.asarray(w))) == pytest.approx(kept, rel=1e-6)


def test_hu_data_is_their_task():
    d = orth.hu_data(20, 7, 3, seed=4)
    assert d.x_train.shape == (7, 20) and d.y_train.shape == (7, 3)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 7))
    W = rng.standard_normal((3, 20))
    np.testing.assert_allclose(d.x_train, X.T, rtol=1e-6)
    np.testing.assert_allclose(d.y_train, (W @ X).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.x_test, d.x_train)


def test_hu_lr_and_rate_against_numpy():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 8))  # (d_x, n): rank 8
    s = np.linalg.svd(X, compute_uv=False)
    depth, d_y = 32, 4
    lr = orth.hu_lr(X.T, depth, d_y)  # rows or X itself: the same spectral norm
    assert lr == pytest.approx(d_y / (2 * depth * s[0] ** 2), rel=1e-12)
    assert orth.hu_lr(X, depth, d_y) == pytest.approx(lr, rel=1e-12)
    q = orth.hu_rate(X.T, lr, depth, d_y)
    assert q == pytest.approx(1 - lr * depth * s[-1] ** 2 / (4 * d_y), rel=1e-12)
    # at the theorem's lr, q = 1 - sigma_min^2 / (8 sigma_max^2), whatever L and d_y
    assert q == pytest.approx(1 - s[-1] ** 2 / (8 * s[0] ** 2), rel=1e-12)
    bound = orth.hu_rate_bound(2.5, X.T, lr, depth, d_y, np.arange(0, 50, 10))
    np.testing.assert_allclose(bound, 2.5 * q ** np.arange(0, 50, 10), rtol=1e-12)
    # a rank-deficient X: sigma_min is the smallest nonzero singular value
    Xr = X[:, :3] @ rng.standard_normal((3, 8))
    sr = np.linalg.svd(Xr, compute_uv=False)
    qr = orth.hu_rate(Xr, orth.hu_lr(Xr, depth, d_y), depth, d_y)
    assert qr == pytest.approx(1 - sr[2] ** 2 / (8 * sr[0] ** 2), rel=1e-9)


def test_lr_factor_is_constant():
    sched = orth.LrFactor(0.125)
    for t in (0, 7, 999):
        assert float(sched(jnp.asarray(t), 10, 1000)) == 0.125


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: orth.hu_linear(8, 8, 2, 2, init="he"), "init"),
        (lambda: orth.hu_linear(8, 0, 2, 2), "width"),
        (lambda: orth.hu_linear(8, 8, 0, 2), "depth"),
        (lambda: orth.hu_data(0, 4, 2), "d_x"),
        (lambda: orth.hu_lr(np.ones((4, 3)), 0, 2), "depth"),
        (lambda: orth.hu_lr(np.ones(4), 2, 2), "X"),
        (lambda: orth.hu_rate(np.eye(3), 100.0, 2, 1), "lr"),
        (lambda: orth.LrFactor(0.0), "factor"),
        (lambda: orth.LrFactor(float("nan")), "factor"),
        (lambda: orth.semi_orthogonal(jax.random.PRNGKey(0), (3, 0)), "shape"),
    ],
)
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_apply_checks_its_input():
    model = orth.hu_linear(8, 4, 3, 2, init="gaussian")
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="d_x"):
        model.apply(params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="depth"):
        model.apply(params[:2], jnp.ones((2, 8)))


def test_one_gd_step_in_units_of_hu_lr_lowers_the_loss():
    # the step the sweep takes: sgd on the full batch at lr * LrFactor(hu_lr)
    data = orth.hu_data(16, 4, 2)
    depth = 6
    model = orth.hu_linear(16, 32, depth, 2, init="orthogonal")
    params = jax.jit(model.init)(jax.random.PRNGKey(2))
    eta = orth.hu_lr(data.x_train, depth, 2)
    batch = Batch(jnp.asarray(data.x_train), jnp.asarray(data.y_train), jnp.full((4,), 0.25))

    def loss(p):
        return orth.hu_loss(model.apply(p, batch.x), batch.y, batch.weights)

    l0, g = jax.jit(jax.value_and_grad(loss))(params)
    new = jax.tree.map(lambda p, gg: p - eta * gg, params, g)
    l1 = float(jax.jit(loss)(new))
    assert l1 < float(l0)
    assert l1 <= orth.hu_rate(data.x_train, eta, depth, 2) * float(l0) * (1 + 1e-4)
