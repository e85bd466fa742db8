"""Tests for dynamics.observables against slow numpy references (float64 loops), on matrices
and features constructed to have known answers (rank, simplex-ETF collapse, Hessian spectrum)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dynamics import models
from dynamics import observables as obs
from dynamics.steps import Batch
from dynamics.train import make_loss_fn


def _x(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _orth(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def _with_spectrum(shape, s, seed):
    """A matrix of the given shape with singular values s (padded with zeros)."""
    m, n = shape
    d = np.zeros((m, n))
    d[np.arange(len(s)), np.arange(len(s))] = s
    return (_orth(m, seed) @ d @ _orth(n, seed + 1).T).astype(np.float32)


# layers of unequal shapes, including a conv kernel read as (out, in * k)
PARAMS = [
    {"w": _x((5, 8), 1), "b": _x((5,), 2)},
    {"v": _x((3, 5), 3), "g": np.array([0.5, 2.0, 1.0], np.float32)},
    {"w": _x((4, 2, 3), 4)},
]


def _np_weights(params):
    out = []
    for p in params:
        if "w" in p:
            w = np.asarray(p["w"], np.float64)
        else:
            v = np.asarray(p["v"], np.float64)
            w = np.asarray(p["g"], np.float64)[:, None] * v / np.linalg.norm(v, axis=1)[:, None]
        out.append(w.reshape(w.shape[0], -1))
    return out


# --------------------------------------------------------------------------- norms and spectra


def test_layer_norms_rho_effective_lr():
    ws = _np_weights(PARAMS)
    norms = np.array([np.linalg.norm(w) for w in ws])
    np.testing.assert_allclose(obs.layer_norms(PARAMS), norms, rtol=1e-5)
    assert float(obs.rho(PARAMS)) == pytest.approx(np.prod(norms), rel=1e-5)
    np.testing.assert_allclose(obs.effective_lr(0.3, PARAMS), 0.3 / norms**2, rtol=1e-5)


def test_observables_stop_gradients():
    g = jax.grad(lambda p: obs.rho(p) + jnp.sum(obs.layer_norms(p)))(PARAMS)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_singular_values_match_numpy(method):
    sv = np.asarray(obs.singular_values(PARAMS, pad_to=6, method=method))
    assert sv.shape == (3, 6)
    for row, w in zip(sv, _np_weights(PARAMS), strict=True):
        s = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(row[: len(s)], s, rtol=1e-4, atol=1e-5)
        assert np.isnan(row[len(s) :]).all()
    assert obs.max_singular_values(PARAMS) == 5
    assert obs.singular_values(PARAMS).shape == (3, 5)


def test_gram_agrees_with_svd_on_well_conditioned():
    params = [{"w": _with_spectrum((6, 9), [4.0, 3.0, 2.5, 2.0, 1.5, 1.0], 5)}]
    params.append({"w": _with_spectrum((7, 4), [1.0, 0.9, 0.7, 0.5], 7)})
    a = obs.singular_values(params, method="svd")
    b = obs.singular_values(params, method="gram")
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(a[0], [4.0, 3.0, 2.5, 2.0, 1.5, 1.0], rtol=1e-5)


def test_numerical_and_stable_rank_on_constructed_matrices():
    # rank 3 exactly; rank 2 above tol = 1e-3 with a third value below tol * ||W||_F;
    # a smaller layer (NaN-padded row) of full rank 2.
    s_a = [5.0, 2.0, 1.0]
    s_b = [3.0, 0.5, 1e-4]
    s_c = [1.0, 1.0]
    params = [
        {"w": _with_spectrum((6, 8), s_a, 10)},
        {"w": _with_spectrum((8, 7), s_b, 12)},
        {"w": _with_spectrum((2, 8), s_c, 14)},
    ]
    sv = obs.singular_values(params)
    assert sv.shape == (3, 7) and np.isnan(np.asarray(sv[2, 2:])).all()
    np.testing.assert_array_equal(obs.numerical_rank(sv, 1e-3), [3.0, 2.0, 2.0])
    np.testing.assert_array_equal(obs.numerical_rank(sv, 1e-6), [3.0, 3.0, 2.0])
    np.testing.assert_array_equal(obs.numerical_rank(sv, 0.3), [2.0, 1.0, 2.0])
    want = [sum(x**2 for x in s) / s[0] ** 2 for s in (s_a, s_b, s_c)]
    np.testing.assert_allclose(obs.stable_rank(sv), want, rtol=1e-4)
    # against numpy on random matrices
    for w in _np_weights(PARAMS):
        s = np.linalg.svd(w, compute_uv=False)
        got = obs.stable_rank(jnp.asarray(s, jnp.float32))
        assert float(got) == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5)
        r = obs.numerical_rank(jnp.asarray(s, jnp.float32), 0.2)
        assert float(r) == np.sum(s / np.linalg.norm(w) > 0.2)


def test_balancedness_matches_numpy():
    params = [{"w": _x((4, 3), 20)}, {"w": _x((5, 4), 21)}, {"w": _x((2, 5), 22)}]
    got = np.asarray(obs.balancedness(params))
    ws = [np.asarray(p["w"], np.float64) for p in params]
    for k in range(2):
        want = np.linalg.norm(ws[k + 1].T @ ws[k + 1] - ws[k] @ ws[k].T)
        assert got[k] == pytest.approx(want, rel=1e-5)
    assert np.isnan(got[2])
    # a conv kernel read as (4, 2 * 3) does not chain with a (3, 5) layer: NaN
    got = np.asarray(obs.balancedness(PARAMS))
    assert np.isfinite(got[0]) and np.isnan(got[1:]).all()


# --------------------------------------------------------------------------- gradients


def test_grad_norms_cosines_update_sizes():
    g1 = [{"w": _x((3, 4), 30), "b": _x((3,), 31)}, {"w": _x((2, 3), 32)}]
    g2 = [{"w": _x((3, 4), 33), "b": _x((3,), 34)}, {"w": -g1[1]["w"] + 0.1 * _x((2, 3), 35)}]
    flat = lambda layer: np.concatenate([np.ravel(v).astype(np.float64) for v in layer.values()])
    np.testing.assert_allclose(
        obs.grad_norms(g1), [np.linalg.norm(flat(layer)) for layer in g1], rtol=1e-5
    )
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    per, whole = obs.grad_cosines(g1, g2)
    np.testing.assert_allclose(
        per, [cos(flat(a), flat(b)) for a, b in zip(g1, g2, strict=True)], rtol=1e-5
    )
    a = np.concatenate([flat(layer) for layer in g1])
    b = np.concatenate([flat(layer) for layer in g2])
    assert float(whole) == pytest.approx(cos(a, b), rel=1e-5)
    assert float(per[1]) < -0.9
    # an exactly zero gradient (every ReLU dead on a minibatch) has cosine 0, not NaN
    zero = [{"w": np.zeros((3, 4), np.float32), "b": np.zeros((3,), np.float32)}, g2[1]]
    per0, whole0 = obs.grad_cosines(g1, zero)
    assert float(per0[0]) == 0.0 and float(per0[1]) == pytest.approx(float(per[1]), rel=1e-6)
    assert np.isfinite(float(whole0)) and abs(float(whole0)) < 1
    # update sizes: ||W_new - W_old||_F / lr on the effective weights
    new = [{"v": 1.1 * PARAMS[1]["v"], "g": PARAMS[1]["g"] + 0.5}, {"w": PARAMS[2]["w"] * 0.5}]
    old = [PARAMS[1], PARAMS[2]]
    want = [
        np.linalg.norm(a - b) / 0.2 for a, b in zip(_np_weights(new), _np_weights(old), strict=True)
    ]
    np.testing.assert_allclose(obs.update_sizes(old, new, 0.2), want, rtol=1e-5)


# --------------------------------------------------------------------------- margins


def test_margins_match_numpy():
    pred = _x((7, 4), 40)
    y = np.array([0, 3, 1, 1, 2, 0, 3], np.int32)
    want = []
    for i in range(7):
        others = [pred[i, j] for j in range(4) if j != y[i]]
        want.append((pred[i, y[i]] - max(others)) / 2.5)
    np.testing.assert_allclose(obs.margins(pred, y, 2.5), want, rtol=1e-5, atol=1e-6)
    f = _x((6, 1), 41)
    t = np.array([1, -1, -1, 1, 1, -1], np.float32)
    np.testing.assert_allclose(obs.margins(f, t, 0.5), f[:, 0] * t / 0.5, rtol=1e-6)


# --------------------------------------------------------------------------- neural collapse


def _nc_reference(h, y, W, pred, C):
    """Slow float64 reference with explicit loops, following Papyan, Han & Donoho (2020)."""
    h, W, pred = (np.asarray(a, np.float64) for a in (h, W, pred))
    N, d = h.shape
    mu = np.stack([h[y == c].mean(axis=0) for c in range(C)])
    M = mu - h.mean(axis=0)
    S_W = np.zeros((d, d))
    for i in range(N):
        e = h[i] - mu[y[i]]
        S_W += np.outer(e, e) / N
    S_B = sum(np.outer(M[c], M[c]) for c in range(C)) / C
    nc1 = np.trace(S_W @ np.linalg.pinv(S_B, rcond=1e-10, hermitian=True)) / C
    pairs = [(a, b) for a, b in itertools.product(range(C), repeat=2) if a != b]
    cosines = [M[a] @ M[b] / np.linalg.norm(M[a]) / np.linalg.norm(M[b]) for a, b in pairs]
    norms = np.linalg.norm(M, axis=1)
    nc3 = np.sum((W / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2)
    miss = 0
    for i in range(N):
        ncc = min(range(C), key=lambda c: np.sum((h[i] - mu[c]) ** 2))
        miss += int(np.argmax(pred[i]) != ncc)
    var = [np.mean([np.sum((h[i] - mu[c]) ** 2) for i in range(N) if y[i] == c]) for c in range(C)]
    ratios = [
        (var[a] + var[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2))
        for a in range(C)
        for b in range(a + 1, C)
    ]
    return {
        "nc1": nc1,
        "nc2": np.mean([abs(c + 1 / (C - 1)) for c in cosines]),
        "nc2_cos": np.mean(cosines),
        "nc2_equinorm": norms.std() / norms.mean(),
        "nc3": nc3,
        "nc4": miss / N,
        "cdnv": np.mean(ratios),
    }


N_NC, D_NC, C_NC = 60, 8, 4
_nc = jax.jit(obs.neural_collapse, static_argnames="num_classes")


def _etf_means(C, d, seed, scale=2.0):
    """Simplex ETF: C unit-ish vectors in R^d with pairwise cosine -1/(C-1), centred at 0."""
    P = np.eye(C) - np.ones((C, C)) / C
    U = _orth(d, seed)[:C]  # orthonormal rows (C, d)
    return scale * np.sqrt(C / (C - 1)) * P @ U


def test_neural_collapse_matches_numpy_reference():
    rng = np.random.default_rng(50)
    y = np.repeat(np.arange(C_NC), N_NC // C_NC).astype(np.int32)
    rng.shuffle(y)
    h = (_etf_means(C_NC, D_NC, 51)[y] + 0.7 * rng.normal(size=(N_NC, D_NC))).astype(np.float32)
    W = rng.normal(size=(C_NC, D_NC)).astype(np.float32)
    pred = (h @ W.T + 0.5 * rng.normal(size=(N_NC, C_NC))).astype(np.float32)
    got = _nc(h, y, W, pred, num_classes=C_NC)
    want = _nc_reference(h, y, W, pred, C_NC)
    assert set(got) == set(obs.NC_NAMES)
    for name in obs.NC_NAMES:
        assert float(got[name]) == pytest.approx(want[name], rel=2e-4, abs=1e-6), name
    assert 0 < want["nc4"] < 1  # the nc4 branch is exercised


def test_neural_collapse_on_collapsed_and_random_features():
    y = np.repeat(np.arange(C_NC), N_NC // C_NC).astype(np.int32)
    mu = _etf_means(C_NC, D_NC, 52)
    h = mu[y].astype(np.float32)
    W = mu.astype(np.float32)
    got = {k: float(v) for k, v in _nc(h, y, W, h @ W.T, num_classes=C_NC).items()}
    assert got["nc1"] < 1e-6
    assert got["nc2"] < 1e-5
    assert got["nc2_cos"] == pytest.approx(-1 / (C_NC - 1), abs=1e-5)
    assert got["nc2_equinorm"] < 1e-5
    assert got["nc3"] < 1e-6
    assert got["nc4"] == 0.0
    assert got["cdnv"] < 1e-6
    # near collapse, within-class variability enters S_W quadratically: nc1 ~ sigma^2
    noise = _x((N_NC, D_NC), 53)
    nc1 = [float(_nc(h + s * noise, y, W, h @ W.T, num_classes=C_NC)["nc1"]) for s in (0.01, 0.02)]
    assert nc1[1] / nc1[0] == pytest.approx(4.0, rel=0.05)
    # features with no class structure are far from collapse
    rnd = _x((N_NC, D_NC), 54)
    far = {k: float(v) for k, v in _nc(rnd, y, W, rnd @ W.T, num_classes=C_NC).items()}
    assert far["nc1"] > 2.0 and far["cdnv"] > 2.0
    assert far["nc3"] > 0.3


# --------------------------------------------------------------------------- sharpness


def test_sharpness_on_quadratic_with_known_spectrum():
    lam = np.array([5.0, 2.0, 1.0, -0.5, 0.1, 0.0])
    Q = _orth(6, 60)
    A = jnp.asarray(Q @ np.diag(lam) @ Q.T, jnp.float32)

    def loss_fn(params, batch):
        w = params[0]["w"].ravel()
        return 0.5 * w @ A @ w + jnp.sum(batch.x * w)

    params = [{"w": jnp.asarray(_x((2, 3), 61))}]
    batch = Batch(jnp.ones((6,)), jnp.zeros((1,)), jnp.ones((1,)))
    s = jax.jit(obs.sharpness, static_argnums=(0, 4))(loss_fn, params, batch, jax.random.key(0), 40)
    assert float(s) == pytest.approx(5.0, rel=1e-5)
    apply, n = obs.hvp(loss_fn, params, batch)
    v = jnp.asarray(_x((6,), 62))
    np.testing.assert_allclose(apply(v), np.asarray(A) @ np.asarray(v), rtol=1e-5, atol=1e-5)


def test_sharpness_matches_explicit_hessian():
    model = models.mlp((3, 6, 2), activation="tanh", bias=True)
    loss_fn = make_loss_fn(model, "square")
    params = jax.jit(model.init)(jax.random.key(1))
    rng = np.random.default_rng(63)
    n = 16
    batch = Batch(
        rng.normal(size=(n, 3)).astype(np.float32),
        (2.0 * rng.normal(size=(n, 2))).astype(np.float32),
        np.full((n,), 1.0 / n, np.float32),
    )
    flat, unravel = ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
    ev = np.linalg.eigvalsh(np.asarray(H, np.float64))
    top = ev[np.argmax(np.abs(ev))]
    second = np.sort(np.abs(ev))[-2]
    assert top > 0 and second < 0.9 * top  # a positive, separated top eigenvalue
    s = jax.jit(obs.sharpness, static_argnums=(0, 4))(
        loss_fn, params, batch, jax.random.key(2), 300
    )
    assert float(s) == pytest.approx(top, rel=1e-3)
