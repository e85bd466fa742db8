"""Tests for dynamics.norms: batch-norm moments over kept examples, masking, Lp scalings,
channel norm, weight norm / Lagrange form, tangent projection, and the scale invariance of
batch-normalized networks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import models, norms

KEY = jax.random.key(0, impl="rbg")


def _x(shape, seed=0, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


_bn = jax.jit(norms.batch_norm, static_argnames=("p", "k"))
_cn = jax.jit(norms.channel_norm)


# --------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(12, 5), (6, 3, 7), (4, 2, 3, 5)])
def test_batch_norm_l2_moments(shape):
    x = _x(shape, 1, loc=3.0, scale=2.0)
    y = np.asarray(_bn(x, None, p="l2", eps=0.0), np.float64)
    # per feature (channel), pooled over the batch and spatial axes
    pooled = np.moveaxis(y, 1, 0).reshape(shape[1], -1)
    np.testing.assert_allclose(pooled.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.var(axis=1), 1.0, rtol=1e-4)


def test_batch_norm_l2_masked_moments():
    x = _x((10, 4), 2, loc=-1.0, scale=3.0)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool)
    x_bad = x.copy()
    x_bad[~mask] = 1e4  # dropped examples carry garbage
    y = np.asarray(_bn(x_bad, mask, p="l2", eps=0.0), np.float64)[mask]
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=0), 1.0, rtol=1e-4)


@pytest.mark.parametrize("p", ["l2", "l1", "linf"])
@pytest.mark.parametrize("shape", [(12, 5), (12, 3, 4)])
def test_batch_norm_mask_equals_smaller_batch(p, shape):
    x = _x(shape, 3)
    keep = 7
    mask = np.arange(shape[0]) < keep
    x_pad = x.copy()
    x_pad[keep:] = _x((shape[0] - keep,) + shape[1:], 4, scale=50.0)
    full = _bn(x_pad, mask, p=p)[:keep]
    small = _bn(x[:keep], None, p=p)
    np.testing.assert_allclose(full, small, rtol=1e-6, atol=1e-6)
    # float weights (as passed by losses) act as the same mask
    w = np.where(mask, 1.0 / keep, 0.0).astype(np.float32)
    np.testing.assert_allclose(_bn(x_pad, w > 0, p=p)[:keep], small, rtol=1e-6, atol=1e-6)


def _np_batch_norm(x, p, k=10, eps=1e-5):
    """Slow float64 reference following the docstring formulas."""
    x = np.asarray(x, np.float64)
    c = x.shape[1]
    pooled = np.moveaxis(x, 1, 0).reshape(c, -1)
    n = pooled.shape[1]
    d = pooled - pooled.mean(axis=1, keepdims=True)
    if p == "l2":
        s = np.sqrt((d**2).mean(axis=1) + eps)
    elif p == "l1":
        s = math.sqrt(math.pi / 2) * np.abs(d).mean(axis=1) + eps
    else:
        top = -np.sort(-np.abs(d), axis=1)[:, :k]
        c_n = (1 + math.sqrt(math.pi * math.log(4))) / (2 * math.sqrt(2 * math.log(n)))
        s = c_n * top.mean(axis=1) + eps
    out = d / s[:, None]
    return np.moveaxis(out.reshape((c, x.shape[0]) + x.shape[2:]), 0, 1)


@pytest.mark.parametrize("p", ["l2", "l1", "linf"])
def test_batch_norm_matches_numpy(p):
    x = _x((9, 3, 5), 5, loc=0.5, scale=2.0)
    np.testing.assert_allclose(_bn(x, None, p=p), _np_batch_norm(x, p), rtol=1e-5, atol=1e-5)


def test_batch_norm_lp_scalings_agree_with_l2_on_gaussians():
    # l1: sqrt(pi/2) E|z| = 1 for z ~ N(0, 1) exactly; large batch -> agreement to ~1%.
    x = _x((4096, 16), 6, scale=3.0)
    sd = lambda y: np.asarray(y, np.float64).std(axis=0).mean()
    assert sd(_bn(x, None, p="l2")) == pytest.approx(1.0, rel=1e-3)
    assert sd(_bn(x, None, p="l1")) == pytest.approx(1.0, rel=0.02)
    # linf (Hoffer et al.'s top-10 constant) agrees within a few percent at n ~ 64-128 pooled
    # values and drifts slowly outside that range (about 0.8 at 4096), as its docstring says.
    for n in (64, 128):
        z = _x((n, 256), n, scale=3.0)
        assert sd(_bn(z, None, p="linf")) == pytest.approx(1.0, rel=0.06)
    assert 0.7 < sd(_bn(x, None, p="linf")) < 0.9


def test_batch_norm_rejects_unknown_kind():
    with pytest.raises(ValueError, match="l2"):
        norms.batch_norm(jnp.ones((2, 2)), p="l3")


# --------------------------------------------------------------------------- channel norm


@pytest.mark.parametrize("shape", [(3, 4, 16), (2, 3, 5, 6)])
def test_channel_norm_moments(shape):
    x = _x(shape, 7, loc=2.0, scale=4.0)
    y = np.asarray(_cn(x, 0.0), np.float64).reshape(shape[0], shape[1], -1)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-4)
    # no statistic mixes examples: each example alone gives the same result
    np.testing.assert_allclose(_cn(x[:1], 0.0), _cn(x, 0.0)[:1], rtol=1e-6, atol=1e-6)


def test_channel_norm_eps_and_bias():
    x = _x((2, 3, 8), 8)
    b = np.array([0.5, -1.0, 2.0], np.float32)
    xd = x.astype(np.float64)
    d = xd - xd.mean(axis=-1, keepdims=True)
    want = d / (np.sqrt((d**2).mean(axis=-1, keepdims=True)) + 0.1) + b[None, :, None]
    np.testing.assert_allclose(norms.channel_norm(x, eps=0.1, bias=b), want, rtol=1e-5)


# --------------------------------------------------------------------------- weight forms


def test_weight_norm_rows():
    v = _x((4, 3, 2), 9)
    g = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    w = np.asarray(norms.weight_norm(v, g), np.float64).reshape(4, -1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), np.abs(g), rtol=1e-6)
    vf = v.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(w, g[:, None] * vf / np.linalg.norm(vf, axis=1)[:, None], rtol=1e-6)
    # invariant to the scale of v
    np.testing.assert_allclose(norms.weight_norm(7.0 * v, g), norms.weight_norm(v, g), rtol=1e-6)


def test_lagrange_weight_and_tangent_project():
    v = _x((3, 5), 10)
    np.testing.assert_allclose(norms.lagrange_weight(v, 2.5), 2.5 * v, rtol=1e-7)
    g = _x((3, 5), 11)  # v is not of unit norm: the projection divides by <v, v>
    p = np.asarray(norms.tangent_project(jnp.asarray(v), jnp.asarray(g)), np.float64)
    vd, gd = v.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(p, gd - np.sum(gd * vd) / np.sum(vd * vd) * vd, rtol=1e-5, atol=1e-6)
    assert abs(np.sum(p * vd)) < 1e-5  # tangent
    p2 = np.asarray(norms.tangent_project(jnp.asarray(v), jnp.asarray(p, np.float32)))
    np.testing.assert_allclose(p2, p, rtol=1e-5, atol=1e-6)  # idempotent


# --------------------------------------------------------------------------- scale invariance


@pytest.mark.parametrize("layer", [0, 1])
def test_batch_normalized_mlp_scale_invariant(layer):
    model = models.mlp((6, 8, 8, 3), norm="batch", bias=True)
    params = jax.jit(model.init)(KEY)
    params[layer]["b"] = jnp.linspace(-1.0, 1.0, 8)  # bias before the norm: scaled together
    x = _x((16, 6), 12)
    apply = jax.jit(model.apply)
    y = apply(params, x)
    scaled = [dict(p) for p in params]
    scaled[layer] = {k: 3.7 * v for k, v in params[layer].items()}
    np.testing.assert_allclose(apply(scaled, x), y, rtol=1e-4, atol=1e-4)
    # the output layer is not followed by a norm: scaling it scales the output
    last = [dict(p) for p in params]
    last[-1] = {k: 3.7 * v for k, v in params[-1].items()}
    np.testing.assert_allclose(apply(last, x), 3.7 * np.asarray(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bn_p", ["l2", "l1"])
def test_batch_normalized_cnn_scale_invariant(bn_p):
    model = models.cnn((2, 6, 6), (4, 5), 3, norm="batch", bn_p=bn_p, stride=2)
    params = jax.jit(model.init)(KEY)
    x = _x((8, 2, 6, 6), 13)
    apply = jax.jit(model.apply)
    y = apply(params, x)
    scaled = models.scale_weights(params, 1.0)
    scaled[0] = {"w": 0.25 * params[0]["w"]}
    scaled[1] = {"w": 5.0 * params[1]["w"]}
    np.testing.assert_allclose(apply(scaled, x), y, rtol=1e-4, atol=1e-4)
    # and a masked batch only pools the kept examples: the kept outputs equal the small batch's
    mask = np.arange(8) < 5
    np.testing.assert_allclose(
        apply(params, x, mask)[:5], apply(params, x[:5]), rtol=1e-5, atol=1e-5
    )
