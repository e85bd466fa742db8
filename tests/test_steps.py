"""Tests for dynamics.steps against closed forms and hand-written numpy updates: GD on a
quadratic, first-order convergence of GD to gradient flow, conservation of balancedness under
the flow, the SGD / Adam update rules of the docstrings, and the normalized dynamics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynamics import models, steps
from dynamics.models import layer_weight
from dynamics.steps import Batch, Hparams
from dynamics.train import make_loss_fn

KEY = jax.random.key(0, impl="rbg")


def _x(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _full_batch(x, y):
    n = x.shape[0]
    return Batch(jnp.asarray(x), jnp.asarray(y), jnp.full((n,), 1.0 / n, jnp.float32))


def _hp(lr, wd=0.0, mu=0.0):
    return Hparams(
        lr=jnp.float32(lr),
        weight_decay=jnp.float32(wd),
        batch_size=jnp.int32(0),
        momentum=jnp.float32(mu),
        init_scale=jnp.float32(1.0),
    )


def _run_steps(stepper, params, batch, hp, n):
    """n steps of step_fn in a lax.scan; returns (params after each step, infos)."""

    def body(state, _):
        state, info = stepper.step_fn(state, batch, hp)
        return state, (state.params, info)

    _, (trajectory, infos) = jax.lax.scan(body, stepper.init_fn(params), None, length=n)
    return trajectory, infos


# --------------------------------------------------------------------------- GD on a quadratic


def test_gd_on_quadratic_equals_closed_form():
    # linear model W (C, d), square loss on one-hot labels: for every output row c,
    # L = (1/(nC)) sum_i (w_c . x_i - e_ic)^2,  H = (2/(nC)) X^T X,  w_c(t) - w* = (I - lr H)^t (w_c(0) - w*).
    n, d, C, T, lr = 20, 5, 3, 25, 0.4
    X = _x((n, d), 1)
    y = np.random.default_rng(2).integers(0, C, n).astype(np.int32)
    model = models.mlp((d, C), activation="linear")
    loss_fn = make_loss_fn(model, "square")
    w0 = _x((C, d), 3)
    traj, infos = jax.jit(_run_steps, static_argnums=(0, 4))(
        steps.gd(loss_fn), [{"w": w0}], _full_batch(X, y), _hp(lr), T
    )
    Xd, E = X.astype(np.float64), np.eye(C)[y]
    H = 2.0 / (n * C) * Xd.T @ Xd
    assert lr * np.linalg.eigvalsh(H).max() < 2  # stable, so the trajectory converges
    w_star = np.linalg.solve(Xd.T @ Xd, Xd.T @ E).T  # (C, d)
    A = np.eye(d) - lr * H
    for t in range(T):
        want = w_star + (np.linalg.matrix_power(A, t + 1) @ (w0 - w_star).T).T
        np.testing.assert_allclose(traj[0]["w"][t], want, rtol=1e-4, atol=1e-5)
    # info reports the loss and gradient at the parameters before the step
    g0 = 2.0 / (n * C) * (w0.astype(np.float64) @ Xd.T - E.T) @ Xd
    np.testing.assert_allclose(infos.grads[0]["w"][0], g0, rtol=1e-4, atol=1e-6)
    loss0 = np.mean((Xd @ w0.T.astype(np.float64) - E) ** 2)
    assert float(infos.loss[0]) == pytest.approx(loss0, rel=1e-5)


# --------------------------------------------------------------------------- gradient flow


@pytest.fixture(scope="module")
def deep_linear():
    """A deep linear network on a regression task, with jitted GD and flow integrators."""
    model = models.deep_linear((3, 4, 4, 2))
    params = jax.jit(model.init)(KEY)
    X = _x((16, 3), 10)
    Y = _x((16, 2), 11, scale=2.0)
    batch = _full_batch(X, Y)
    loss_fn = make_loss_fn(model, "square")
    gd, flow = steps.gd(loss_fn), steps.gradient_flow(loss_fn)

    @jax.jit
    def gd_run(params, lr, n):
        hp = _hp(lr)
        body = lambda i, s: gd.step_fn(s, batch, hp)[0]
        return jax.lax.fori_loop(0, n, body, gd.init_fn(params)).params

    @jax.jit
    def flow_run(params, T):  # one step of the flow advances time by hp.lr
        return flow.step_fn(flow.init_fn(params), batch, _hp(T))[0]

    return params, gd_run, flow_run


def _dist(a, b):
    return math.sqrt(
        sum(
            float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
    )


def test_gd_converges_to_gradient_flow_at_first_order(deep_linear):
    params, gd_run, flow_run = deep_linear
    T = 0.8
    state = flow_run(params, T)
    assert float(state.t) == pytest.approx(T)
    w_flow = state.params
    assert _dist(w_flow, params) > 0.1  # the flow moved
    lrs = np.array([0.04, 0.02, 0.01, 0.005])
    errors = np.array([_dist(gd_run(params, lr, round(T / lr)), w_flow) for lr in lrs])
    slope = np.polyfit(np.log(lrs), np.log(errors), 1)[0]
    assert 0.8 < slope < 1.2, (slope, errors)
    assert errors[-1] < 1e-2 * _dist(w_flow, params)


def _balance_matrices(params):
    ws = [np.asarray(layer_weight(p), np.float64) for p in params]
    return [b.T @ b - a @ a.T for a, b in zip(ws[:-1], ws[1:], strict=True)]


def test_gradient_flow_conserves_balancedness(deep_linear):
    # Arora et al. (2018): under gradient flow W_{k+1}^T W_{k+1} - W_k W_k^T is constant;
    # GD changes it by lr^2 (G_{k+1}^T G_{k+1} - G_k G_k^T) per step.
    params, gd_run, flow_run = deep_linear
    T, lr = 2.0, 0.1
    D0 = _balance_matrices(params)
    w_flow = flow_run(params, T).params
    w_gd = gd_run(params, lr, round(T / lr))
    assert _dist(w_flow, params) > 0.1
    drift_flow = max(
        np.linalg.norm(a - b) for a, b in zip(_balance_matrices(w_flow), D0, strict=True)
    )
    drift_gd = max(np.linalg.norm(a - b) for a, b in zip(_balance_matrices(w_gd), D0, strict=True))
    scale = max(np.linalg.norm(a) for a in D0)
    assert drift_flow < 1e-4 * scale, (drift_flow, scale)
    assert drift_gd > 100 * drift_flow, (drift_gd, drift_flow)


# --------------------------------------------------------------------------- update rules


def _toy_loss(params, batch):
    # elementwise: L = sum 0.5 a w^2 + c w + 0.25 w^4, gradient a w + c + w^3
    return sum(
        jnp.sum(0.5 * batch.x[: p["w"].size].reshape(p["w"].shape) * p["w"] ** 2)
        + jnp.sum(batch.y[: p["w"].size].reshape(p["w"].shape) * p["w"])
        + 0.25 * jnp.sum(p["w"] ** 4)
        for p in params
    )


A_TOY = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.2], np.float32)
C_TOY = np.array([0.3, -0.2, 0.1, 0.5, -0.4, 0.0], np.float32)


def _toy_grad(w):
    a, c = A_TOY[: w.size].reshape(w.shape), C_TOY[: w.size].reshape(w.shape)
    return a * w + c + w**3


def _np_sgd(ws, n, lr, wd, mu, momentum, decay):
    """Hand-written float64 updates following steps.sgd's docstring."""
    ws = [w.astype(np.float64) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    out = []
    for _ in range(n):
        new = []
        for i, w in enumerate(ws):
            g = _toy_grad(w)
            d = g + wd * w if decay == "l2" else g
            extra = wd * w if decay == "decoupled" else 0.0
            if momentum is None:
                w = w - lr * (d + extra)
            else:
                vs[i] = mu * vs[i] + d
                u = vs[i] if momentum == "heavy_ball" else d + mu * vs[i]
                w = w - lr * (u + extra)
            new.append(w)
        ws = new
        out.append(ws)
    return out


def _np_adam(ws, n, lr, wd, decay, b1=0.9, b2=0.999, eps=1e-8):
    ws = [w.astype(np.float64) for w in ws]
    m = [np.zeros_like(w) for w in ws]
    s = [np.zeros_like(w) for w in ws]
    out = []
    for t in range(1, n + 1):
        new = []
        for i, w in enumerate(ws):
            g = _toy_grad(w)
            d = g + wd * w if decay == "l2" else g
            m[i] = b1 * m[i] + (1 - b1) * d
            s[i] = b2 * s[i] + (1 - b2) * d**2
            mh, sh = m[i] / (1 - b1**t), s[i] / (1 - b2**t)
            u = mh / (np.sqrt(sh) + eps) + (wd * w if decay == "decoupled" else 0.0)
            new.append(w - lr * u)
        ws = new
        out.append(ws)
    return out


_TOY_BATCH = Batch(jnp.asarray(A_TOY), jnp.asarray(C_TOY), jnp.ones((1,)))
_TOY_W = [_x((2, 3), 20), _x((4,), 21)]
_run_toy = jax.jit(_run_steps, static_argnums=(0, 4))


@pytest.mark.parametrize("momentum", [None, "heavy_ball", "nesterov"])
@pytest.mark.parametrize("decay", ["l2", "decoupled"])
def test_sgd_update_rules_match_numpy(momentum, decay):
    n, lr, wd, mu = 6, 0.05, 0.2, 0.9
    stepper = steps.sgd(_toy_loss, momentum=momentum, weight_decay=decay)
    traj, infos = _run_toy(stepper, [{"w": w} for w in _TOY_W], _TOY_BATCH, _hp(lr, wd, mu), n)
    want = _np_sgd(_TOY_W, n, lr, wd, mu, momentum, decay)
    for t in range(n):
        for k in range(2):
            np.testing.assert_allclose(traj[k]["w"][t], want[t][k], rtol=1e-5, atol=1e-6)
    # info.grads: the loss gradient at the old params, without the weight-decay term
    for k in range(2):
        np.testing.assert_allclose(infos.grads[k]["w"][0], _toy_grad(_TOY_W[k]), rtol=1e-5)
        np.testing.assert_allclose(
            infos.grads[k]["w"][3], _toy_grad(want[2][k]), rtol=1e-4, atol=1e-6
        )


def test_momentum_conventions_differ():
    # with momentum and weight decay the two conventions give different trajectories
    hp = _hp(0.05, 0.2, 0.9)
    p = [{"w": w} for w in _TOY_W]
    a = _run_toy(
        steps.sgd(_toy_loss, momentum="heavy_ball", weight_decay="l2"), p, _TOY_BATCH, hp, 6
    )
    b = _run_toy(
        steps.sgd(_toy_loss, momentum="heavy_ball", weight_decay="decoupled"), p, _TOY_BATCH, hp, 6
    )
    assert _dist(a[0], b[0]) > 1e-3


@pytest.mark.parametrize("decay", ["l2", "decoupled"])
def test_adam_update_rules_match_numpy(decay):
    n, lr, wd = 6, 0.05, 0.2
    stepper = steps.adam(_toy_loss, weight_decay=decay)
    traj, _ = _run_toy(stepper, [{"w": w} for w in _TOY_W], _TOY_BATCH, _hp(lr, wd), n)
    want = _np_adam(_TOY_W, n, lr, wd, decay)
    for t in range(n):
        for k in range(2):  # m / sqrt(s) amplifies float32 rounding: a looser atol than SGD's
            np.testing.assert_allclose(traj[k]["w"][t], want[t][k], rtol=1e-5, atol=1e-5)


def test_optax_stepper_matches_sgd():
    hp = _hp(0.05, 0.0, 0.9)
    p = [{"w": w} for w in _TOY_W]
    ours = _run_toy(steps.sgd(_toy_loss, momentum="heavy_ball"), p, _TOY_BATCH, hp, 4)[0]
    stepper = steps.optax_stepper(_toy_loss, lambda h: optax.sgd(h.lr, momentum=h.momentum))
    theirs = _run_toy(stepper, p, _TOY_BATCH, hp, 4)[0]
    assert _dist(ours, theirs) < 1e-6


# --------------------------------------------------------------------------- normalized dynamics


@pytest.fixture(scope="module")
def lagrange_net():
    """Two Lagrange layers W = rho V and a plain output layer, on a regression task."""
    model = models.mlp((4, 5, 3), weight_param="lagrange", activation="tanh")
    params = jax.jit(model.init)(KEY)
    out = {"w": jnp.asarray(_x((2, 3), 30, scale=0.5))}
    params = params + [out]
    tanh_model = models.mlp((4, 5, 3), activation="tanh")

    def loss_fn(params, batch):
        h = tanh_model.apply([{"w": layer_weight(p)} for p in params[:2]], batch.x)
        pred = h @ params[2]["w"].T
        return jnp.mean((pred - batch.y) ** 2)

    batch = _full_batch(_x((12, 4), 31), _x((12, 2), 32))
    return params, loss_fn, batch


def test_normalized_gd_matches_numpy_step(lagrange_net):
    params, loss_fn, batch = lagrange_net
    lr, wd = 0.1, 0.05
    stepper = steps.normalized_gd(loss_fn)
    traj, infos = jax.jit(_run_steps, static_argnums=(0, 4))(stepper, params, batch, _hp(lr, wd), 4)
    p = [{k: np.asarray(v, np.float64) for k, v in q.items()} for q in params]
    grad = jax.jit(jax.grad(loss_fn))
    for t in range(4):
        g = grad([{k: jnp.asarray(v, jnp.float32) for k, v in q.items()} for q in p], batch)
        g = [{k: np.asarray(v, np.float64) for k, v in q.items()} for q in g]
        new = []
        for q, gq in zip(p, g, strict=True):
            if "v" in q:
                V = q["v"]
                P = gq["v"] - np.sum(gq["v"] * V) * V
                V = V - lr * P
                new.append(
                    {"v": V / np.linalg.norm(V), "rho": q["rho"] - lr * (gq["rho"] + wd * q["rho"])}
                )
            else:
                new.append({"w": q["w"] - lr * (gq["w"] + wd * q["w"])})
        p = new
        for k in range(3):
            for name in p[k]:
                np.testing.assert_allclose(traj[k][name][t], p[k][name], rtol=1e-4, atol=1e-6)
        for k in range(2):
            assert float(jnp.linalg.norm(traj[k]["v"][t])) == pytest.approx(1.0, abs=1e-6)
    assert float(jnp.abs(traj[0]["rho"][-1] - params[0]["rho"])) > 1e-3  # rho moved


def test_normalized_flow_is_limit_of_normalized_gd(lagrange_net):
    params, loss_fn, batch = lagrange_net
    T, wd = 0.6, 0.05
    flow = steps.gradient_flow(loss_fn, normalized=True)
    w_flow = jax.jit(lambda p: flow.step_fn(flow.init_fn(p), batch, _hp(T, wd))[0].params)(params)
    for k in range(2):
        assert float(jnp.linalg.norm(w_flow[k]["v"])) == pytest.approx(1.0, abs=1e-5)
    assert _dist(w_flow, params) > 0.05
    ngd = steps.normalized_gd(loss_fn)

    @jax.jit
    def ngd_run(p, lr, n):
        body = lambda i, s: ngd.step_fn(s, batch, _hp(lr, wd))[0]
        return jax.lax.fori_loop(0, n, body, ngd.init_fn(p)).params

    errors = [_dist(ngd_run(params, T / n, n), w_flow) for n in (15, 30, 60)]
    # first order: halving lr halves the error
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.2), errors
    assert errors[1] / errors[2] == pytest.approx(2.0, rel=0.2), errors


def test_normalized_direction_is_tangent(lagrange_net):
    params, loss_fn, batch = lagrange_net
    g = jax.grad(loss_fn)(params, batch)
    d = steps._normalized_direction(params, g, 0.3)
    for k in range(2):
        assert abs(float(jnp.vdot(d[k]["v"], params[k]["v"]))) < 1e-6
        assert float(d[k]["rho"]) == pytest.approx(
            float(g[k]["rho"] + 0.3 * params[k]["rho"]), rel=1e-5
        )
    np.testing.assert_allclose(d[2]["w"], g[2]["w"] + 0.3 * params[2]["w"], rtol=1e-6)
