"""Observables: pure, jit- and vmap-safe statistics of a training state, with no gradients
flowing through them (every input passes through `stop_gradient`).

Names are the variables of the stored dataset. Per-layer quantities return (L,) arrays with
L = len(params); layer k is params[k]. Definitions follow REPRODUCTIONS.md:
  rho = prod_k ||W_k||_F;  numerical rank = #{i : s_i(W) / ||W||_F > tol};
  stable rank = ||W||_F^2 / ||W||_2^2;  "dist" = ||W_{t+1} - W_t||_F / lr.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dynamics.models import layer_weights


def _stop(x):
    return jax.lax.stop_gradient(x) if isinstance(x, jax.Array) else x


def _no_grad(fn):
    """Stop gradients through every array argument (static ints and strings pass untouched)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        args = [jax.tree.map(_stop, a) for a in args]
        kwargs = {k: jax.tree.map(_stop, v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapped


def _sq(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- norms and spectra


@_no_grad
def layer_norms(params) -> jax.Array:
    """||W_k||_F for every layer k (conv kernels: the kernel's Frobenius norm). Shape (L,)."""
    return jnp.stack([jnp.sqrt(jnp.sum(w**2)) for w in layer_weights(params)])


@_no_grad
def rho(params) -> jax.Array:
    """rho = prod_k ||W_k||_F, the product of the layers' Frobenius norms. Scalar."""
    return jnp.prod(layer_norms(params))


def max_singular_values(params) -> int:
    """Length of the padded `sv` axis: max_k min(shape of the (out, in*k*k) reshape of W_k)."""
    shapes = jax.eval_shape(layer_weights, params)
    return max(min(s.shape) for s in shapes)


def _serialize_lapack() -> bool:
    """Whether batched LAPACK calls must be split into one call per matrix.

    XLA's CPU LAPACK kernels spread a batch over the intra-op thread pool and block until it is
    done. When several CPU devices execute at once (simulated devices), every pool thread can
    end up blocked that way and the program deadlocks; one call per matrix never waits on the
    pool. Decided when a program is traced.
    """
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def _one_matrix_at_a_time(fn):
    """fn(matrix) that, under vmap on several CPU devices, loops over the batch (lax.map)
    instead of making one batched LAPACK call (see `_serialize_lapack`)."""
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, x):
        (batched,) = in_batched
        if not batched:
            return f(x), False
        if not _serialize_lapack():
            return jax.vmap(fn)(x), True
        return jax.lax.map(f, x), True

    return f


@_one_matrix_at_a_time
def _svd_values(w):
    return jnp.linalg.svd(w, compute_uv=False)


@_one_matrix_at_a_time
def _eigvalsh(g):
    return jnp.linalg.eigvalsh(g)


@_one_matrix_at_a_time
def _pinv_hermitian(a):
    return jnp.linalg.pinv(a, hermitian=True)


SPECTRUM_METHODS = ("auto", "native", "svd", "gram")

# Largest min(rows, cols) for which "auto" uses the compiled kernel on the CPU (above it,
# LAPACK's blocked routines win; `python -m bench` reports both per shape).
NATIVE_MAX_DIM = 512


def spectrum_method_for(shape, method: str = "auto") -> str:
    """The method `singular_values` uses for a matrix of this shape: "native" (the compiled CPU
    kernel, `dynamics.native`; LAPACK on other platforms), "svd" (LAPACK / cuSOLVER) or "gram".
    "auto" takes "native" where the kernel is available and min(shape) <= NATIVE_MAX_DIM."""
    if method == "auto":
        from dynamics import native

        small = min(shape[-2:]) <= NATIVE_MAX_DIM
        return "native" if small and native.available() else "svd"
    if method == "native":
        from dynamics import native

        return "native" if native.available() else "svd"
    return method


def _svals(w, method):
    method = spectrum_method_for(w.shape, method)
    if method == "native":
        from dynamics import native

        return jax.lax.platform_dependent(w, cpu=native.svdvals, default=_svd_values)
    if method == "svd":
        return _svd_values(w)
    # "gram": eigenvalues of the smaller Gram matrix, s_i = sqrt(lambda_i).
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    ev = _eigvalsh(g)[::-1]
    return jnp.sqrt(jnp.maximum(ev, 0.0))


@_no_grad
def singular_values(params, pad_to: int | None = None, method: str = "auto") -> jax.Array:
    """Singular values of every layer's (out, in*k*k) matrix, descending, NaN-padded to pad_to.

    method: "auto" (default: the compiled kernel of `dynamics.native` on the CPU for matrices
    up to NATIVE_MAX_DIM, else LAPACK), "native", "svd" (LAPACK / cuSOLVER SVD) or "gram"
    (square roots of the eigenvalues of W W^T, accurate for s_i / s_1 above about sqrt(eps)).
    Shape (L, pad_to).
    """
    ws = layer_weights(params)
    pad_to = max(min(w.shape) for w in ws) if pad_to is None else pad_to
    rows = []
    for w in ws:
        s = _svals(w, method)
        rows.append(jnp.pad(s, (0, pad_to - s.shape[0]), constant_values=jnp.nan))
    return jnp.stack(rows)


@_no_grad
def numerical_rank(sv, tol: float = 1e-3) -> jax.Array:
    """Number of singular values of W / ||W||_F above tol, from NaN-padded spectra sv (..., S).

    ||W||_F^2 = sum_i s_i^2. Returns float counts of shape sv.shape[:-1].
    """
    fro = jnp.sqrt(jnp.nansum(sv**2, axis=-1, keepdims=True))
    return jnp.sum(jnp.where(jnp.isnan(sv), False, sv / fro > tol), axis=-1).astype(sv.dtype)


@_no_grad
def stable_rank(sv) -> jax.Array:
    """||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2 from NaN-padded descending spectra (..., S)."""
    return jnp.nansum(sv**2, axis=-1) / sv[..., 0] ** 2


@_no_grad
def effective_lr(lr, params) -> jax.Array:
    """Effective learning rate lr / ||W_k||_F^2 of each (scale-invariant) layer. Shape (L,)."""
    return lr / layer_norms(params) ** 2


@_no_grad
def balancedness(params) -> jax.Array:
    """||W_{k+1}^T W_{k+1} - W_k W_k^T||_F for k = 0..L-2, NaN at k = L-1 (shape (L,)).

    Gradient flow on a deep linear (or homogeneous ReLU, for the diagonal) network conserves
    these differences (Arora et al. 2018; Du et al. 2018). Pairs whose shapes do not chain
    (conv layers) are NaN.
    """
    ws = layer_weights(params)
    out = []
    for a, b in zip(ws[:-1], ws[1:], strict=False):
        if b.shape[1] != a.shape[0]:
            out.append(jnp.full((), jnp.nan))
            continue
        out.append(jnp.linalg.norm(b.T @ b - a @ a.T))
    out.append(jnp.full((), jnp.nan))
    return jnp.stack(out)


# --------------------------------------------------------------------------- gradients


def _per_layer(fn, *trees):
    return jnp.stack([fn(*layers) for layers in zip(*trees, strict=True)])


@_no_grad
def grad_norms(grads) -> jax.Array:
    """Per-layer gradient norm: sqrt of the sum of squares over every parameter of layer k. (L,)"""
    return jnp.sqrt(layer_sq_norms(grads))


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def layer_sq_norms(grads) -> jax.Array:
    """Per-layer squared norms ||g_k||^2 (L,): the parts from which norms and cosines are built."""
    return _per_layer(_sq, grads)


def layer_dots(a, b) -> jax.Array:
    """Per-layer inner products <a_k, b_k> (L,)."""
    return _per_layer(_dot, a, b)


def adjacent_parts(prev, grads):
    """(dots, squares, grads) of one step: per-layer <prev_k, g_k> and ||g_k||^2 (L,), and the
    gradient to keep as the next step's `prev`. On the CPU one pass of the compiled kernel
    (`dynamics.native.grad_pairs`) computes all of it and writes the gradient over `prev`'s
    buffers; elsewhere, XLA's reductions."""
    prev = jax.tree.map(_stop, prev)
    grads = jax.tree.map(_stop, grads)

    def xla(prev, grads):
        return layer_dots(prev, grads), layer_sq_norms(grads), grads

    from dynamics import native

    if not native.available():
        return xla(prev, grads)

    def kernel(prev, grads):
        leaves_g, tree = jax.tree.flatten(grads)
        leaves_p = jax.tree.leaves(prev)
        dots, sq, new = native.grad_pairs(leaves_g, leaves_p)
        # leaves back to layers: layer k owns the leaves of grads[k]
        sizes = [len(jax.tree.leaves(layer)) for layer in grads]
        starts = np.cumsum([0] + sizes)
        per = lambda v: jnp.stack(
            [jnp.sum(v[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        )
        return per(dots), per(sq), jax.tree.unflatten(tree, new)

    return jax.lax.platform_dependent(prev, grads, cpu=kernel, default=xla)


def cosines_from_parts(dots, sq_a, sq_b) -> tuple[jax.Array, jax.Array]:
    """(per-layer cosines, whole-vector cosine) from per-layer <a_k, b_k>, ||a_k||^2, ||b_k||^2.

    A cosine with an exactly zero vector is 0, not 0/0.
    """

    def cos(d, x, y):
        den = jnp.sqrt(x) * jnp.sqrt(y)
        return jnp.where(den > 0, d / jnp.where(den > 0, den, 1.0), 0.0)

    return cos(dots, sq_a, sq_b), cos(jnp.sum(dots), jnp.sum(sq_a), jnp.sum(sq_b))


@_no_grad
def grad_cosines(g_prev, g) -> tuple[jax.Array, jax.Array]:
    """Cosine between gradients of adjacent iterations (Morchdi et al. 2023).

    Returns (per-layer cosines (L,), cosine of the whole parameter vectors ()). A cosine
    with an exactly zero gradient (a minibatch on which every ReLU of a layer is dead) is 0,
    not 0/0, so one such step does not turn a record's mean into NaN.
    """
    return cosines_from_parts(layer_dots(g_prev, g), layer_sq_norms(g_prev), layer_sq_norms(g))


@_no_grad
def update_sizes(old_params, new_params, lr) -> jax.Array:
    """ "dist" of Galanti et al.: ||W_{t+1} - W_t||_F / lr for every layer. Shape (L,)."""
    return (
        jnp.stack(
            [
                jnp.sqrt(jnp.sum((b - a) ** 2))
                for a, b in zip(layer_weights(old_params), layer_weights(new_params), strict=True)
            ]
        )
        / lr
    )


# --------------------------------------------------------------------------- outputs


@_no_grad
def margins(pred, target, rho_value) -> jax.Array:
    """Normalized margins y f(x) / rho.

    One output with +-1 targets: y f(x) / rho. Several outputs with integer labels:
    (f_y(x) - max_{j != y} f_j(x)) / rho. Shape (N,).
    """
    flat = pred.reshape(pred.shape[0], -1)
    if flat.shape[1] == 1:
        m = flat[:, 0] * target.reshape(-1)
    else:
        fy = jnp.take_along_axis(flat, target[:, None], axis=1)[:, 0]
        other = jnp.where(jax.nn.one_hot(target, flat.shape[1], dtype=bool), -jnp.inf, flat)
        m = fy - jnp.max(other, axis=1)
    return m / rho_value


@_no_grad
def neural_collapse(h, labels, W, pred, num_classes: int) -> dict[str, jax.Array]:
    """Neural-collapse statistics of penultimate features (Papyan, Han & Donoho 2020).

    h: (N, d) features, labels: (N,), W: (C, d) last-layer weight, pred: (N, C) outputs.
    With mu_c the class means, mu_G the global mean, M = [mu_c - mu_G] (C, d),
    S_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T and S_B = (1/C) M^T M:
      nc1 = trace(S_W S_B^+) / C
      nc2 = mean_{c != c'} |cos(M_c, M_c') + 1/(C-1)|        (equiangularity; 0 for a simplex ETF)
      nc2_cos = mean_{c != c'} cos(M_c, M_c')                 (-> -1/(C-1))
      nc2_equinorm = std_c ||M_c|| / mean_c ||M_c||
      nc3 = || W/||W||_F - M/||M||_F ||_F^2                    (self-duality)
      nc4 = fraction of i with argmax pred_i != argmin_c ||h_i - mu_c||
      cdnv = mean_{c < c'} (var_c + var_c') / (2 ||mu_c - mu_c'||^2),  var_c = E_c ||h - mu_c||^2
    """
    C = num_classes
    onehot = jax.nn.one_hot(labels, C, dtype=h.dtype)  # (N, C)
    counts = jnp.sum(onehot, axis=0)
    mu = (onehot.T @ h) / counts[:, None]  # (C, d)
    mu_g = jnp.mean(h, axis=0)
    M = mu - mu_g[None, :]
    within = h - onehot @ mu
    S_W = within.T @ within / h.shape[0]
    S_B = M.T @ M / C
    nc1 = jnp.trace(S_W @ _pinv_hermitian(S_B)) / C

    norms = jnp.linalg.norm(M, axis=1)
    Mn = M / norms[:, None]
    cos = Mn @ Mn.T
    off = ~jnp.eye(C, dtype=bool)
    n_off = C * (C - 1)
    nc2_cos = jnp.sum(jnp.where(off, cos, 0.0)) / n_off
    nc2 = jnp.sum(jnp.where(off, jnp.abs(cos + 1.0 / (C - 1)), 0.0)) / n_off
    nc2_equinorm = jnp.std(norms) / jnp.mean(norms)
    nc3 = jnp.sum((W / jnp.linalg.norm(W) - M / jnp.linalg.norm(M)) ** 2)

    d2 = jnp.sum(h**2, axis=1, keepdims=True) - 2 * h @ mu.T + jnp.sum(mu**2, axis=1)[None]
    nc4 = jnp.mean(
        (jnp.argmax(pred.reshape(pred.shape[0], -1), axis=1) != jnp.argmin(d2, axis=1)).astype(
            h.dtype
        )
    )

    var = jnp.sum(onehot * jnp.sum(within**2, axis=1, keepdims=True), axis=0) / counts
    dmu2 = jnp.sum((mu[:, None] - mu[None]) ** 2, axis=-1)
    upper = jnp.triu(jnp.ones((C, C), bool), k=1)
    ratio = (var[:, None] + var[None]) / (2 * jnp.where(upper, dmu2, 1.0))
    cdnv = jnp.sum(jnp.where(upper, ratio, 0.0)) / (C * (C - 1) / 2)
    return {
        "nc1": nc1,
        "nc2": nc2,
        "nc2_cos": nc2_cos,
        "nc2_equinorm": nc2_equinorm,
        "nc3": nc3,
        "nc4": nc4,
        "cdnv": cdnv,
    }


NC_NAMES = ("nc1", "nc2", "nc2_cos", "nc2_equinorm", "nc3", "nc4", "cdnv")


# --------------------------------------------------------------------------- curvature


def hvp(loss_fn: Callable, params, batch):
    """v -> H v for H the Hessian of loss_fn(params, batch), on flat vectors (forward-over-reverse)."""
    flat, unravel = ravel_pytree(params)

    def f(p):
        return loss_fn(unravel(p), batch)

    grad = jax.grad(f)

    def apply(v):
        return jax.jvp(grad, (flat,), (v,))[1]

    return apply, flat.shape[0]


def sharpness(loss_fn: Callable, params, batch, key, iters: int = 20) -> jax.Array:
    """Top Hessian eigenvalue of loss_fn at params, by power iteration on Hessian-vector products.

    v_0 ~ N(0, I) normalized; v_{j+1} = H v_j / ||H v_j||; returns the Rayleigh quotient
    v^T H v after `iters` iterations: the eigenvalue of largest magnitude (the sharpness
    whenever it dominates the negative curvature, as in training). Error shrinks as
    (lambda_2 / lambda_1)^(2 iters). Gradient stability of GD requires lr < 2 / sharpness.
    """
    params = jax.tree.map(jax.lax.stop_gradient, params)
    apply, n = hvp(loss_fn, params, batch)
    v0 = jax.random.normal(key, (n,))
    v0 = v0 / jnp.linalg.norm(v0)

    def body(v, _):
        w = apply(v)
        return w / jnp.linalg.norm(w), None

    v, _ = jax.lax.scan(body, v0, None, length=iters)
    return jnp.vdot(v, apply(v))
