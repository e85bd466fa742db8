"""Decision regions and the small geometric tasks of the width reproductions: the unit ball
against a surrounding ring (Lin & Jegelka 2018, P8) and the XOR of balls lifted to d dimensions
(Li & Liang 2018, P11), the model's decision values on fixed inputs (a 2-D grid, far circles)
as observables, the logistic loss of +-1 labels, and the one-neuron ResNet with a biased linear
readout.

Data builders return `dynamics.data.Dataset`s and follow dynamics/data.py's rules: a pure
function of their arguments and an integer seed, float32 inputs, labels +-1 float32 for the
binary ball task (one output, `num_classes == 2`) and int32 class labels for the XOR task.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import models as _models
from dynamics.data import DataError, Dataset
from dynamics.recording import Observable

__all__ = [
    "ball_ring",
    "circle_points",
    "decision_values",
    "grid_points",
    "live_init",
    "logistic_loss",
    "one_neuron_resnet",
    "positive_fraction",
    "xor_balls",
]


# --------------------------------------------------------------------------- sampling


def _uniform_shell(rng: np.random.Generator, n: int, d: int, r_in: float, r_out: float):
    """n points uniform in {r_in <= ||x|| <= r_out} of R^d: a uniform direction and radius
    r = (r_in^d + U (r_out^d - r_in^d))^(1/d), U ~ U(0, 1) (the volume element r^(d-1) dr)."""
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = (r_in**d + rng.uniform(size=(n, 1)) * (r_out**d - r_in**d)) ** (1.0 / d)
    return u * r


def _streams(seed, n: int) -> list[np.random.Generator]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def ball_ring(
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 2000,
    d: int = 2,
    radius: float = 1.0,
    ring: tuple[float, float] = (1.5, 2.5),
) -> Dataset:
    """The unit ball against a surrounding ring (Lin & Jegelka 2018, section 3's illustration):
    label +1 for x uniform in {||x|| <= radius}, -1 for x uniform in the ring
    {ring[0] <= ||x|| <= ring[1]}, half of each split per class (+1 first for odd n) in a
    seeded random order. Shapes: x (n, d) float32, y (n,) float32 of +-1, num_classes = 2 (one
    output, sign decision). A classifier of it with a bounded positive region exists; a ReLU
    network of width <= d has only unbounded level-set components (Lu et al. 2017, Hanin &
    Sellke 2017), so it must predict +1 somewhere far away or misclassify part of the ring."""
    n_train = _count("n_train", n_train, 2)
    n_test = _count("n_test", n_test, 0)
    d = _count("d", d, 1)
    r_in, r_out = (float(v) for v in ring)
    if not 0 < radius < r_in < r_out:
        raise DataError(
            f"ring: need 0 < radius < ring[0] < ring[1], got radius={radius}, ring={ring}"
        )
    rng_pos, rng_neg, rng_order = _streams(seed, 3)

    def split(n):
        n_pos = (n + 1) // 2
        x = np.concatenate(
            [
                _uniform_shell(rng_pos, n_pos, d, 0.0, radius),
                _uniform_shell(rng_neg, n - n_pos, d, r_in, r_out),
            ]
        )
        y = np.concatenate([np.ones(n_pos), -np.ones(n - n_pos)])
        order = rng_order.permutation(n)
        return x[order].astype(np.float32), y[order].astype(np.float32)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset(x_train, y_train, x_test, y_test, 2, "ball_ring")


XOR_CENTERS = (((-1.0, -1.0), (1.0, 1.0)), ((-1.0, 1.0), (1.0, -1.0)))


def xor_balls(
    seed: int = 0,
    n_train: int = 1000,
    n_test: int = 1000,
    d: int = 20,
    radius: float = 0.5,
    scale: float = 1.0,
) -> Dataset:
    """The XOR of balls (Li & Liang 2018's illustration) lifted to R^d by a random embedding.

    Four centres in the plane, scale * (+-1, +-1): class 0 at (-1, -1) and (1, 1), class 1 at
    (-1, 1) and (1, -1) (Li & Liang's (0,0),(2,2) vs (0,2),(2,0) shifted by (-1, -1), so that a
    network without biases, whose sign is constant along rays, can separate them). Each
    centre c is embedded as Q c with Q (d, 2) a seeded random matrix of orthonormal columns, and
    an example is Q c + u with u uniform in the d-dimensional ball of `radius` (so the data
    spans R^d and the rank of a weight update is not capped at 2). The four balls get equal
    shares of each split (a multiple of 4 apart from the first n mod 4), in a seeded random
    order. Shapes: x (n, d) float32, y (n,) int32 in {0, 1}."""
    n_train = _count("n_train", n_train, 4)
    n_test = _count("n_test", n_test, 0)
    d = _count("d", d, 2)
    if not radius > 0 or not scale > 0:
        raise DataError(f"radius and scale must be positive, got radius={radius}, scale={scale}")
    if radius >= scale:
        raise DataError(f"radius: {radius} >= scale {scale} lets the balls of the classes overlap")
    rng_q, rng_x, rng_order = _streams(seed, 3)
    q, _ = np.linalg.qr(rng_q.standard_normal((d, 2)))
    centers = np.asarray([c for cls in XOR_CENTERS for c in cls]) * scale  # (4, 2)
    labels = np.asarray([0, 0, 1, 1])

    def split(n):
        ball = np.arange(n) % 4
        x = centers[ball] @ q.T + _uniform_shell(rng_x, n, d, 0.0, radius)
        order = rng_order.permutation(n)
        return x[order].astype(np.float32), labels[ball][order].astype(np.int32)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset(x_train, y_train, x_test, y_test, 2, f"xor_balls{d}")


# --------------------------------------------------------------------------- fixed inputs


def grid_points(lim: float = 3.0, n: int = 61) -> np.ndarray:
    """The n x n grid of [-lim, lim]^2 as (n * n, 2) float32, x varying fastest (row i, column
    j is point i * n + j at (x_j, y_i)): reshape decision values to (n, n) for an image."""
    if n < 2 or not lim > 0:
        raise ValueError(f"grid: need n >= 2 and lim > 0, got n={n}, lim={lim}")
    t = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(t, t)
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)


def circle_points(radius: float, n: int = 720) -> np.ndarray:
    """n points evenly spaced on the circle of `radius` in the plane, (n, 2) float32."""
    if n < 1 or not radius > 0:
        raise ValueError(f"circle: need n >= 1 and radius > 0, got n={n}, radius={radius}")
    a = 2 * math.pi * np.arange(n) / n
    return (radius * np.stack([np.cos(a), np.sin(a)], axis=1)).astype(np.float32)


def _points(points) -> np.ndarray:
    x = np.asarray(points, np.float32)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"points: expected inputs of shape (n, ...), got {x.shape}")
    return x


def _decision(y, output):
    y = y.reshape(y.shape[0], -1)
    if output is None:  # several outputs: the margin of output 1 over output 0
        return y[:, -1] - y[:, 0] if y.shape[1] > 1 else y[:, 0]
    return y[:, output]


def decision_values(points, *, name: str = "decision", output: int | None = None, costly=True):
    """Observable: the model's decision value f(x) at fixed inputs `points` (n, ...) (in eval
    mode): the single output, or output `output`, or for two outputs and output=None the
    margin f_1 - f_0. dims (name + "_point",), the points' order (for `grid_points`, reshape to
    (n, n)). costly: recorded every `slow_every` records only (a grid is many values)."""
    x = _points(points)

    def fn(ctx):
        y, _ = ctx.predict(jnp.asarray(x))
        return _decision(y, output)

    return Observable(
        name,
        fn,
        dims=(f"{name}_point",),
        costly=costly,
        doc=f"decision value at {x.shape[0]} fixed inputs",
    )


def positive_fraction(points, *, name: str = "positive_frac", output: int | None = None):
    """Observable: the fraction of fixed inputs `points` where the decision value (as in
    `decision_values`) is > 0. On a circle far outside the data, 0 means the positive region
    does not reach it. Scalar."""
    x = _points(points)

    def fn(ctx):
        y, _ = ctx.predict(jnp.asarray(x))
        return jnp.mean((_decision(y, output) > 0).astype(jnp.float32))

    return Observable(name, fn, doc=f"fraction of {x.shape[0]} fixed inputs with f > 0")


# --------------------------------------------------------------------------- loss and model


def logistic_loss(pred, target, weights=None):
    """L = sum_i w_i log(1 + exp(-y_i f(x_i))) for +-1 labels y and one output f (PyTorch's
    BCEWithLogitsLoss on (y + 1)/2); weights as in `dynamics.losses` (None: the mean).
    pred: (batch, 1) or (batch,), target: (batch,) of +-1."""
    f = pred.reshape(pred.shape[0])
    y = target.reshape(pred.shape[0]).astype(f.dtype)
    per = jax.nn.softplus(-y * f)
    if weights is None:
        return jnp.mean(per)
    return jnp.sum(jnp.where(weights > 0, per * weights, 0.0))


def one_neuron_resnet(
    d_in: int,
    depth: int,
    d_out: int,
    *,
    readout_bias: bool = True,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
) -> _models.Model:
    """Lin & Jegelka's ResNet with one-neuron hidden layers and a linear readout:

        x_k = x_{k-1} + V_k relu(U_k x_{k-1} + b_k)  (k = 1..depth; U_k (1, d), V_k (d, 1)),
        y = W x_depth + c,

    `dyn.resnet_one_neuron`'s blocks with a readout bias c (PyTorch's nn.Linear has one; the
    library's model has none), initialized at 0. Layer dicts as there ("w" = U_k, "b" = b_k,
    "w2" = V_k; the readout {"w": W, "b": c}); readout_bias=False is `dyn.resnet_one_neuron`."""
    if depth < 1 or d_in < 1 or d_out < 1:
        raise ValueError(
            f"one_neuron_resnet: need depth, d_in, d_out >= 1, got {depth}, {d_in}, {d_out}"
        )
    base = _models.resnet_one_neuron(d_in, depth, d_out, init=init, gain=gain, scale=scale)
    if not readout_bias:
        return base

    def init_fn(key):
        params = base.init(key)
        params[-1] = {**params[-1], "b": jnp.zeros((d_out,))}
        return params

    def apply_features(params, x, mask=None):
        y, h = base.apply_features(params, x, mask)  # y = h W^T (the base reads no "b")
        return y + params[-1]["b"][None, :], h

    return _models.Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


def live_init(model: _models.Model, x, *, tries: int = 64, tol: float = 1e-3) -> _models.Model:
    """`model` whose init rejects initializations that are dead on the inputs x (n, ...): keys
    fold_in(key, 0), fold_in(key, 1), ... are tried in turn and the first whose output varies
    over x (some output's standard deviation over x above tol) is kept (after `tries` dead
    ones, the last is returned: the run is then marked dead). Narrow deep ReLU networks are dead at initialization more often than not
    (a layer whose units are all off on every input); this conditions the comparison of
    widths on networks that compute something. jit- and vmap-safe (a `lax.while_loop`)."""
    x = jnp.asarray(np.asarray(x, np.float32))
    if tries < 1:
        raise ValueError(f"tries: must be at least 1, got {tries}")
    if not tol >= 0:
        raise ValueError(f"tol: must be >= 0, got {tol}")

    def alive(params):
        y = model.apply(params, x)
        return jnp.max(jnp.std(y.reshape(y.shape[0], -1), axis=0)) > tol

    def init_fn(key):
        def cond(c):
            i, params = c
            return (i < tries) & ~alive(params)

        def body(c):
            i, _ = c
            return i + 1, model.init(jax.random.fold_in(key, i))

        first = model.init(jax.random.fold_in(key, 0))
        return jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), first))[1]

    return model._replace(init=init_fn)
