"""Losses over a weighted batch: `loss(pred, target, weights=None) -> scalar`.

`weights` (batch,) sum to one over the examples a batch keeps and are zero on padding, so a
padded batch of true size b gives exactly the mean over its b examples. None means a plain
mean. Integer targets are class labels; float targets are regression targets (or +-1 labels of
a single-output binary classifier).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _weighted_mean(per_example, weights):
    if weights is None:
        return jnp.mean(per_example)
    # where, not a product: a padded example's value never reaches the sum.
    return jnp.sum(jnp.where(weights > 0, per_example * weights, 0.0))


def _targets_like(pred, target):
    if jnp.issubdtype(target.dtype, jnp.integer):
        return jax.nn.one_hot(target, pred.shape[-1], dtype=pred.dtype)
    return target.reshape(pred.shape).astype(pred.dtype)


def square_loss(pred, target, weights=None):
    """L = sum_i w_i mean_j (f(x_i)_j - y_ij)^2, the mean over every output entry j of example i.

    Integer targets are one-hot encoded (the square loss on one-hot labels of Han et al. 2022).
    pred: (batch, ...), target: (batch,) labels or pred's shape.
    """
    y = _targets_like(pred, target)
    d = (pred - y).reshape(pred.shape[0], -1)
    return _weighted_mean(jnp.mean(d**2, axis=1), weights)


def cross_entropy(pred, target, weights=None):
    """L = sum_i w_i (-log softmax(f(x_i))_{y_i}); target: (batch,) labels or (batch, C) probabilities."""
    logp = jax.nn.log_softmax(pred.reshape(pred.shape[0], -1), axis=-1)
    y = _targets_like(logp, target)
    return _weighted_mean(-jnp.sum(y * logp, axis=-1), weights)


def measurement_loss(A) -> Callable:
    """Compressive-sensing loss for measurements y = A x: L = sum_i w_i ||A vec(f(x_i)) - y_i||^2 / m.

    A: (m, n) with n the size of one output; returns `loss(pred, target, weights=None)` with
    target (batch, m).
    """
    A = jnp.asarray(A)

    def loss(pred, target, weights=None):
        z = pred.reshape(pred.shape[0], -1) @ A.T
        return _weighted_mean(jnp.mean((z - target) ** 2, axis=1), weights)

    return loss


def accuracy(pred, target, weights=None):
    """Fraction of correct predictions: argmax for several outputs, sign for one (+-1 targets).

    Regression targets (float, several outputs) have no accuracy: NaN.
    """
    flat = pred.reshape(pred.shape[0], -1)
    if flat.shape[1] == 1:
        correct = jnp.sign(flat[:, 0]) == jnp.sign(target.reshape(-1))
    elif jnp.issubdtype(target.dtype, jnp.integer):
        correct = jnp.argmax(flat, axis=1) == target
    else:
        return jnp.full((), jnp.nan, pred.dtype)
    return _weighted_mean(correct.astype(pred.dtype), weights)


LOSSES: dict[str, Callable] = {"square": square_loss, "cross_entropy": cross_entropy}


def resolve(loss: str | Callable) -> Callable:
    """A loss by name (`LOSSES`) or as given; an unknown name raises ValueError listing them."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            import difflib

            hint = difflib.get_close_matches(loss, list(LOSSES), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"loss: unknown loss {loss!r}{extra}; known: {', '.join(LOSSES)}, or a callable "
                "loss(pred, target, weights)"
            )
        return LOSSES[loss]
    if not callable(loss):
        raise ValueError(f"loss: expected a name in {tuple(LOSSES)} or a callable, got {loss!r}")
    return loss
