"""Deep linear networks of Hu, Xiao & Pennington (ICLR 2020, arXiv 2001.05992): orthogonal vs
Gaussian initialization, their parameterization, data and linear-rate bound.

`hu_linear(d_x, width, depth, d_y, init=...)`: the network
    f(x) = W_L W_{L-1} ... W_1 x / sqrt(m^{L-1} d_y),
W_1 (m, d_x), W_k (m, m) for 1 < k < L, W_L (d_y, m); every entry N(0, 1) (init="gaussian") or
the orthogonal init of the paper, W_1^T W_1 = m I_{d_x}, W_k^T W_k = m I_m, W_L W_L^T = m I_{d_y}
(init="orthogonal"). `hu_data(d_x, n, d_y)`: their synthetic task X (d_x, n), Y = W* X with
Gaussian entries. `hu_loss`: their loss (1/2) ||f(X) - Y||_F^2 (a sum, not a mean). `hu_lr`,
`hu_rate_bound`: the step size d_y / (2 L ||X||^2) of their theorem and its rate
loss_t <= (1 - lr L sigma_min(X)^2 / (4 d_y))^t loss_0, for that loss. `LrFactor`: a constant
learning-rate factor, so that a sweep's traced lr can be given in units of `hu_lr`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dynamics import models as _models
from dynamics import stacks as _stacks
from dynamics.data import Dataset
from dynamics.models import Dense, Model
from dynamics.schedules import Schedule

__all__ = [
    "HU_INITS",
    "LrFactor",
    "hu_data",
    "hu_linear",
    "hu_loss",
    "hu_lr",
    "hu_rate",
    "hu_rate_bound",
    "semi_orthogonal",
]

HU_INITS = ("orthogonal", "gaussian")


def _haar_columns(key, n: int, k: int) -> jax.Array:
    """A Haar-random (n, k) matrix with orthonormal columns (n >= k): the Q of the QR of an
    i.i.d. N(0, 1) matrix with R's diagonal positive, by Gram-Schmidt with reorthogonalization
    (each column projected out twice), float32. Pure jnp (matmuls in a `lax.fori_loop`), no LAPACK
    call: `jax.nn.initializers.orthogonal`'s QR inside a program sharded over several simulated
    CPU devices hung the runner (seen from 64 x 64 up, never returning, at 4% CPU). The models'
    `init="orthogonal"` keeps jax's QR and draws it one key at a time there instead
    (`dynamics.models._orthogonal`); this sampler predates that fix and draws the P9 stores."""
    g = jax.random.normal(key, (n, k), jnp.float32)

    def column(j, q):
        v = lax.dynamic_index_in_dim(g, j, axis=1, keepdims=False)
        for _ in range(2):  # the columns not yet filled are zero and project out nothing
            v = v - q @ (q.T @ v)
        return lax.dynamic_update_index_in_dim(q, v / jnp.linalg.norm(v), j, axis=1)

    return lax.fori_loop(0, k, column, jnp.zeros((n, k), jnp.float32))


def semi_orthogonal(key, shape) -> jax.Array:
    """sqrt(max(out, in)) Q for a Haar-random Q (out, in) with orthonormal columns (out >= in) or
    rows (out < in): W^T W = out I_in, or W W^T = in I_out. Every entry then has variance 1, as
    under the Gaussian N(0, 1) init. For Hu et al.'s layers this is their orthogonal init:
    W_1^T W_1 = m I (m >= d_x), W_k^T W_k = m I, W_L W_L^T = m I. For a first layer narrower than
    its input (m < d_x, outside the paper's assumption m >= d_x) it gives W_1 W_1^T = d_x I_m."""
    if len(shape) != 2 or min(int(shape[0]), int(shape[1])) < 1:
        raise ValueError(f"shape must be (out, in) with positive sizes, got {tuple(shape)}")
    out, fan_in = int(shape[0]), int(shape[1])
    if out >= fan_in:
        q = _haar_columns(key, out, fan_in)
    else:
        q = _haar_columns(key, fan_in, out).T
    return math.sqrt(max(out, fan_in)) * q


def hu_linear(d_x: int, width: int, depth: int, d_y: int, *, init: str = "orthogonal") -> Model:
    """Hu, Xiao & Pennington's deep linear network as a `Model` (their section 3):

        f(x) = W_L ... W_1 x / sqrt(m^{L-1} d_y),  m = width, L = depth (weight layers),

    params = [{"w": W_1} (m, d_x), {"w": W_k} (m, m) ..., {"w": W_L} (d_y, m)] (depth 1: one
    (d_y, d_x) matrix and f = W_1 x / sqrt(d_y)). init="gaussian": every entry N(0, 1);
    "orthogonal": `semi_orthogonal` per layer (W^T W = m I; see there for m < d_x).

    The scale 1/sqrt(m^{L-1} d_y) is applied as 1/sqrt(m) after each of the first L - 1 layers
    and 1/sqrt(d_y) at the output: the same function of the same weights, hence the same
    gradients, but no intermediate grows like m^{(L-1)/2} (which overflows float32 at depth 128).
    The middle layers run as a `lax.scan` over their stacked weights and are drawn as one vmapped
    init (the forward program does not grow with depth; a training run's still does, by its
    per-leaf updates), and `Model.dense` describes the network (the compiled CPU gradient does
    not take `hu_loss`, so autodiff computes it).
    """
    if init not in HU_INITS:
        raise ValueError(f"init must be one of {HU_INITS}, got {init!r}")
    d_x, width, depth, d_y = int(d_x), int(width), int(depth), int(d_y)
    if min(d_x, width, d_y) < 1:
        raise ValueError(f"d_x, width and d_y must be positive, got {d_x}, {width}, {d_y}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if depth == 1:
        shapes = [(d_y, d_x)]
    else:
        shapes = [(width, d_x)] + [(width, width)] * (depth - 2) + [(d_y, width)]
    hidden = 1.0 / math.sqrt(width)
    out_scale = 1.0 / math.sqrt(d_y)
    mults = (hidden,) * (depth - 1) + (out_scale,)
    sample = semi_orthogonal if init == "orthogonal" else (lambda k, s: jax.random.normal(k, s))

    def init_stacked(key):
        keys = jax.random.split(key, depth)
        if depth <= 2:
            layers = [{"w": sample(k, s)[None]} for k, s in zip(keys, shapes, strict=True)]
            return _stacks.LayerList(layers, (1,) * depth)
        # the middle layers as one vmapped draw: the init program does not grow with depth
        middle = jax.vmap(lambda k: sample(k, (width, width)))(keys[1:-1])
        first, last = sample(keys[0], shapes[0]), sample(keys[-1], shapes[-1])
        return _stacks.LayerList(
            [{"w": first[None]}, {"w": middle}, {"w": last[None]}], (1, depth - 2, 1)
        )

    def init_fn(key):
        return _stacks.unpack(init_stacked(key))

    init_stacked.source = init_fn

    def apply(params, x, mask=None):
        if len(params) != depth:
            raise ValueError(f"params must have depth = {depth} layers, got {len(params)}")
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != d_x:
            raise ValueError(f"x must have d_x = {d_x} features, got {h.shape[1]}")
        if depth == 1:
            return out_scale * (h @ params[0]["w"].T)
        n = _models.traced_width(width_of)
        c = hidden if n is None else 1.0 / jnp.sqrt(n.astype(jnp.float32))
        h = c * (h @ params[0]["w"].T)
        if depth > 2:
            mid = params[1:-1]
            if isinstance(mid, _stacks.LayerList) and len(mid.counts) == 1:
                stack = mid.segments[0]["w"]  # already stacked: nothing to stack per step
            else:
                stack = jnp.stack([p["w"] for p in mid])

            def layer(h, w):
                return c * (h @ w.T), None

            h, _ = lax.scan(layer, h, stack)
        return out_scale * (h @ params[-1]["w"].T)

    widths = (d_x,) + (width,) * (depth - 1) + (d_y,)
    # the width m alone: one program trains several widths (`models.masked_width`); the
    # padded units of a linear network carry exact zeros, and 1/sqrt(m) is the run's own
    width_of = None
    if depth >= 2:
        width_of = _models.Width(
            ("hu_linear", d_x, depth, d_y, init),
            width,
            lambda w: hu_linear(d_x, w, depth, d_y, init=init),
        )
    return Model(
        init_fn,
        apply,
        lambda params, x, mask=None: (apply(params, x, mask), None),
        Dense(widths, "linear", False, mults),
        init_stacked=init_stacked,
        width=width_of,
    )


def hu_data(d_x: int, n: int, d_y: int, *, seed: int = 0) -> Dataset:
    """Hu et al.'s synthetic task (their section 6): X (d_x, n) and W* (d_y, d_x) with i.i.d.
    N(0, 1) entries, Y = W* X. Returned with examples as rows (x_train = X^T (n, d_x), y_train =
    Y^T (n, d_y), float32); the test split is the training set (the task has no test set)."""
    d_x, n, d_y = int(d_x), int(n), int(d_y)
    if min(d_x, n, d_y) < 1:
        raise ValueError(f"d_x, n and d_y must be positive, got {d_x}, {n}, {d_y}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d_x, n))
    W = rng.standard_normal((d_y, d_x))
    x, y = X.T.astype(np.float32), (W @ X).T.astype(np.float32)
    return Dataset(x, y, x.copy(), y.copy(), 0, f"hu_linear(d_x={d_x}, n={n}, d_y={d_y})")


def hu_loss(pred, target, weights=None):
    """Hu et al.'s loss L = (1/2) sum_i ||f(x_i) - y_i||^2 = (1/2) ||f(X) - Y||_F^2 over the
    kept examples (a sum: their step size d_y / (2 L ||X||^2) is for this loss, not the mean).
    pred, target: (batch, d_y); weights: (batch,) uniform over the kept examples and zero on
    padding (`dynamics.losses`'s convention), or None for every example."""
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(pred.shape).astype(pred.dtype)
    sq = jnp.sum((pred - target) ** 2, axis=1)
    if weights is None:
        return 0.5 * jnp.sum(sq)
    # weights are 1/b on the b kept examples: b sum_i w_i sq_i is their plain sum
    kept = weights > 0
    return 0.5 * jnp.sum(kept) * jnp.sum(jnp.where(kept, weights * sq, 0.0))


@dataclasses.dataclass(frozen=True)
class LrFactor(Schedule):
    """The constant schedule lr_t = lr * factor (a `dynamics.schedules.Schedule`): with factor =
    `hu_lr(...)` a sweep's traced lr is the step size in units of Hu et al.'s, which depends on
    the depth (a static setting) while the lr axis stays traced."""

    factor: float

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor: must be positive and finite, got {self.factor}")

    def __call__(self, t, steps_per_epoch, total_steps):
        return jnp.full((), self.factor, jnp.float32)


def _svals(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"X must be a matrix, got shape {x.shape}")
    return np.linalg.svd(x, compute_uv=False)


def hu_lr(x, depth: int, d_y: int) -> float:
    """Hu et al.'s step size lr = d_y / (2 L ||X||_2^2) for GD on (1/2) ||f(X) - Y||_F^2.
    x: the inputs, (n, d_x) rows or X itself (its spectral norm is the same)."""
    if int(depth) < 1 or int(d_y) < 1:
        raise ValueError(f"depth and d_y must be positive, got {depth}, {d_y}")
    return float(d_y) / (2.0 * int(depth) * float(_svals(x)[0]) ** 2)


def hu_rate(x, lr: float, depth: int, d_y: int) -> float:
    """The contraction q = 1 - lr L sigma_min(X)^2 / (4 d_y) of Hu et al.'s theorem (sigma_min:
    the smallest nonzero singular value, i.e. the r-th for rank(X) = r)."""
    s = _svals(x)
    s_min = float(s[s > s[0] * max(np.shape(x)) * np.finfo(np.float64).eps][-1])
    q = 1.0 - float(lr) * int(depth) * s_min**2 / (4.0 * int(d_y))
    if not 0.0 <= q < 1.0:
        raise ValueError(f"lr L sigma_min^2 / (4 d_y) must lie in (0, 1], got {1.0 - q}")
    return q


def hu_rate_bound(loss0, x, lr: float, depth: int, d_y: int, steps) -> np.ndarray:
    """Hu et al.'s bound loss_t <= (1 - lr L sigma_min(X)^2 / (4 d_y))^t loss_0 (orthogonal init,
    width large enough, lr <= d_y / (2 L ||X||^2)); steps: int or array of t. float64."""
    return float(loss0) * hu_rate(x, lr, depth, d_y) ** np.asarray(steps, np.float64)
