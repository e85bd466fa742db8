"""P2 of REPRODUCTIONS.md at small scale, under the authors' protocol (sweeps/configs/
norm_dynamics.py, norm_equilibrium.py, neural_collapse.py; docs/protocols/P2.md).

Xu, Rangamani, Liao, Galanti, Poggio (2023) with their code's definitions: the BN conv net
NetSimpleConv4 (conv biases, non-affine BN before the ReLUs, weights at ||W_k||_F = s, PyTorch's
default biases), two one-hot outputs, mean square loss, SGD lr 0.01 momentum 0.9, batch 128,
rho_eff = prod ||W_k||_F / prod_BN ||sqrt(running_var)||. With weight decay rho_eff settles
and forgets the initial scale; without it rho_eff keeps drifting and stays where the start sent
it. The Lagrange form W_k = rho_k V_k meets rho = S1 / (S2 + lambda_eff) at convergence. Neural
collapse (Papyan, Han, Donoho 2020; Han et al. 2022 under MSE): NC1 falls by a large factor and
the centred class means approach a simplex.

Smaller than the sweeps (one seed, fewer init scales and epochs, narrower nets); the values the
sweep configs' docstrings and the README quote were measured at their scale, and the values
measured here are next to each bound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from figures.norm_dynamics import drift
from sweeps.configs import neural_collapse as nc_cfg
from sweeps.configs import norm_dynamics as nd
from sweeps.configs import norm_equilibrium as ne


def run_grid(spec, lr, momentum=0.0, seeds=(0,), **axes):
    """Every combination of `axes` (weight_decay, init_scale lists) and seeds, one vmapped run.
    Returns (trace of numpy arrays with a leading run axis, the grid as numpy arrays)."""
    names = ["seed", *axes]
    mesh = np.meshgrid(
        np.asarray(seeds), *[np.asarray(v, float) for v in axes.values()], indexing="ij"
    )
    grid = {k: m.ravel() for k, m in zip(names, mesh, strict=True)}
    n = grid["seed"].size
    hp = dyn.hparams(
        lr=jnp.full(n, lr),
        momentum=jnp.full(n, momentum),
        **{k: jnp.asarray(grid[k], jnp.float32) for k in axes},
    )
    keys = jax.vmap(jax.random.key)(jnp.asarray(grid["seed"], jnp.int32))
    trace = jax.jit(jax.vmap(dyn.make_run(spec)))(hp, keys)
    return jax.tree.map(np.asarray, trace), grid


def pick(grid, **where):
    """Index of the one run of `grid` with these axis values."""
    ok = np.ones(grid["seed"].size, bool)
    for k, v in where.items():
        ok &= np.isclose(grid[k], v)
    (i,) = np.flatnonzero(ok)
    return i


# --------------------------------------------------------------------------- the authors' net


def _conv_ref(x, w, b, stride, pad):
    """Conv2d(padding=pad, stride=stride) in float64 loops: x (B, C, H, W), w (O, C, k, k)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    ho = (x.shape[2] + 2 * pad - k) // stride + 1
    wo = (x.shape[3] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, stride * i : stride * i + k, stride * j : stride * j + k]
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w)
    return out + b[None, :, None, None]


def _netsimpleconv4_ref(params, x, running=None):
    """The authors' NetSimpleConv4 forward (extarget.py:668-748) in numpy float64: train-mode BN
    (batch mean and biased variance, eps 1e-5) when running is None, else eval mode with the
    given (mean, var) per BN layer. Returns (y, [(batch mean, unbiased var)] per BN)."""
    p = [{k: np.asarray(v, np.float64) for k, v in q.items()} for q in params]
    h = _conv_ref(np.asarray(x, np.float64), p[0]["w"], p[0]["b"], 2, 1)
    stats = []
    for i in (1, 2, 3):
        if running is None:
            mu = h.mean(axis=(0, 2, 3))
            var = h.var(axis=(0, 2, 3))
            n = h.shape[0] * h.shape[2] * h.shape[3]
            stats.append((mu, var * n / (n - 1)))
        else:
            mu, var = running[i - 1]
        h = (h - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
        h = np.maximum(h, 0.0)
        if i < 3:
            h = _conv_ref(h, p[i]["w"], p[i]["b"], 2, 1)
    y = _conv_ref(h, p[3]["w"], p[3]["b"], 1, 0)  # the head: kernel = the whole map
    return y.reshape(y.shape[0], -1), stats


@pytest.mark.parametrize("in_shape,width", [((1, 8, 8), 4), ((3, 32, 32), 2)])
def test_authors_net_is_netsimpleconv4(in_shape, width):
    """Train mode, the running statistics it leaves (PyTorch's momentum 0.1, unbiased variance),
    eval mode and rho_eff against a float64 reference with the authors' padding 1; the init:
    ||W_k||_F = 1 (times the run's init scale), biases PyTorch's default U(+-1/sqrt(fan_in)),
    drawn (not zero) and untouched by the init scale, as the authors' init_convnet leaves them."""
    model = nd.authors_net(in_shape, width)
    params = jax.jit(model.init)(jax.random.key(3))
    x = np.random.default_rng(4).standard_normal((9,) + in_shape).astype(np.float32)
    state = dyn.init_state(model)

    @jax.jit
    def both(params, state, x):
        f = dyn.forward(model, params, state, x, train=True)
        return (
            f,
            dyn.forward(model, params, f.state, x, train=False).y,
            dyn.rho_eff(params, f.state),
        )

    f, y_eval, rho_eff = both(params, state, x)
    y_ref, stats = _netsimpleconv4_ref(params, x)
    assert np.allclose(f.y, y_ref, rtol=1e-4, atol=1e-5), np.abs(f.y - y_ref).max()
    running = [(0.1 * mu, 0.9 + 0.1 * var) for mu, var in stats]
    for s, (mu, var) in zip(f.state[:3], running, strict=True):
        assert np.allclose(s["mean"], mu, atol=1e-5) and np.allclose(s["var"], var, rtol=1e-4)
    y_eval_ref, _ = _netsimpleconv4_ref(params, x, running)
    assert np.allclose(y_eval, y_eval_ref, rtol=1e-4, atol=1e-5)
    norms = [np.linalg.norm(np.asarray(p["w"]).ravel()) for p in params]
    want = np.prod(norms) / np.prod([np.sqrt(np.sum(v)) for _, v in running])
    assert np.isclose(float(rho_eff), want, rtol=1e-4)
    scaled = dyn.scale_weights(params, 0.1)
    ratios = []  # |b| / bound, uniform on [0, 1] for PyTorch's default
    for p, q in zip(params, scaled, strict=True):
        w, b = np.asarray(p["w"]), np.asarray(p["b"])
        assert np.isclose(np.linalg.norm(w.ravel()), 1.0, rtol=1e-5)
        assert np.isclose(np.linalg.norm(np.asarray(q["w"]).ravel()), 0.1, rtol=1e-5)
        assert np.array_equal(q["b"], b)
        ratios.append(np.abs(b) * np.sqrt(np.prod(w.shape[1:])))
    ratios = np.concatenate(ratios)
    assert ratios.max() <= 1 and ratios.max() > 0.5 and ratios.mean() > 0.2, ratios


# --------------------------------------------------------------------------- rho_eff


@pytest.fixture(scope="module")
def bn_runs():
    """The authors' BN net (width 8 as the sweep), init scales 1 and 3, wd 0 and 0.01, seed 0,
    2000 epochs of digits 1 vs 2 (the sweep's length, one seed, two of its init scales)."""
    spec = nd.build(2000, 20, "batch", "digits", (1, 2), "", 8, 128)
    obs = ("accuracy", "rho_eff", *nd.authors_train_margins(spec.model, 3, 20))
    spec = dataclasses.replace(spec, observables=obs)
    trace, grid = run_grid(spec, 0.01, 0.9, weight_decay=[0.0, 0.01], init_scale=[1.0, 3.0])
    assert (trace["status"] == 0).all()
    assert (trace["accuracy"][:, -1] == 1).all(), "every run must fit its training set"
    return trace, grid, spec.record_coords().astype(float)


def _late(r):
    n = r.shape[-1]
    return r[..., n - n // 4 :].mean(-1)


def test_rho_eff_settles_with_wd_and_drifts_without(bn_runs):
    trace, grid, epochs = bn_runs
    h = epochs.size // 2
    change, r2 = drift(trace["rho_eff"][:, h:], epochs[h:])
    wd, no = pick(grid, weight_decay=0.01, init_scale=1), pick(grid, weight_decay=0, init_scale=1)
    # from init 1 over epochs 1000-2000: with wd fluctuations about a level (sweep, seeds 0/1:
    # R^2 0.001 / 0.06, change -1.5% / +8.2%) ...
    assert r2[wd] < 0.3, (r2[wd], change[wd])
    # ... without it a monotone drift (R^2 0.95 / 0.94, +16% / +18%)
    assert r2[no] > 0.6 and change[no] > 0.08, (r2[no], change[no])


def test_rho_eff_forgets_the_init_only_with_wd(bn_runs):
    trace, grid, _ = bn_runs
    late = _late(trace["rho_eff"])

    def at(wd, s):
        return late[pick(grid, weight_decay=wd, init_scale=s)]

    # with wd init 1 and 3 end at one rho_eff (sweep: 3.75 and 3.79), without at 9.1 and 21
    assert at(0.01, 3) / at(0.01, 1) < 1.3, (at(0.01, 1), at(0.01, 3))
    assert at(0, 3) / at(0, 1) > 1.8, (at(0, 1), at(0, 3))
    assert max(at(0.01, 1), at(0.01, 3)) < min(at(0, 1), at(0, 3))


def test_authors_train_margins_cover_one_epoch(bn_runs):
    """Every record collects the margins of one epoch of minibatches: each of the 288 training
    examples once; the smallest is positive once the runs fit their data."""
    trace, _, _ = bn_runs
    n = trace["train_margin_stats"][:, 1:, 0]
    assert (n == 288).all(), np.unique(n)
    mean = trace["train_margin_stats"][:, -1, 1] / 288
    lo = trace["train_margin_lo"][:, -1]
    assert (lo > 0).all() and (lo < mean).all(), (lo, mean)


# --------------------------------------------------------------------------- Lagrange form


@pytest.fixture(scope="module")
def lagrange_runs():
    """The Lagrange form of the authors' net (no BN, no bias) at width 4, init 2, wd 0 and 0.01,
    normalized GD lr 0.1 (the sweep's), 600 epochs."""
    spec = ne.build(600, 10, "digits", (1, 2), "", 4, 128)
    spec = dataclasses.replace(spec, observables=("accuracy", ne.equilibrium(spec.model)))
    trace, grid = run_grid(spec, 0.1, weight_decay=[0.0, 0.01], init_scale=[2.0])
    assert (trace["status"] == 0).all() and (trace["accuracy"][:, -1] == 1).all()
    return trace, grid


def test_equilibrium_holds_for_the_lagrange_form(lagrange_runs):
    trace, grid = lagrange_runs
    eq = trace["equilibrium"]  # (run, record, [rho, rhs, rhs without lambda])
    rel = eq[..., 1] / eq[..., 0] - 1
    rel_no_lambda = eq[..., 2] / eq[..., 0] - 1
    for wd in (0.0, 0.01):
        i = pick(grid, weight_decay=wd)
        # at convergence (last quarter of the records) rho = S1 / (S2 + lambda_eff): measured
        # +0.11% (wd 0), -0.06% (wd 0.01); the sweep's last quarter: at most 0.08% with wd
        assert abs(_late(rel[i])) < 5e-3, _late(rel[i])
        # ... not at initialization (-7750%, -109%)
        assert abs(rel[i, 0]) > 0.5, rel[i, 0]
    # with weight decay the lambda term matters: S1/S2 misses rho by 3.3% (sweep: 3.4%)
    i = pick(grid, weight_decay=0.01)
    assert _late(rel_no_lambda[i]) > 0.015, _late(rel_no_lambda[i])
    # with wd rho settles at the minimum-rho solution (9.25 here, 9.3-9.8 in the sweep), below
    # the unregularized run's (32.6)
    j = pick(grid, weight_decay=0.0)
    assert eq[i, -1, 0] < 0.5 * eq[j, -1, 0], (eq[i, -1, 0], eq[j, -1, 0])


# --------------------------------------------------------------------------- neural collapse


@pytest.fixture(scope="module")
def nc_runs():
    """Papyan et al.'s protocol on all ten digits, MLP 64 -> 64 -> 64 -> 10 (BN, biases), square
    loss, SGD lr 0.2 momentum 0.9 wd 5e-4, 150 epochs with lr / 10 at 100 and 125 (the sweep:
    350 epochs, 117 and 233; the collapse happens at the first rate), 2 seeds."""
    spec = nc_cfg.build(150, 5, 2, (100, 125), "digits", "", 64, 2, 128)
    trace, _ = run_grid(spec, 0.2, 0.9, seeds=(0, 1), weight_decay=[5e-4])
    assert (trace["status"] == 0).all()
    return trace, spec.record_coords()


def test_neural_collapse(nc_runs):
    trace, epochs = nc_runs
    C = 10
    slow = np.isfinite(trace["nc1"][0])
    slow[0] = True
    for r in range(trace["nc1"].shape[0]):
        acc = trace["accuracy"][r]
        # the terminal phase: from the first record at 100% training accuracy (epoch 35-40)
        t_tp = epochs[np.flatnonzero(acc >= 1.0)[0]]
        assert t_tp <= epochs[-1] / 3, t_tp
        nc1 = trace["nc1"][r][slow]
        at_tp = nc1[epochs[slow] >= t_tp][0]
        assert nc1[0] / nc1[-1] > 100, (nc1[0], nc1[-1])  # measured 160-220x
        assert at_tp / nc1[-1] > 3, (at_tp, nc1[-1])  # within the terminal phase: 4.8-5.3x
        nc2 = trace["nc2"][r][slow]
        cos = trace["nc2_cos"][r][slow]
        # every pair of centred class means approaches cosine -1/(C-1) (mean |cos + 1/(C-1)|
        # 0.22-0.25 -> 0.063-0.064), and so does their mean
        assert nc2[-1] < nc2[0] / 2.5, (nc2[0], nc2[-1])
        assert abs(cos[-1] + 1 / (C - 1)) < 0.005, cos[-1]
        nc3 = trace["nc3"][r][slow]
        assert nc3[-1] < nc3[0] / 3, (nc3[0], nc3[-1])  # 2.1 -> 0.45-0.48
        assert trace["nc4"][r][slow][-1] < 0.01  # 0 - 0.0014
