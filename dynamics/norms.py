"""Normalizations: Lp batch norm (masked), channel norm, weight norm, Lagrange-multiplier form.

Every function is pure and acts on arrays laid out (batch, channels, *spatial) or
(batch, features). Batch statistics are taken over the examples that `mask` keeps, so a
padded batch gives exactly the statistics of its unpadded part.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

BATCH_NORM_KINDS = ("l2", "l1", "linf")


_HALF = (jnp.float16, jnp.bfloat16)


def _accumulator(dtype):
    """The dtype batch statistics are summed in: float32 for half-precision inputs (as PyTorch
    reduces a half tensor, accumulating in float and rounding the mean back to half), None
    (the input's own) otherwise."""
    return jnp.float32 if dtype in _HALF else None


def _masked_moments(x, mask):
    """Per-feature mean over the batch (and spatial axes) of the kept examples. Half-precision
    inputs are summed in float32 and the mean rounded back to x's dtype, so a batch's sum may
    exceed the half range (65504 in float16) while its mean does not; count is float32 then."""
    axes = (0,) + tuple(range(2, x.ndim))
    acc = _accumulator(x.dtype)
    if mask is None:
        m = jnp.ones((x.shape[0],), x.dtype)
    else:
        m = mask.astype(x.dtype)
    m = m.reshape((-1,) + (1,) * (x.ndim - 1))
    spatial = math.prod(x.shape[2:]) if x.ndim > 2 else 1
    count = jnp.sum(m, dtype=acc) * spatial
    mu = jnp.sum(x * m, axis=axes, keepdims=True, dtype=acc) / count
    if acc is not None:
        mu = mu.astype(x.dtype)
    return mu, m, count, axes


def _mean_over(v, m, axes, count, dtype):
    """sum(m v) / count over `axes` (keepdims), accumulated as `_masked_moments` does and
    rounded to dtype."""
    acc = _accumulator(dtype)
    out = jnp.sum(m * v, axis=axes, keepdims=True, dtype=acc) / count
    return out if acc is None else out.astype(dtype)


class BatchStats(NamedTuple):
    """Per-feature statistics of one batch-norm call: the mean mu and the divisor's statistic
    (l2: the unbiased variance of the kept values, as PyTorch's running_var tracks it; l1 /
    linf: the divisor itself, sqrt(pi/2) mean|d| or c_n mean(top_k |d|))."""

    mean: jax.Array
    spread: jax.Array


def batch_norm(x, mask=None, p: str = "l2", k: int = 10, eps: float = 1e-5):
    """Lp batch normalization over the kept examples of a batch (Hoffer et al., 2018).

    With mu the batch mean of each feature (or channel, pooled over space) and
    d = x - mu:
      l2:   x_hat = d / sqrt(mean(d^2) + eps)
      l1:   x_hat = d / (sqrt(pi/2) * mean|d| + eps)
      linf: x_hat = d / (c_n * mean(top_k |d|) + eps),
            c_n = (1 + sqrt(pi ln 4)) / (2 sqrt(2 ln n)), n the number of pooled values.
    Means run over the examples with mask True only (mask: (batch,) bool or weights; None keeps
    all). The scaling constants make each form agree with l2 on Gaussian inputs: l1 exactly
    in expectation; linf (Hoffer et al.'s constant for top-10) only roughly, the output's
    standard deviation drifting from about 1.1 at n = 32 to 0.8 at n = 4096 pooled values.

    Forms as in Hoffer et al.'s code (eladhoffer/norm_matters models/lp_norm.py and
    convNet.pytorch models/modules/lp_norm.py): eps inside the root for l2, outside (after the
    constant) for l1 and linf; n = N*H*W; k = 10 (convNet.pytorch's TopkBatchNorm2d; 1 in
    norm_matters' copy). In half precision (float16, bfloat16 inputs) everything is computed
    in x's dtype except the batch sums, accumulated in float32 and rounded back (PyTorch's
    reduction of a half tensor): so l2 overflows in float16 where some |x - mu| > 256
    (its square exceeds 65504; the variance becomes inf and the output 0), l1 only where
    mean |x - mu| would exceed 65504, linf only where |x - mu| itself would.

    x: (batch, features) or (batch, channels, *spatial). Returns an array of x's shape.
    """
    return batch_norm_train(x, mask, p, k, eps)[0]


def batch_norm_train(x, mask=None, p: str = "l2", k: int = 10, eps: float = 1e-5):
    """`batch_norm` in train mode, also returning the batch's `BatchStats` (each (features,)),
    from which `update_running` forms the running statistics that eval mode uses."""
    if p not in BATCH_NORM_KINDS:
        raise ValueError(f"batch_norm p must be one of {BATCH_NORM_KINDS}, got {p!r}")
    mu, m, count, axes = _masked_moments(x, mask)
    d = x - mu
    if p == "l2":
        var = _mean_over(d**2, m, axes, count, x.dtype)
        unbiased = var * count / jnp.maximum(count - 1, 1)
        if _accumulator(x.dtype) is not None:
            unbiased = unbiased.astype(x.dtype)
        return d / jnp.sqrt(var + eps), BatchStats(mu.reshape(-1), unbiased.reshape(-1))
    if p == "l1":
        acc = _accumulator(x.dtype)
        s = jnp.sum(m * jnp.abs(d), axis=axes, keepdims=True, dtype=acc)
        scale = math.sqrt(math.pi / 2) * s / count
        if acc is not None:
            scale = scale.astype(x.dtype)
        return d / (scale + eps), BatchStats(mu.reshape(-1), scale.reshape(-1))
    # linf / top-k: pool every value of a feature into one axis, zero the dropped examples
    # (their |d| >= 0 can only fall below the kept ones' when they are zero), take the top k.
    a = jnp.abs(d) * m
    c = x.shape[1]
    pooled = jnp.moveaxis(a, 1, -1).reshape(-1, c).T  # (features, batch*spatial)
    kk = min(k, pooled.shape[1])
    top = jax.lax.top_k(pooled, kk)[0]
    n_top = jnp.minimum(kk, count)
    acc = _accumulator(x.dtype)
    mean_top = jnp.sum(top, axis=1, dtype=acc) / n_top
    c_n = (1 + math.sqrt(math.pi * math.log(4))) / (
        2 * jnp.sqrt(2 * jnp.log(jnp.maximum(count, 2.0)))
    )
    scale = (c_n * mean_top).reshape((1, c) + (1,) * (x.ndim - 2))
    if acc is not None:
        scale = scale.astype(x.dtype)
    return d / (scale + eps), BatchStats(mu.reshape(-1), scale.reshape(-1))


def batch_norm_eval(x, running: BatchStats, p: str = "l2", eps: float = 1e-5):
    """Batch norm in eval mode: the running statistics in place of the batch's, as PyTorch's
    `model.eval()`: l2 x_hat = (x - mean) / sqrt(var + eps); l1 / linf (x - mean) / (scale + eps)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    d = x - running.mean.reshape(shape)
    if p == "l2":
        return d / jnp.sqrt(running.spread.reshape(shape) + eps)
    return d / (running.spread.reshape(shape) + eps)


def init_running(features: int) -> BatchStats:
    """PyTorch's initial running statistics: mean 0, variance (or scale) 1."""
    return BatchStats(jnp.zeros((features,)), jnp.ones((features,)))


def update_running(running: BatchStats, batch: BatchStats, momentum) -> BatchStats:
    """Exponential running averages as PyTorch's BatchNorm updates them in train mode:
    r <- (1 - momentum) r + momentum s, with s the batch's mean and unbiased variance (or
    scale). momentum 0.1 is PyTorch's default."""
    return BatchStats(
        (1 - momentum) * running.mean + momentum * jax.lax.stop_gradient(batch.mean),
        (1 - momentum) * running.spread + momentum * jax.lax.stop_gradient(batch.spread),
    )


CHANNEL_NORM_FORMS = ("std", "var", "var_unbiased")


def channel_norm(x, eps: float = 1e-5, bias=None, form: str = "std"):
    """Channel normalization of each example (Dai & Heckel, 2019).

    Each channel of each example is centred and divided by its spread over space, then shifted
    by an optional per-channel bias. With d = x[b, c] - mean_s x[b, c] and n spatial positions:
      form="std":          x_hat = d / (sqrt(mean_s d^2) + eps)
      form="var":          x_hat = d / sqrt(mean_s d^2 + eps)          (PyTorch's BatchNorm on one
                                                                         example: P5's decoders)
      form="var_unbiased": x_hat = d / sqrt(sum_s d^2 / (n - 1) + eps)  (the P4 authors' channel
                                                                         norm, MLI-lab/channel_normalization)
    (+ bias[c]). With eps inside the square root a nearly constant channel is amplified by at
    most 1/sqrt(eps); with eps outside by up to 1/eps. x: (batch, channels, *spatial). No
    statistic mixes examples, so no mask is needed.
    """
    if form not in CHANNEL_NORM_FORMS:
        raise ValueError(f"channel_norm form must be one of {CHANNEL_NORM_FORMS}, got {form!r}")
    axes = tuple(range(2, x.ndim))
    mu = jnp.mean(x, axis=axes, keepdims=True)
    d = x - mu
    if form == "std":
        sd = jnp.sqrt(jnp.mean(d**2, axis=axes, keepdims=True))
        out = d / (sd + eps)
    elif form == "var":
        out = d / jnp.sqrt(jnp.mean(d**2, axis=axes, keepdims=True) + eps)
    else:
        n = math.prod(x.shape[2:])
        out = d / jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True) / max(n - 1, 1) + eps)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * (x.ndim - 2))
    return out


def weight_norm(v, g):
    """Weight normalization (Salimans & Kingma, 2016): W[i] = g[i] * v[i] / ||v[i]||.

    v: (out, ...) direction, g: (out,) gain per output unit.
    """
    flat = v.reshape(v.shape[0], -1)
    norms = jnp.sqrt(jnp.sum(flat**2, axis=1))
    return (g / norms).reshape((-1,) + (1,) * (v.ndim - 1)) * v


def lagrange_weight(v, rho):
    """Lagrange-multiplier normalization: W = rho * V with ||V||_F = 1 kept by the dynamics.

    The step functions keep the constraint (see `steps.normalized_gd`); this only composes.
    """
    return rho * v


def tangent_project(v, g):
    """Project g onto the tangent space of the sphere at v: g - <g, v> v / ||v||^2."""
    return g - jnp.vdot(g, v) / jnp.vdot(v, v) * v
