"""Uniform stacks of layers run as one `lax.scan` (scan=True, the factories' default) or
unrolled (scan=False): the same function of the same params. Checked for every factory that
scans, in train and eval mode: outputs, penultimate features, gradients (the scan's transpose
hands each layer its own gradient, in the caller's layer order) and batch-norm running
statistics, to float32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import models

RTOL, ATOL = 2e-5, 2e-6

CASES = {
    "mlp_relu": (lambda scan: dyn.mlp((6, 8, 8, 8, 8, 3), scan=scan), (5, 6)),
    "mlp_bias_tanh": (
        lambda scan: dyn.mlp((6, 8, 8, 8, 3), activation="tanh", bias=True, scan=scan),
        (5, 6),
    ),
    "mlp_batchnorm": (
        lambda scan: dyn.mlp((6, 8, 8, 8, 8, 3), norm="batch", affine=True, scan=scan),
        (7, 6),
    ),
    "linear_conv1d_channel_norm": (
        lambda scan: dyn.linear_conv1d(6, kernel=3, channels=2, norm="channel", scan=scan),
        (3, 2, 16),
    ),
    "deep_decoder": (
        lambda scan: dyn.deep_decoder(4, 4, kernel=1, dim=1, upsample=1, scan=scan),
        (2, 4, 16),
    ),
    "cnn_batchnorm": (
        lambda scan: dyn.cnn((6, 6, 2), (4, 4, 4), 3, norm="batch", scan=scan),
        (4, 6, 6, 2),
    ),
}


def _close(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_and_unrolled_agree(name):
    factory, shape = CASES[name]
    scanned, unrolled = factory(True), factory(False)
    key = jax.random.PRNGKey(3)
    params = scanned.init(key)
    # the same params structure whichever way the layers run
    assert jax.tree.structure(params) == jax.tree.structure(unrolled.init(key))
    _close(params, unrolled.init(key), f"{name}: init")
    x = jax.random.normal(jax.random.PRNGKey(4), shape)
    state = models.init_state(scanned, key)

    for train in (True, False):
        fa = models.forward(scanned, params, state, x, train=train)
        fb = models.forward(unrolled, params, state, x, train=train)
        _close(fa.y, fb.y, f"{name}: output (train={train})")
        if fa.h is not None:
            _close(fa.h, fb.h, f"{name}: features (train={train})")
        _close(fa.state, fb.state, f"{name}: state (train={train})")

    def loss(model, p):
        y = models.forward(model, p, state, x, train=True).y
        return jnp.sum(jnp.sin(y))

    ga = jax.grad(lambda p: loss(scanned, p))(params)
    gb = jax.grad(lambda p: loss(unrolled, p))(params)
    _close(ga, gb, f"{name}: gradient")
    # every layer's gradient is its own (not a permutation or a copy of another layer's)
    norms = [float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))) for g in ga]
    assert len(set(np.round(norms, 6))) == len(norms), norms


def test_batchnorm_state_moves_under_scan():
    """Train mode updates each scanned layer's own running statistics (they differ by layer)."""
    model = dyn.mlp((6, 8, 8, 8, 8, 3), norm="batch", scan=True)
    key = jax.random.PRNGKey(0)
    params, state = model.init(key), models.init_state(model, key)
    x = 3.0 + jax.random.normal(key, (9, 6))
    new = models.forward(model, params, state, x, train=True).state
    moved = [
        float(jnp.sum(jnp.abs(jnp.concatenate([(a - b).ravel() for a, b in pairs]))))
        for pairs in (
            list(zip(jax.tree.leaves(n), jax.tree.leaves(s), strict=True))
            for n, s in zip(new, state, strict=True)
        )
        if pairs
    ]
    assert len(moved) >= 3 and all(m > 0 for m in moved), moved
    assert len(set(np.round(moved, 5))) == len(moved), moved


def test_scan_program_does_not_grow_with_depth():
    """The traced program of a scanned stack holds one copy of the layer: its jaxpr has the same
    number of equations at depth 4 and 40 (the unrolled one grows)."""

    def size(depth, scan):
        m = dyn.mlp((6,) + (8,) * depth + (3,), scan=scan)
        p = m.init(jax.random.PRNGKey(0))
        x = jnp.ones((2, 6))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply(p, x))))(p)
        return len(jaxpr.eqns)

    assert size(4, True) == size(40, True)
    assert size(40, False) > 5 * size(4, False) // 2
