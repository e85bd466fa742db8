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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dynamics import stacks as _stacks
from dynamics.lapack import one_matrix_at_a_time as _one_matrix_at_a_time
from dynamics.models import check_params as _check_params
from dynamics.models import layer_weight, layer_weights


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
    _check_params(params)
    return _per_layer(lambda p: jnp.sqrt(jnp.sum(layer_weight(p) ** 2)), params)


@_no_grad
def rho(params) -> jax.Array:
    """rho = prod_k ||W_k||_F, the product of the layers' Frobenius norms. Scalar."""
    return jnp.prod(layer_norms(params))


@_no_grad
def rho_eff(params, model_state=()) -> jax.Array:
    """rho of a batch-normalized network through each normalization's scale (Xu et al. 2023):

        rho_eff = prod_k ||W_k||_F * prod_BN ||gamma||_2 / prod_BN ||sqrt(running_var)||_2,

    the product over batch-norm layers of the running standard deviations' Euclidean norm
    (l1 / linf batch norms: of their running scales), times ||gamma||_2 where the norm is
    affine. model_state: the model's state, a list of per-layer dicts: {"mean", "var"} or
    {"mean", "scale"} for the library's batch norms, or an adapted Flax module's
    "<path>/var" entries, whose gain is the layer's "<path>/scale" parameter; `()` gives rho.
    Scalar.
    """
    r = rho(params)
    if not model_state:
        return r
    for p, s in zip(params, model_state, strict=True):
        if not isinstance(s, dict):
            continue
        for k, v in s.items():
            if k == "var" or k.endswith("/var"):
                r = r / jnp.sqrt(jnp.sum(v))
            elif k == "scale":
                r = r / jnp.sqrt(jnp.sum(v**2))
            else:
                continue
            if k in ("var", "scale"):
                gain = p.get("gamma") if isinstance(p, dict) else None
            else:  # a flax BatchNorm: state "[batch_stats/]<path>/var", its gain "<path>/scale"
                path = k[: -len("var")]
                names = (path + "scale", path.split("/", 1)[-1] + "scale")
                gain = next((p[n] for n in names if isinstance(p, dict) and n in p), None)
            if gain is not None:
                r = r * jnp.sqrt(jnp.sum(gain**2))
    return r


def max_singular_values(params) -> int:
    """Length of the padded `sv` axis: max_k min(shape of the (out, in*k*k) reshape of W_k)."""
    shapes = jax.eval_shape(layer_weights, params)
    return max(min(s.shape) for s in shapes)


@_one_matrix_at_a_time
def _svd_values(w):
    return jnp.linalg.svd(w, compute_uv=False)


@_one_matrix_at_a_time
def _eigvalsh(g):
    return jnp.linalg.eigvalsh(g)


@_one_matrix_at_a_time
def _eigh(a):
    return jnp.linalg.eigh(a)


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
    if method == "native" and w.dtype != jnp.float32:  # the kernel is float32's
        method = "svd"
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
    if isinstance(params, _stacks.LayerList):  # one batched call per stacked segment
        _check_params(params)
        svs = [
            jax.vmap(lambda layer: _svals(layer_weights([layer])[0], method))(seg)
            for seg in params.segments
        ]
        pad_to = max(sv.shape[-1] for sv in svs) if pad_to is None else pad_to
        pads = [
            jnp.pad(sv, ((0, 0), (0, pad_to - sv.shape[-1])), constant_values=jnp.nan) for sv in svs
        ]
        return jnp.concatenate(pads)
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
    return _stacks.per_layer(fn, *trees)


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

    leaves = jax.tree.leaves(grads)
    if (
        not native.available()
        or any(x.dtype != jnp.float32 for x in leaves)
        or isinstance(grads, _stacks.LayerList)  # per-layer parts of stacked leaves: XLA's
    ):
        return xla(prev, grads)  # the kernel is float32's

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

    def one(a, b):
        return jnp.sqrt(jnp.sum((layer_weight(b) - layer_weight(a)) ** 2))

    return _per_layer(one, old_params, new_params) / lr


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


class Lanczos(NamedTuple):
    """Outcome of `sharpness_lanczos`: `value` the top Ritz value theta (scalar), `residual` the
    Ritz residual |beta_m s_m| = ||H y - theta y|| of its unit Ritz vector y (scalar), `gap` the
    distance from theta to the next Ritz value (scalar; inf when the Krylov space is one vector),
    `iterations` the number m of Lanczos steps taken, i.e. of Hessian-vector products (int32)."""

    value: jax.Array
    residual: jax.Array
    gap: jax.Array
    iterations: jax.Array


def _top_ritz(alpha, beta, k):
    """Top two eigenvalues of the leading k x k block of tridiag(beta, alpha, beta) and the last
    (row k - 1) component of the top one's unit eigenvector, from an eigh of the whole padded
    matrix: rows from k on are decoupled (zero off-diagonals) and get the diagonal value
    -2 * bound, below the block's spectrum (Gershgorin: |lambda| <= bound), so they sort below
    it without a large entry spoiling eigh's accuracy (its error is eps * ||T||)."""
    m = alpha.shape[0]
    idx = jnp.arange(m)
    off = jnp.where(idx[:-1] < k - 1, beta[:-1], 0.0)
    bound = jnp.sum(jnp.abs(alpha)) + 2.0 * jnp.sum(jnp.abs(off))
    # bound = 0 (T = 0) still needs the padding strictly below 0: -1 then.
    pad = jnp.where(bound > 0, -2.0 * bound, -1.0)
    T = jnp.diag(jnp.where(idx < k, alpha, pad)) + jnp.diag(off, 1) + jnp.diag(off, -1)
    evals, evecs = _eigh(T)  # one LAPACK call per matrix on several CPU devices (no deadlock)
    # a 1 x 1 block has no second Ritz value (evals[m - 2] is padding then)
    second = jnp.where(k > 1, evals[m - 2], -jnp.inf) if m > 1 else jnp.full((), -jnp.inf, T.dtype)
    return evals[m - 1], second, evecs[k - 1, m - 1]


_BLOCK = 8


def _orthogonalize(V, w, k):
    """w minus its projection on the first k rows of V (orthonormal; zero past k), by blocks of
    _BLOCK rows: the work is O(k n), not O(rows n) (a whole-basis matvec reads all of V)."""

    def block(j, w):
        Vb = jax.lax.dynamic_slice_in_dim(V, j * _BLOCK, _BLOCK, axis=0)
        return w - Vb.T @ (Vb @ w)

    return jax.lax.fori_loop(0, (k + _BLOCK - 1) // _BLOCK, block, w)


def sharpness_lanczos(
    loss_fn: Callable,
    params,
    batch,
    key,
    iters: int = 100,
    tol: float = 1e-4,
    check_every: int = 4,
) -> Lanczos:
    """Top (largest algebraic) Hessian eigenvalue by Lanczos, with the residual behind it.

    See `sharpness` for the method and its bounds. The stopping test (an eigh of the padded
    iters x iters tridiagonal, O(iters^3)) runs every `check_every` steps and at the last one,
    so the step count is a multiple of check_every or min(iters, n): up to check_every - 1
    HVPs past convergence buy a check cost that does not dominate a small network's HVP.
    """
    iters, check_every = int(iters), int(check_every)
    if iters < 1:
        raise ValueError(f"iters: must be at least 1, got {iters}")
    if check_every < 1:
        raise ValueError(f"check_every: must be at least 1, got {check_every}")
    if isinstance(tol, (int, float)) and not tol >= 0:
        raise ValueError(f"tol: must be >= 0, got {tol}")
    params = jax.tree.map(jax.lax.stop_gradient, params)
    apply, n = hvp(loss_fn, params, batch)
    dtype = ravel_pytree(params)[0].dtype
    # Basis and tridiagonal in at least float32 (orthogonality in bfloat16 would be lost at
    # once); the HVP itself runs in the params' dtype.
    acc = jnp.promote_types(dtype, jnp.float32)
    m = min(iters, n)  # the Krylov space of H has dimension at most n
    m_pad = -(-m // _BLOCK) * _BLOCK  # whole blocks for _orthogonalize
    eps = jnp.finfo(acc).eps
    v0 = jax.random.normal(key, (n,), acc)
    v0 = v0 / jnp.linalg.norm(v0)

    def step(state):
        k, V, v, v_prev, b_prev, alpha, beta, scale, _ = state
        w = apply(v.astype(dtype)).astype(acc)
        a = jnp.vdot(v, w)
        w = w - a * v - b_prev * v_prev
        V = V.at[k].set(v)
        # Full reorthogonalization against every basis vector so far, Gram-Schmidt twice
        # ("twice is enough", Giraud et al. 2005): without it the basis loses orthogonality as
        # Ritz values converge and T grows spurious copies of them.
        w = _orthogonalize(V, w, k + 1)
        w = _orthogonalize(V, w, k + 1)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        # Breakdown: span(V) is invariant under H (numerically: b at rounding level of ||H||,
        # or exactly 0 for H = 0), so T's eigenvalues are eigenvalues of H; stepping on from
        # v = 0 would add a spurious eigenvalue 0 to T, so the steps stop here.
        broke = b <= 10.0 * eps * scale
        v_next = jnp.where(broke, 0.0, w / jnp.where(broke, 1.0, b))
        alpha, beta = alpha.at[k].set(a), beta.at[k].set(b)
        return k + 1, V, v_next, v, b, alpha, beta, scale, broke

    def chunk(state):
        lanczos, *_ = state

        def inner(_, s):
            return jax.lax.cond((s[0] < m) & ~s[-1], step, lambda s: s, s)

        lanczos = jax.lax.fori_loop(0, check_every, inner, lanczos)
        k, *_, alpha, beta, _, broke = lanczos
        theta, second, s_last = _top_ritz(alpha, beta, k)
        res = jnp.abs(beta[k - 1] * s_last)
        done = broke | (res <= tol * jnp.abs(theta)) | (k >= m)
        return lanczos, theta, second, res, done

    zero = jnp.zeros((), acc)
    lanczos = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((m_pad, n), acc),
        v0,
        jnp.zeros((n,), acc),
        zero,
        jnp.zeros((m,), acc),
        jnp.zeros((m,), acc),
        zero,
        jnp.zeros((), bool),
    )
    state = (lanczos, zero, zero, zero, jnp.zeros((), bool))
    lanczos, theta, second, res, _ = jax.lax.while_loop(lambda s: ~s[-1], chunk, state)
    return Lanczos(theta, res, theta - second, lanczos[0])


def sharpness(
    loss_fn: Callable, params, batch, key, iters: int = 100, tol: float = 1e-4
) -> jax.Array:
    """Sharpness: the largest algebraic eigenvalue lambda_1 of the Hessian H of
    loss_fn(params, batch) at params, by Lanczos with full reorthogonalization on
    Hessian-vector products (forward-over-reverse, `hvp`). Scalar.

    loss_fn(params, batch) -> scalar; params a pytree of arrays (n entries raveled); key a
    PRNG key for the start vector v_1 ~ N(0, I) / norm. Lanczos (beta_0 = 0):
      alpha_j = v_j^T H v_j,  w = H v_j - alpha_j v_j - beta_{j-1} v_{j-1},
      w <- w - V_j V_j^T w (twice),  beta_j = ||w||,  v_{j+1} = w / beta_j,
    so H V_m = V_m T_m + beta_m v_{m+1} e_m^T with T_m = tridiag(beta, alpha, beta). The
    estimate is theta, the largest eigenvalue of T_m (`jnp.linalg.eigh` of the padded
    min(iters, n)-square matrix), with unit eigenvector s. theta is a Rayleigh quotient of H
    (theta <= lambda_1) and does not decrease with m.

    Accuracy and stopping rule: the Ritz vector y = V_m s has residual
    r = ||H y - theta y|| = |beta_m s_m|; for symmetric H some eigenvalue lies within r of
    theta, and within r^2 / gap if gap is the distance from theta to the rest of H's spectrum
    (Kato-Temple). The iteration stops at the first checked m (every 4 steps; see
    `sharpness_lanczos`) with r <= tol * |theta|, so the result is within relative error tol
    of an eigenvalue (tol^2 |theta| / gap once that eigenvalue is resolved), or at
    m = min(iters, n), or at breakdown (beta_m ~ 0: span(V_m) is invariant under H and theta
    is exact; H = 0 gives 0). The eigenvalue is lambda_1 unless the random start is nearly
    orthogonal to its eigenvector (probability ~0), or lambda_1 - lambda_2 is so small that a
    Ritz value settled on lambda_2 passes the test first: the error is then at most
    lambda_1 - lambda_2 + r. `sharpness_lanczos` returns r and the Ritz gap to check. Rate
    (Kaniel-Paige): lambda_1 - theta <= (lambda_1 - lambda_n) (tan phi_0 / C_{m-1}(1 + 2 g))^2,
    g = (lambda_1 - lambda_2) / (lambda_2 - lambda_n), C the Chebyshev polynomial, i.e. about
    exp(-4 m sqrt(g)), against (lambda_2 / lambda_1)^(2m) for power iteration. r is only known
    to about eps ||H|| (eigh's accuracy): a tol below ~1e-6 in float32 runs until r rounds to
    0 or to `iters`, and so may a theta near 0 relative to ||H|| (the test is relative).

    This is the largest algebraic eigenvalue, not the one of largest magnitude: the two differ
    only when negative curvature dominates (|lambda_n| > lambda_1). Gradient descent is
    stable along the top eigenvector only for lr < 2 / sharpness (Cohen et al. 2021, the edge
    of stability).

    Cost: at most min(iters, n) HVPs, fewer once converged (under vmap every lane steps until
    the slowest converges; finished lanes are frozen), plus O(k n) at step k for the
    reorthogonalization. Memory: the basis, about min(iters, n) x n in max(params dtype,
    float32) per lane. HVPs run in the params' dtype. jit- and vmap-safe (`lax.while_loop`,
    static shapes; iters must be a static int).
    """
    return sharpness_lanczos(loss_fn, params, batch, key, iters, tol).value
