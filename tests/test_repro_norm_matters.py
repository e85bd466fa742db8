"""P7 (Hoffer et al., arXiv 1803.01814; Zhang et al., arXiv 1810.12281) at small scale, through
the sweep configs the figure uses: a batch norm after a layer makes the loss blind to each
row's scale, so <g_i, w_i> = 0 and, without decay, ||w_i||^2 grows by exactly lr^2 ||g_i||^2
per step; with decay the norm settles and lr / ||W||^2 rises to an equilibrium; the
decay-free run with the norm-matched rate follows the decay run's directions to float64
rounding; L1 and top-k batch norm train as well as L2, and in float16 only L2 overflows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import norms
from dynamics import steps as dsteps
from sweeps.configs import lp_batchnorm, norm_matters, norm_matters_exact

EXACT = dict(
    steps=100,
    record_every=25,
    dataset="digits",
    n_train=128,
    width=16,
    depth=2,
    eps=0.0,
    precision="float64",
    lr=0.3,
    weight_decay=1e-3,
    ref_seeds=(0, 1),
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _batch(data, n, dtype):
    x = jnp.asarray(data.x_train[:n], dtype)
    return dsteps.Batch(x, jnp.asarray(data.y_train[:n]), jnp.full((n,), 1.0 / n, dtype))


def _rows(w):
    return jnp.linalg.norm(w, axis=1)


@pytest.mark.parametrize("bn_p", ["l2", "l1", "linf"])
def test_gradient_orthogonal_to_normalized_rows(x64, bn_p):
    data = norm_matters.digits_or_mnist("digits")
    model = norm_matters.bn_mlp(64, 16, 2, 10, bn_p=bn_p, eps=0.0, gamma_init="uniform")
    p = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0)))
    loss_fn = dyn.make_loss_fn(model, "cross_entropy")
    _, g, _ = dsteps.loss_and_grad(loss_fn, p, _batch(data, 128, jnp.float64))
    for k in range(2):  # hidden layers, each followed by a batch norm: per row <g, w> = 0
        cos = jnp.sum(g[k]["w"] * p[k]["w"], 1) / (_rows(g[k]["w"]) * _rows(p[k]["w"]))
        assert float(jnp.max(jnp.abs(cos))) < 1e-12, (bn_p, k)
    cls = jnp.sum(g[2]["w"] * p[2]["w"]) / (jnp.linalg.norm(g[2]["w"]) * jnp.linalg.norm(p[2]["w"]))
    assert abs(float(cls)) > 1e-3  # the classifier is not normalized


def test_norm_grows_by_lr2_grad2_without_decay(x64):
    data = norm_matters.digits_or_mnist("digits")
    model = norm_matters.bn_mlp(64, 16, 2, 10, eps=0.0, gamma_init="uniform")
    p = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1)))
    loss_fn = dyn.make_loss_fn(model, "cross_entropy")
    batch = _batch(data, 128, jnp.float64)
    mask = norm_matters.decay_masks(2, "not_hidden_w")
    stepper = dyn.sgd(loss_fn, decay_mask=mask)
    hp = dyn.Hparams(lr=jnp.float64(0.5), weight_decay=jnp.float64(0.01))
    step = jax.jit(stepper.step_fn)
    state = stepper.init_fn(p)
    for _ in range(5):
        new, info = step(state, batch, hp)
        for k in range(2):
            before, after = _rows(state.params[k]["w"]), _rows(new.params[k]["w"])
            want = before**2 + 0.25 * _rows(info.grads[k]["w"]) ** 2
            np.testing.assert_allclose(np.asarray(after**2), np.asarray(want), rtol=1e-12)
        state = new


def _exact_runs(overrides, run, stepper=None):
    """Both seeds of `norm_matters_exact` at EXACT's small size, recording norms and directions."""
    spec = norm_matters_exact.build(run=run, **{**EXACT, **overrides})
    spec = dataclasses.replace(spec, observables=("layer_norm", norm_matters.directions(2, True)))
    if stepper is not None:
        spec = dataclasses.replace(spec, stepper=stepper)
    hp = dyn.train.as_hparams(
        dyn.Hparams(
            lr=overrides.get("lr", EXACT["lr"]),
            weight_decay=overrides.get("weight_decay", EXACT["weight_decay"]),
            batch_size=spec.data.n_train,
        )
    )
    run_fn = jax.jit(jax.vmap(dyn.make_run(spec), in_axes=(None, 0, None)))
    keys = jax.vmap(jax.random.key)(jnp.asarray([0, 1], jnp.uint32))
    t = run_fn(hp, keys, dyn.train.run_data(spec))
    assert np.all(np.asarray(t["status"]) == 0)
    return {k: np.asarray(v, np.float64) for k, v in t.items()}


def _dirs(trace):
    d = trace["directions_hilo"]
    return d[:, :, 0] + d[:, :, 1]  # (seed, record, hidden_layer, row, col), float64


def test_corrected_run_follows_the_decay_run_to_rounding(x64):
    wd = _exact_runs({}, "wd")
    corrected = _exact_runs({}, "corrected")
    gap = np.abs(_dirs(corrected) - _dirs(wd)).max()
    assert gap < 1e-12, gap  # the sweep (600 steps, 3 x 64, 256 images): 1.8e-15
    # the classifier (not normalized, decayed in both runs) is the same; the eval-mode loss is
    # not (the running variances average pre-activations whose scale differs between the runs)
    np.testing.assert_allclose(corrected["layer_norm"][..., 2], wd["layer_norm"][..., 2], rtol=1e-6)
    # while the norms differ: the decay-free rows keep their norm growth
    assert np.all(corrected["layer_norm"][:, -1, :2] > wd["layer_norm"][:, -1, :2])
    # (without the correction the decay-free run goes elsewhere: tests/test_steps_layer_lr.py)


def _settle_runs():
    """The authors' protocol (`norm_matters`, run "wd": SGD lr 0.1, momentum 0.9, batch 128)
    with a constant lr, the weights initialized 3x larger than PyTorch's (the norms start
    above their equilibrium), 300 epochs, width 64, 2 hidden layers; one program for a strong
    decay (2e-3) and none (0, on every parameter): (layer_norm, effective_lr) of shape
    (decay, seed, record, hidden layer)."""
    settings = dict(
        epochs=300,
        record_every=20,
        dataset="digits",
        data_root="",
        width=64,
        depth=2,
        batch=128,
        lr=0.1,
        weight_decay=2e-3,
        momentum=0.9,
        ref_seeds=(0,),
    )
    spec = dataclasses.replace(
        norm_matters.build(run="wd", **settings),
        lr_schedule=None,
        observables=("layer_norm", "effective_lr"),
    )
    hp = dyn.train.hparams(
        lr=[0.1] * 4,
        weight_decay=[2e-3, 2e-3, 0.0, 0.0],
        momentum=[0.9] * 4,
        batch_size=[128] * 4,
        init_scale=[3.0] * 4,
    )
    keys = jax.vmap(jax.random.key)(jnp.asarray([0, 1, 0, 1], jnp.uint32))
    run_fn = jax.jit(jax.vmap(dyn.make_run(spec), in_axes=(0, 0, None)))
    t = run_fn(hp, keys, dyn.train.run_data(spec))
    assert np.all(np.asarray(t["status"]) == 0)
    norm = np.asarray(t["layer_norm"])[..., :2].reshape(2, 2, -1, 2)
    eff = np.asarray(t["effective_lr"])[..., :2].reshape(2, 2, -1, 2)
    return norm, eff


def test_decay_settles_the_norm_and_the_effective_lr():
    (norm, free), (eff, free_eff) = _settle_runs()  # each (seed, record, hidden layer)
    late = norm[:, 8:]  # epochs 160-300: fluctuating about an equilibrium
    # measured: layer 0 from 14.0 to 4.8 +- 0.8, layer 1 from 13.8 to 2.9 +- 0.5
    assert np.all(late.mean(1) < 0.5 * norm[:, 0])
    assert np.all(late.std(1) < 0.3 * late.mean(1))
    assert np.all(np.abs(norm[:, 8:12].mean(1) / norm[:, 12:].mean(1) - 1) < 0.25)
    # lr / ||W||^2 rose (8-25x here) to the equilibrium those norms give
    assert np.all(eff[:, 8:].mean(1) > 5 * eff[:, 0])
    # without decay the norm only grows (momentum 0.9: by lr^2 ||buffer||^2 and a small cross
    # term) and lr / ||W||^2 only falls
    assert np.all(np.diff(free, axis=1) > -1e-3 * free[:, 1:])
    assert np.all(free[:, -1] > free[:, 0]) and np.all(free_eff[:, -1] < free_eff[:, 0])


# --------------------------------------------------------------------------- Lp batch norm


def test_half_precision_overflow_is_l2s_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8))
    for s, l2_ok in ((20.0, True), (1000.0, False)):  # |x - mu| above 256 only at s = 1000
        xs = jnp.asarray(x * s, jnp.float32)
        for p in ("l2", "l1", "linf"):
            y16 = norms.batch_norm(xs.astype(jnp.float16), p=p).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(y16 - norms.batch_norm(xs, p=p))))
            assert (err < 0.02) == (p != "l2" or l2_ok), (s, p, err)
    # BN after the first layer: the float32 gradient does not see a x1000 input scale
    data = norm_matters.digits_or_mnist("digits")
    model = norm_matters.bn_mlp(64, 16, 2, 10)
    p = model.init(jax.random.key(0))
    loss_fn = dyn.make_loss_fn(model, "cross_entropy")
    g1 = dsteps.loss_and_grad(loss_fn, p, _batch(data, 128, jnp.float32))[1]
    big = lp_batchnorm.scaled(data, 1000.0)
    g2 = dsteps.loss_and_grad(loss_fn, p, _batch(big, 128, jnp.float32))[1]
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-5)


LP = dict(lp_batchnorm.SETTINGS, epochs=20, record_every=20, milestones=(8, 12, 16))


def _lp_runs(**overrides):
    spec = lp_batchnorm.build(**{**LP, **overrides})
    spec = dataclasses.replace(spec, observables=("test_accuracy",))
    hp = dyn.train.as_hparams(dyn.Hparams(lr=0.1, weight_decay=1e-4, momentum=0.9, batch_size=128))
    run = jax.jit(jax.vmap(dyn.make_run(spec), in_axes=(None, 0, None)))
    keys = jax.vmap(jax.random.key)(jnp.asarray([0, 1], jnp.uint32))
    t = run(hp, keys, dyn.train.run_data(spec))
    return np.asarray(t["status"]), np.asarray(t["test_accuracy"][:, -1])


def test_l1_and_topk_match_l2_and_only_l2_fails_in_float16():
    acc = {}
    for p in ("l2", "l1", "linf"):
        status, acc[p] = _lp_runs(bn_p=p)
        assert np.all(status == 0)
    # "within a point": the sweep (60 epochs, 3 seeds) measured L1 1.0 and top-k 0.4 points
    # below L2's 97.8%; 2 seeds of 360 test images leave ~0.5 point of noise, hence 1.5
    for p in ("l1", "linf"):
        assert acc[p].mean() > acc["l2"].mean() - 0.015, (p, acc)
    # inputs x1000 (no change in exact arithmetic): in float16, L2's variance overflows
    # (L1 and top-k train there: test_half_precision_overflow_is_l2s_only for the norms
    # themselves, the lp_batchnorm_stress sweep for the training)
    status, _ = _lp_runs(bn_p="l2", precision="float16", input_scale=1000.0)
    assert np.all(status == 1)
