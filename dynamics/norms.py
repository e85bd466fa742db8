"""Normalizations: Lp batch norm (masked), channel norm, weight norm, Lagrange-multiplier form.

Every function is pure and acts on arrays laid out (batch, channels, *spatial) or
(batch, features). Batch statistics are taken over the examples that `mask` keeps, so a
padded batch gives exactly the statistics of its unpadded part.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BATCH_NORM_KINDS = ("l2", "l1", "linf")


def _masked_moments(x, mask):
    """Per-feature mean over the batch (and spatial axes) of the kept examples."""
    axes = (0,) + tuple(range(2, x.ndim))
    if mask is None:
        m = jnp.ones((x.shape[0],), x.dtype)
    else:
        m = mask.astype(x.dtype)
    m = m.reshape((-1,) + (1,) * (x.ndim - 1))
    spatial = math.prod(x.shape[2:]) if x.ndim > 2 else 1
    count = jnp.sum(m) * spatial
    mu = jnp.sum(x * m, axis=axes, keepdims=True) / count
    return mu, m, count, axes


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

    x: (batch, features) or (batch, channels, *spatial). Returns an array of x's shape.
    """
    if p not in BATCH_NORM_KINDS:
        raise ValueError(f"batch_norm p must be one of {BATCH_NORM_KINDS}, got {p!r}")
    mu, m, count, axes = _masked_moments(x, mask)
    d = x - mu
    if p == "l2":
        scale = jnp.sqrt(jnp.sum(m * d**2, axis=axes, keepdims=True) / count + eps)
        return d / scale
    if p == "l1":
        scale = math.sqrt(math.pi / 2) * jnp.sum(m * jnp.abs(d), axis=axes, keepdims=True) / count
        return d / (scale + eps)
    # linf / top-k: pool every value of a feature into one axis, zero the dropped examples
    # (their |d| >= 0 can only fall below the kept ones' when they are zero), take the top k.
    a = jnp.abs(d) * m
    c = x.shape[1]
    pooled = jnp.moveaxis(a, 1, -1).reshape(-1, c).T  # (features, batch*spatial)
    kk = min(k, pooled.shape[1])
    top = jax.lax.top_k(pooled, kk)[0]
    n_top = jnp.minimum(kk, count)
    mean_top = jnp.sum(top, axis=1) / n_top
    c_n = (1 + math.sqrt(math.pi * math.log(4))) / (
        2 * jnp.sqrt(2 * jnp.log(jnp.maximum(count, 2.0)))
    )
    scale = (c_n * mean_top).reshape((1, c) + (1,) * (x.ndim - 2))
    return d / (scale + eps)


def channel_norm(x, eps: float = 1e-5, bias=None):
    """Channel normalization of each example (Dai & Heckel, 2019).

    Each channel of each example is centred and divided by its standard deviation over
    space plus eps:  x_hat[b, c] = (x[b, c] - mean_s x[b, c]) / (std_s x[b, c] + eps) (+ bias[c]).
    x: (batch, channels, *spatial). No statistic mixes examples, so no mask is needed.
    """
    axes = tuple(range(2, x.ndim))
    mu = jnp.mean(x, axis=axes, keepdims=True)
    d = x - mu
    sd = jnp.sqrt(jnp.mean(d**2, axis=axes, keepdims=True))
    out = d / (sd + eps)
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
