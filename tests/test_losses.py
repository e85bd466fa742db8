"""Tests for dynamics.losses against numpy, and the masked-batch contract: a padded batch with
weights 1/b on its first b examples gives exactly the loss and gradient of the b-example batch,
batch-normalized networks included."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dynamics import losses, models
from dynamics.steps import Batch, loss_and_grad
from dynamics.train import make_loss_fn

KEY = jax.random.key(0, impl="rbg")
RNG = np.random.default_rng(0)


def _x(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _weights(n, keep):
    return np.where(np.arange(n) < keep, 1.0 / keep, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- values


def test_square_loss_int_labels_and_regression():
    pred = _x((6, 4), 1)
    labels = np.array([0, 3, 1, 1, 2, 0], np.int32)
    onehot = np.eye(4)[labels]
    per = ((pred.astype(np.float64) - onehot) ** 2).mean(axis=1)
    assert float(losses.square_loss(pred, labels)) == pytest.approx(per.mean(), rel=1e-6)
    target = _x((6, 4), 2)
    per_r = ((pred.astype(np.float64) - target) ** 2).mean(axis=1)
    assert float(losses.square_loss(pred, target)) == pytest.approx(per_r.mean(), rel=1e-6)
    # image-shaped outputs: mean over every output entry of an example
    img, tgt = _x((3, 2, 4, 4), 3), _x((3, 2, 4, 4), 4)
    want = ((img.astype(np.float64) - tgt) ** 2).mean()
    assert float(losses.square_loss(img, tgt)) == pytest.approx(want, rel=1e-6)


def test_square_loss_weights_mean_over_kept():
    pred, target = _x((8, 3), 5), _x((8, 3), 6)
    keep = 5
    pred_pad = pred.copy()
    pred_pad[keep:] = np.nan  # a padded example never reaches the sum
    got = float(losses.square_loss(pred_pad, target, _weights(8, keep)))
    want = ((pred[:keep].astype(np.float64) - target[:keep]) ** 2).mean()
    assert got == pytest.approx(want, rel=1e-6)
    # general (non-uniform) weights: sum_i w_i mean_j (f - y)^2
    w = np.abs(_x((8,), 7))
    w = (w / w.sum()).astype(np.float32)
    per = ((pred.astype(np.float64) - target) ** 2).mean(axis=1)
    assert float(losses.square_loss(pred, target, w)) == pytest.approx((w * per).sum(), rel=1e-5)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def test_cross_entropy_matches_numpy():
    pred = _x((7, 5), 8, scale=4.0)
    labels = np.array([4, 0, 2, 2, 1, 3, 0], np.int32)
    logp = _np_log_softmax(pred)
    per = -logp[np.arange(7), labels]
    assert float(losses.cross_entropy(pred, labels)) == pytest.approx(per.mean(), rel=1e-6)
    keep = 4
    got = float(losses.cross_entropy(pred, labels, _weights(7, keep)))
    assert got == pytest.approx(per[:keep].mean(), rel=1e-6)
    # probability targets
    probs = np.exp(_np_log_softmax(_x((7, 5), 9)))
    want = -(probs * logp).sum(axis=1).mean()
    got = float(losses.cross_entropy(pred, probs.astype(np.float32)))
    assert got == pytest.approx(want, rel=1e-5)
    # large logits stay finite (log-softmax, not log of softmax)
    assert np.isfinite(float(losses.cross_entropy(1e4 * pred, labels)))


def test_measurement_loss_matches_numpy():
    A = _x((5, 12), 10)
    pred = _x((3, 1, 12), 11)
    y = _x((3, 5), 12)
    z = pred.reshape(3, -1).astype(np.float64) @ A.T.astype(np.float64)
    want = ((z - y) ** 2).mean(axis=1)
    loss = losses.measurement_loss(A)
    assert float(loss(pred, y)) == pytest.approx(want.mean(), rel=1e-5)
    assert float(loss(pred, y, _weights(3, 2))) == pytest.approx(want[:2].mean(), rel=1e-5)


def test_accuracy():
    pred = np.array(
        [[1.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0], [2.0, 1.0, 0.0]], np.float32
    )
    labels = np.array([1, 0, 1, 1], np.int32)
    assert float(losses.accuracy(pred, labels)) == pytest.approx(0.5)
    assert float(losses.accuracy(pred, labels, _weights(4, 2))) == pytest.approx(1.0)
    assert float(losses.accuracy(pred, labels, _weights(4, 3))) == pytest.approx(2 / 3)
    # single output: sign against +-1 targets
    f = np.array([[0.3], [-2.0], [1.0], [-0.1]], np.float32)
    y = np.array([1.0, -1.0, -1.0, -1.0], np.float32)
    assert float(losses.accuracy(f, y)) == pytest.approx(0.75)
    # regression targets have no accuracy
    assert np.isnan(float(losses.accuracy(pred, pred)))


# --------------------------------------------------------------------------- masked batches


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = np.sqrt(
        sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in zip(la, lb, strict=True))
    )
    den = np.sqrt(sum(np.sum(np.asarray(y, np.float64) ** 2) for y in lb))
    return num / den


@pytest.mark.parametrize(
    "name,model,x_shape,loss",
    [
        ("mlp", models.mlp((5, 7, 3), bias=True), (5,), "cross_entropy"),
        ("mlp_bn_l2", models.mlp((5, 7, 7, 3), norm="batch", affine=True), (5,), "square"),
        ("mlp_bn_l1", models.mlp((5, 7, 3), norm="batch", bn_p="l1"), (5,), "square"),
        ("mlp_bn_linf", models.mlp((5, 7, 3), norm="batch", bn_p="linf"), (5,), "cross_entropy"),
        ("cnn_bn", models.cnn((2, 6), (3,), 3, norm="batch", stride=2), (2, 6), "square"),
    ],
)
def test_masked_batch_gives_smaller_batch_gradient(name, model, x_shape, loss):
    loss_fn = make_loss_fn(model, loss)
    vg = jax.jit(lambda p, b: loss_and_grad(loss_fn, p, b)[:2])
    params = jax.jit(model.init)(KEY)
    B, b = 12, 7
    x = _x((B,) + x_shape, 20)
    x[b:] = _x((B - b,) + x_shape, 21, scale=30.0)  # padding holds garbage
    y = np.random.default_rng(22).integers(0, 3, B).astype(np.int32)
    full = Batch(x, y, _weights(B, b))
    small = Batch(x[:b], y[:b], _weights(b, b))
    (lf, gf), (ls, gs) = vg(params, full), vg(params, small)
    assert float(lf) == pytest.approx(float(ls), rel=1e-6)
    assert _rel(gf, gs) < 1e-6, name
    # the padding's content cannot matter: zero it and get the same numbers
    x0 = x.copy()
    x0[b:] = 0.0
    _, g0 = vg(params, Batch(x0, y, _weights(B, b)))
    assert _rel(g0, gf) < 1e-6
    # and a different b changes the gradient (the check can fail)
    _, g5 = vg(params, Batch(x, y, _weights(B, b - 2)))
    assert _rel(g5, gf) > 1e-3
