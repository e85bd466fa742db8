"""Exact kernel references (host-side numpy, float64) and kernel observables (JAX).

References, all numpy float64 in and out:
  `gaussian_expectation_2d`  E_{(u,v) ~ N(0, cov)}[f(u, v)] for a batch of 2x2 covariances;
  `arccos_expectation`       Cho & Saul's closed forms E[relu(u) relu(v)], E[step(u) step(v)];
  `limit_ntk`, `lambda_min`  the limit Gram matrix K^(H) of Du, Lee, Li, Wang, Zhai
                             (arXiv 1811.03804) and its smallest eigenvalue lambda_0;
  `c_sigma`                  their activation constant 1 / E_{z ~ N(0,1)}[sigma(z)^2];
  `generator_dual_kernel`, `generator_jacobian`, `circulant`
                             the two-layer convolutional generator of Heckel & Soltanolkotabi
                             (ICLR 2020): its Jacobian and the expected J J^T (the dual kernel);
  `least_norm_solution`      A^+ y, the compressive-sensing baseline;
  `linear_rate_bound`        Du et al.'s bound (1 - lr lambda_0 / 2)^t ||y - u(0)||^2.
Observables, pure JAX (jit- and vmap-safe, float32 unless the parameters are float64):
  `empirical_ntk_gram`       G_ij = <d f(x_i)/d theta, d f(x_j)/d theta>, optionally over chosen
                             layers only; `gram_drift`, `gram_min_eig`;
  `du_layer_grams`           the per-layer Grams of a `du_mlp` net without the Jacobian (one
                             forward and backward pass: cheap at width 4096 and beyond).
Recorded online (`dyn.Observable`s for `RunSpec.observables`):
  `ntk_gram_observables`     the Gram matrix G(t) on a fixed probe set: lambda_min, lambda_max,
                             ||G(t) - G(0)||_2 (G(0) from the run's initial parameters), that over
                             ||G(0)||_2, and the distance to a reference such as `limit_ntk`.
Model: `du_mlp`, Du et al.'s fully connected net or ResNet in their exact parameterization.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from numpy.polynomial.hermite import hermgauss
from numpy.polynomial.legendre import leggauss

from dynamics.models import Model, Params

KERNEL_ACTIVATIONS = ("relu", "softplus", "tanh")
ARCHS = ("mlp", "resnet")
QUADRATURES = ("polar", "hermite")


def _np_sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# (sigma, sigma') in numpy float64 for the references; relu' is the step with step(0) = 0
_NP_ACT: dict[str, tuple[Callable, Callable]] = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
    "softplus": (lambda z: np.logaddexp(0.0, z), _np_sigmoid),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}
_JAX_ACT: dict[str, Callable] = {"relu": jax.nn.relu, "softplus": jax.nn.softplus, "tanh": jnp.tanh}


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# --------------------------------------------------------------------------- 2-D Gaussian expectations


def _cholesky_2x2(cov):
    """Entries (L11, L21, L22) of the lower Cholesky factor of each 2x2 covariance; a singular
    block (correlation +-1, identical points) gets L22 = 0 instead of a LAPACK failure."""
    cov = np.asarray(cov, np.float64)
    if cov.shape[-2:] != (2, 2):
        raise ValueError(f"cov must have shape (..., 2, 2), got {cov.shape}")
    a, b, b2, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 0], cov[..., 1, 1]
    scale = np.maximum(np.abs(a) + np.abs(c), np.finfo(np.float64).tiny)
    if not np.all(np.isfinite(cov)):
        raise ValueError("cov must be finite")
    if np.any(np.abs(b - b2) > 1e-12 * scale):
        raise ValueError("cov must be symmetric")
    if np.any(a < 0) or np.any(c < 0) or np.any(a * c - b * b < -1e-10 * scale**2):
        raise ValueError("cov must be positive semidefinite")
    l11 = np.sqrt(a)
    l21 = np.where(a > 0, b / np.where(a > 0, l11, 1.0), 0.0)
    l22 = np.sqrt(np.clip(c - l21 * l21, 0.0, None))
    return l11, l21, l22


def _hermite_rule(n):
    x, w = hermgauss(n)
    return math.sqrt(2.0) * x, w / math.sqrt(math.pi)


def _radial_rule(n_per_panel, radius=12.0, panels=6):
    """Nodes and weights of int_0^radius r exp(-r^2/2) g(r) dr (composite Gauss-Legendre; the
    tail beyond r = 12 is below exp(-72) times the growth of g)."""
    s, ws = leggauss(n_per_panel)
    edges = np.linspace(0.0, radius, panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    r = ((0.5 * (edges[:-1] + edges[1:]))[:, None] + half[:, None] * s).ravel()
    w = (half[:, None] * ws).ravel() * r * np.exp(-0.5 * r * r)
    return r, w


def _polar_block(f, l11, l21, l22, n):
    # whitened z = r (cos t, sin t): u = L11 r cos t, v = r (L21 cos t + L22 sin t). Along a ray
    # the signs of u and v are fixed, so kinks of f on the axes u = 0, v = 0 (relu, step) sit at
    # the arc ends t = pi/2, 3pi/2 (u = 0) and t = phi, phi + pi (v = 0): Gauss-Legendre on each
    # arc between them converges geometrically, where a tensor Hermite grid cuts across them.
    phi = np.mod(np.arctan2(-l21, l22), np.pi)
    ones = np.ones_like(phi)
    ends = np.stack(
        [0 * ones, 0.5 * np.pi * ones, 1.5 * np.pi * ones, phi, phi + np.pi, 2 * np.pi * ones], -1
    )
    ends = np.sort(ends, axis=-1)
    t, wt = leggauss(max(n // 2, 2))
    lo, hi = ends[:, :-1, None], ends[:, 1:, None]
    theta = 0.5 * (lo + hi) + 0.5 * (hi - lo) * t  # (B, 5, nt)
    w_theta = 0.5 * (hi - lo) * wt
    r, w_r = _radial_rule(max(n // 4, 2))
    ct, st = np.cos(theta), np.sin(theta)
    u = (l11[:, None, None] * ct)[..., None] * r
    v = (l21[:, None, None] * ct + l22[:, None, None] * st)[..., None] * r
    val = np.broadcast_to(np.asarray(f(u, v), np.float64), u.shape)
    return np.einsum("bktr,bkt,r->b", val, w_theta, w_r) / (2.0 * np.pi)


def _hermite_block(f, l11, l21, l22, n):
    z, w = _hermite_rule(n)
    u = np.broadcast_to(l11[:, None, None] * z[:, None], (len(l11), n, n))
    v = l21[:, None, None] * z[:, None] + l22[:, None, None] * z[None, :]
    val = np.broadcast_to(np.asarray(f(u, v), np.float64), u.shape)
    return np.einsum("bij,i,j->b", val, w, w)


def gaussian_expectation_2d(
    f: Callable, cov, n: int = 64, *, method: str = "polar", chunk: int = 64
) -> np.ndarray:
    """E_{(u,v) ~ N(0, cov)}[f(u, v)] for each 2x2 covariance in a batch, in float64.

    cov: (..., 2, 2) symmetric positive semidefinite (singular blocks allowed: identical points
    have correlation 1, and u = v exactly); f: a numpy-vectorized function of two equal-shaped
    float64 arrays, of at most polynomial growth. Returns an array of shape cov.shape[:-2].

    Both rules write (u, v) = L z with L the lower Cholesky factor of cov and z ~ N(0, I_2):
      "polar" (default): z = r (cos t, sin t); t by Gauss-Legendre (n/2 nodes) on each arc between
          the angles where u = 0 or v = 0, r by composite Gauss-Legendre (6 panels of n/4 nodes)
          on [0, 12] against r exp(-r^2/2) / (2 pi). Exact to ~1e-14 at n = 64 for relu and step
          (kinks on the axes) as well as softplus and tanh.
      "hermite": the n x n tensor Gauss-Hermite rule (numpy's hermgauss, z_k = sqrt(2) x_k,
          weights w_k / sqrt(pi)). Spectrally accurate for analytic f only: at n = 64 it is off by
          ~1e-12 for softplus, ~1e-5 for tanh (poles at +-i pi/2), ~3e-3 for relu and ~1e-2 for
          step (measured over random covariances), so it is no reference for ReLU networks.
    """
    _check("method", method, QUADRATURES)
    if int(n) < 4:
        raise ValueError(f"n must be at least 4, got {n}")
    cov = np.asarray(cov, np.float64)
    l11, l21, l22 = (x.reshape(-1) for x in _cholesky_2x2(cov))
    block = _polar_block if method == "polar" else _hermite_block
    out = np.empty(l11.shape, np.float64)
    for s in range(0, len(l11), chunk):
        sl = slice(s, s + chunk)
        out[sl] = block(f, l11[sl], l21[sl], l22[sl], int(n))
    return out.reshape(cov.shape[:-2])


def arccos_expectation(cov, degree: int) -> np.ndarray:
    """Cho & Saul's arc-cosine closed forms for (u, v) ~ N(0, cov), cov = [[a, b], [b, c]]:

      degree 1: E[relu(u) relu(v)] = sqrt(a c) / (2 pi) (sin t + (pi - t) cos t),
      degree 0: E[step(u) step(v)] = (pi - t) / (2 pi),
    with t = arccos(b / sqrt(a c)); step(0) = 0, so a zero variance gives 0. cov: (..., 2, 2);
    returns cov.shape[:-2], float64.
    """
    _check("degree", degree, (0, 1))
    l11, l21, l22 = _cholesky_2x2(cov)
    sd_u = l11
    sd_v = np.sqrt(l21 * l21 + l22 * l22)
    # the angle between the two rows of L: well conditioned even at correlation +-1
    t = np.arctan2(l22 * sd_u, l21 * sd_u)
    t = np.where(sd_u * sd_v > 0, np.abs(t), np.pi)
    if degree == 0:
        return np.where(sd_u * sd_v > 0, (np.pi - t) / (2 * np.pi), 0.0)
    return sd_u * sd_v / (2 * np.pi) * (np.sin(t) + (np.pi - t) * np.cos(t))


# --------------------------------------------------------------------------- Du et al.'s limit kernel


def _moment(fn_uv, var, method, n):
    """E[fn(u, u)] for u ~ N(0, var), through the singular 2x2 block."""
    var = np.asarray(var, np.float64)
    cov = np.stack([np.stack([var, var], -1), np.stack([var, var], -1)], -2)
    return gaussian_expectation_2d(fn_uv, cov, n, method=method)


def c_sigma(activation: str, *, n: int = 64) -> float:
    """Du et al.'s c_sigma = 1 / E_{z ~ N(0,1)}[sigma(z)^2] (relu: exactly 2)."""
    _check("activation", activation, KERNEL_ACTIVATIONS)
    if activation == "relu":
        return 2.0
    sig = _NP_ACT[activation][0]
    return float(1.0 / _moment(lambda u, v: sig(u) * sig(v), 1.0, "polar", n))


def _blocks(K):
    d = np.diag(K)
    n = len(d)
    a = np.broadcast_to(d[:, None], (n, n))
    c = np.broadcast_to(d[None, :], (n, n))
    return np.stack([np.stack([a, K], -1), np.stack([K.T, c], -1)], -2)


def _pair_expectation(K, activation, derivative, method, n):
    """E_{(u,v) ~ N(0, A_ij)}[s(u) s(v)] for every pair, A_ij the 2x2 block of K, s = sigma or
    sigma'; relu with method None uses the arc-cosine closed forms."""
    A = _blocks(K)
    if activation == "relu" and method is None:
        return arccos_expectation(A, 0 if derivative else 1)
    s = _NP_ACT[activation][1 if derivative else 0]
    iu = np.triu_indices(len(K))
    upper = gaussian_expectation_2d(lambda u, v: s(u) * s(v), A[iu], n, method=method or "polar")
    E = np.empty_like(K)
    E[iu] = upper
    E.T[iu] = upper
    return E


def limit_ntk(
    x,
    depth: int,
    activation: str = "softplus",
    *,
    arch: str = "mlp",
    c_res: float = 1.0,
    method: str | None = None,
    n: int = 64,
) -> np.ndarray:
    """The limit Gram matrix K^(H) of Du, Lee, Li, Wang, Zhai (arXiv 1811.03804), float64 (N, N).

    Network ("mlp"): x^(0) = x, x^(h) = sqrt(c_sigma / m) sigma(W^(h) x^(h-1)) for h = 1..H,
    u(x) = a^T x^(H), every entry of W^(h) and a drawn from N(0, 1), c_sigma = 1/E_z[sigma(z)^2].
    K^(H) is the m -> infinity limit of their G^(H): the Gram matrix of the gradient with respect to
    the LAST hidden layer's weights only, G^(H)_ij = <du(x_i)/dW^(H), du(x_j)/dW^(H)> (the full
    NTK adds the other layers' Grams; G^(H) alone bounds its smallest eigenvalue from below).

      K^(0)_ij = <x_i, x_j>,
      K^(h)_ij = c_sigma E_{(u,v) ~ N(0, A^(h)_ij)}[sigma(u) sigma(v)]            h = 1..H-1,
      K^(H)_ij = c_sigma K^(H-1)_ij E_{(u,v) ~ N(0, A^(H)_ij)}[sigma'(u) sigma'(v)],
    with A^(h)_ij = [[K^(h-1)_ii, K^(h-1)_ij], [K^(h-1)_ji, K^(h-1)_jj]]: the last layer's kernel
    multiplies its INPUT's kernel K^(H-1) by the expectation over the covariance of its own
    pre-activations W^(H) x^(H-1), which is again the block of K^(H-1). For H = 1 this is the
    two-layer Gram c_sigma <x_i, x_j> E_{A(K^(0))}[sigma' sigma'].

    Network ("resnet", their section 6; H >= 2): x^(1) = sqrt(c_sigma/m) sigma(W^(1) x),
    x^(h) = x^(h-1) + c_res/(H sqrt m) sigma(W^(h) x^(h-1)) for h = 2..H, u = a^T x^(H). The
    residual branch meets the skip path through the mean of x^(h) along the all-ones direction,
    b_i^(h) = lim sum_r x^(h)_{i,r} / sqrt(m):
      K^(1) as above, b_i^(1) = sqrt(c_sigma) E_{u ~ N(0, K^(0)_ii)}[sigma(u)],
      K^(h)_ij = K^(h-1)_ij + (c_res/H) (b_i^(h-1) E_{v ~ N(0, K^(h-1)_jj)}[sigma(v)]
                                         + b_j^(h-1) E_{u ~ N(0, K^(h-1)_ii)}[sigma(u)])
                 + (c_res/H)^2 E_{A^(h)_ij}[sigma(u) sigma(v)],
      b_i^(h) = b_i^(h-1) + (c_res/H) E_{u ~ N(0, K^(h-1)_ii)}[sigma(u)]            h = 2..H-1,
      K^(H)_ij = (c_res/H)^2 K^(H-1)_ij E_{A^(H)_ij}[sigma'(u) sigma'(v)].
    (Derived from the network as written; checked against `empirical_ntk_gram` of `du_mlp` at
    width 1024 in the tests.)

    x: (N, d) inputs (Du et al. take them on the unit sphere, no two parallel); depth: H >= 1;
    activation: "relu", "softplus" or "tanh" (their theorems need a smooth one; relu is here for
    comparison). method: None (arc-cosine closed forms for relu, "polar" quadrature otherwise),
    "polar" or "hermite" (see `gaussian_expectation_2d`), with n nodes.
    """
    _check("activation", activation, KERNEL_ACTIVATIONS)
    _check("arch", arch, ARCHS)
    if method is not None:
        _check("method", method, QUADRATURES)
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, d), got {x.shape}")
    depth = int(depth)
    if depth < 1 or (arch == "resnet" and depth < 2):
        raise ValueError(f"depth must be >= {1 if arch == 'mlp' else 2} for arch={arch!r}")
    cs = c_sigma(activation, n=n)
    K = x @ x.T
    if arch == "mlp":
        for _ in range(1, depth):
            K = cs * _pair_expectation(K, activation, False, method, n)
        return cs * K * _pair_expectation(K, activation, True, method, n)

    sig = _NP_ACT[activation][0]

    def mean_sigma(diag):
        return _moment(lambda u, v: sig(u), diag, method or "polar", n)

    g = float(c_res) / depth
    b = math.sqrt(cs) * mean_sigma(np.diag(K))
    K = cs * _pair_expectation(K, activation, False, method, n)
    for _ in range(2, depth):
        m = mean_sigma(np.diag(K))
        cross = b[:, None] * m[None, :] + m[:, None] * b[None, :]
        K = K + g * cross + g * g * _pair_expectation(K, activation, False, method, n)
        b = b + g * m
    return g * g * K * _pair_expectation(K, activation, True, method, n)


def lambda_min(K) -> float:
    """Smallest eigenvalue of a symmetric matrix in float64 (Du et al.'s lambda_0 of K^(H))."""
    K = np.asarray(K, np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square matrix, got shape {K.shape}")
    return float(np.linalg.eigvalsh(0.5 * (K + K.T))[0])


def linear_rate_bound(loss0, lr, lambda0, steps):
    """Du et al.'s linear rate: ||y - u(t)||^2 <= (1 - lr lambda_0 / 2)^t ||y - u(0)||^2, for GD
    with step lr on (1/2) ||y - u||^2. loss0 = ||y - u(0)||^2; steps: int or array of t."""
    q = 1.0 - float(lr) * float(lambda0) / 2.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"lr * lambda0 / 2 must lie in [0, 1], got {1.0 - q}")
    return float(loss0) * q ** np.asarray(steps, np.float64)


# --------------------------------------------------------------------------- the network itself


def du_mlp(
    d_in: int,
    width: int,
    depth: int,
    *,
    activation: str = "softplus",
    arch: str = "mlp",
    c_res: float = 1.0,
    output_init: str = "gaussian",
) -> Model:
    """Du, Lee, Li, Wang, Zhai's networks in their exact parameterization, as a `Model`.

    "mlp":    x^(h) = sqrt(c_sigma / m) sigma(W^(h) x^(h-1)), h = 1..H;
    "resnet": x^(1) as above, x^(h) = x^(h-1) + c_res / (H sqrt(m)) sigma(W^(h) x^(h-1)), h >= 2;
    output u = a^T x^(H), shape (N, 1). m = width, H = depth, c_sigma = `c_sigma(activation)`.
    params = [{"w": W^(1)} (m, d_in), {"w": W^(h)} (m, m) ..., {"w": a^T} (1, m)], every entry
    N(0, 1) (output_init="sign": a_r = +-1). Du et al.'s G^(H) is
    `empirical_ntk_gram(model.apply, params, x, wrt=(depth - 1,))`, whose limit is `limit_ntk`.
    """
    _check("activation", activation, KERNEL_ACTIVATIONS)
    _check("arch", arch, ARCHS)
    _check("output_init", output_init, ("gaussian", "sign"))
    d_in, width, depth = int(d_in), int(width), int(depth)
    if d_in < 1 or width < 1:
        raise ValueError(f"d_in and width must be positive, got {d_in}, {width}")
    if depth < 1 or (arch == "resnet" and depth < 2):
        raise ValueError(f"depth must be >= {1 if arch == 'mlp' else 2} for arch={arch!r}")
    act = _JAX_ACT[activation]
    scale = math.sqrt(c_sigma(activation) / width)
    res = float(c_res) / (depth * math.sqrt(width))

    def init_fn(key):
        keys = jax.random.split(key, depth + 1)
        shapes = [(width, d_in)] + [(width, width)] * (depth - 1)
        params = [{"w": jax.random.normal(k, s)} for k, s in zip(keys[:-1], shapes, strict=True)]
        if output_init == "gaussian":
            a = jax.random.normal(keys[-1], (1, width))
        else:
            a = jax.random.rademacher(keys[-1], (1, width), dtype=jnp.float32)
        return params + [{"w": a}]

    def apply_features(params, x, mask=None):
        if len(params) != depth + 1:
            raise ValueError(f"params must have depth + 1 = {depth + 1} layers, got {len(params)}")
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != d_in:
            raise ValueError(f"x must have {d_in} features, got {h.shape[1]}")
        h = scale * act(h @ params[0]["w"].T)
        for p in params[1:-1]:
            pre = h @ p["w"].T
            h = scale * act(pre) if arch == "mlp" else h + res * act(pre)
        return h @ params[-1]["w"].T, h

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


# --------------------------------------------------------------------------- empirical NTK (JAX)


def empirical_ntk_gram(
    model_apply: Callable, params: Params, x_probe, wrt: Sequence[int] | None = None
) -> jax.Array:
    """Empirical NTK Gram matrix G_ij = <d f(x_i)/d theta, d f(x_j)/d theta>, shape (N, N).

    f = model_apply(params, x_probe) must be a scalar output per example, (N,) or (N, 1); theta
    is every array of params (a list of per-layer dicts), or, with wrt = layer indices (negative
    allowed), only the arrays of those layers: Du et al.'s G^(H) is wrt=(H - 1,), the last hidden
    layer's W^(H) (`du_mlp`). Computed as J J^T with J = d f / d theta_raveled (N, P) by reverse
    mode, so memory is N * P. Pure: jit with model_apply and wrt static
    (functools.partial), vmap over stacked params; float32 unless params are float64.
    """
    if wrt is None:
        idx = tuple(range(len(params)))
    else:
        idx = tuple(int(k) + len(params) if int(k) < 0 else int(k) for k in wrt)
        if not idx or any(k < 0 or k >= len(params) for k in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"wrt must be distinct layer indices of {len(params)} layers: {wrt}")
    n = x_probe.shape[0]

    def outputs(chosen):
        full = list(params)
        for k, p in zip(idx, chosen, strict=True):
            full[k] = p
        y = model_apply(full, x_probe)
        if y.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"model_apply output must have shape ({n},) or ({n}, 1), got {y.shape}"
            )
        return y.reshape(n)

    flat, unravel = ravel_pytree([params[k] for k in idx])
    J = jax.jacrev(lambda th: outputs(unravel(th)))(flat)
    return lax.stop_gradient(jnp.matmul(J, J.T, precision=lax.Precision.HIGHEST))


def gram_drift(G, G0) -> jax.Array:
    """Relative spectral distance ||G - G0||_2 / ||G0||_2 of Gram matrices (..., N, N)."""
    if jnp.shape(G) != jnp.shape(G0):
        raise ValueError(f"G and G0 must have the same shape, got {jnp.shape(G)}, {jnp.shape(G0)}")
    num = jnp.linalg.norm(G - G0, ord=2, axis=(-2, -1))
    return lax.stop_gradient(num / jnp.linalg.norm(G0, ord=2, axis=(-2, -1)))


def gram_min_eig(G) -> jax.Array:
    """Smallest eigenvalue of symmetric Gram matrices (..., N, N) (jit- and vmap-safe)."""
    G = jnp.asarray(G)
    return lax.stop_gradient(jnp.linalg.eigvalsh(0.5 * (G + jnp.swapaxes(G, -1, -2)))[..., 0])


# --------------------------------------------------------------------------- convolutional generator


def circulant(first_row) -> np.ndarray:
    """The circulant matrix U with U[i, j] = first_row[(j - i) mod n] (row i is the first row
    cyclically shifted right by i), float64 (n, n): U x is a circular correlation with first_row."""
    r = np.asarray(first_row, np.float64)
    if r.ndim != 1 or len(r) == 0:
        raise ValueError(f"first_row must be a non-empty vector, got shape {r.shape}")
    n = len(r)
    return r[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def generator_jacobian(U, C, v) -> np.ndarray:
    """Jacobian of Heckel & Soltanolkotabi's two-layer generator G(C) = relu(U C) v w.r.t. C.

    U: (n, n) fixed convolution, C: (n, k) trained coefficients, v: (k,) fixed output weights.
    dG_i / dC_{a,l} = v_l 1[(U C)_{il} > 0] U_{ia}; returned as (n, n * k) with column a * k + l,
    the order of C.ravel(). float64.
    """
    U, C, v = (np.asarray(a, np.float64) for a in (U, C, v))
    if U.ndim != 2 or C.ndim != 2 or v.ndim != 1:
        raise ValueError(f"U, C, v must be 2-D, 2-D, 1-D, got {U.shape}, {C.shape}, {v.shape}")
    if U.shape[1] != C.shape[0] or C.shape[1] != v.shape[0]:
        raise ValueError(f"U {U.shape}, C {C.shape} and v {v.shape} do not compose")
    D = (U @ C > 0) * v[None, :]  # (n, k)
    return (U[:, :, None] * D[:, None, :]).reshape(U.shape[0], -1)


def generator_dual_kernel(U) -> np.ndarray:
    """Dual kernel of the two-layer generator (Heckel & Soltanolkotabi, ICLR 2020), float64 (n, n):

      Sigma_ij = (1/2) (1 - arccos(<u_i, u_j> / (||u_i|| ||u_j||)) / pi) <u_i, u_j>,
    u_i the rows of U. It is exactly E[J J^T] for J = `generator_jacobian(U, C, v)` with C of iid
    N(0, omega^2) entries (any omega: relu' is scale-invariant) and v_l = +-1/sqrt(k), for every
    k: J J^T = (1/k) sum_l (1[U c_l > 0] 1[U c_l > 0]^T) o U U^T and P(u_i.c > 0, u_j.c > 0) =
    (pi - angle_ij) / (2 pi). The paper's kernel is this up to a constant factor, which moves
    no eigenvector (the authors' notebook divides (1 - arccos/pi) <u_i, u_j> by 6).
    """
    U = np.asarray(U, np.float64)
    if U.ndim != 2:
        raise ValueError(f"U must be 2-D, got shape {U.shape}")
    gram = U @ U.T
    norms = np.sqrt(np.diag(gram))
    denom = np.outer(norms, norms)
    cos = np.clip(np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0), -1.0, 1.0)
    return 0.5 * (1.0 - np.arccos(cos) / np.pi) * gram


def least_norm_solution(A, y, rcond: float | None = None) -> np.ndarray:
    """Minimum-norm least-squares solution A^+ y (the compressive-sensing baseline), float64.

    A: (m, n); y: (m,) or (m, r). Through the SVD A = U S V^T: A^+ y = V S^+ U^T y, singular
    values below rcond * s_max dropped (default max(m, n) * machine epsilon, numpy's convention).
    For m < n with full row rank it is the interpolant of smallest norm, A^T (A A^T)^{-1} y.
    """
    A = np.asarray(A, np.float64)
    y = np.asarray(y, np.float64)
    if A.ndim != 2 or y.ndim not in (1, 2) or y.shape[0] != A.shape[0]:
        raise ValueError(f"A must be (m, n) and y (m,) or (m, r), got {A.shape}, {y.shape}")
    Um, s, Vt = np.linalg.svd(A, full_matrices=False)
    tol = (max(A.shape) * np.finfo(np.float64).eps if rcond is None else rcond) * s.max(initial=0)
    inv = np.where(s > tol, 1.0 / np.where(s > tol, s, 1.0), 0.0)
    coeff = Um.T @ y
    coeff = inv * coeff if y.ndim == 1 else inv[:, None] * coeff
    return Vt.T @ coeff


# --------------------------------------------------------------------------- Gram observables


@functools.cache
def _c_sigma_cached(activation: str) -> float:
    return c_sigma(activation)


def du_layer_grams(
    params: Params, x, *, activation: str = "softplus", arch: str = "mlp", c_res: float = 1.0
) -> jax.Array:
    """Per-layer NTK Gram matrices of a `du_mlp` network, shape (H + 1, N, N), without the
    Jacobian: entry k is G^(k+1)_ij = <du(x_i)/dW_k, du(x_j)/dW_k> for params[k] = {"w": W_k}
    (k = H: the output weights a).

    Every layer is linear in its weight, z_k = h_{k-1} W_k^T (h_0 = x, h_H the last hidden
    layer), so du(x_i)/dW_k = delta_{k,i} h_{k-1,i}^T with delta_{k,i} = du(x_i)/dz_{k,i} and
      G^(k)_ij = <delta_{k,i}, delta_{k,j}> <h_{k-1,i}, h_{k-1,j}>;
    the deltas come from one reverse pass through additive taps on the pre-activations (u(x_i)
    depends on example i alone), so the cost is one forward and backward pass on the N probe
    inputs plus O(N^2 m) per layer, where `empirical_ntk_gram` holds the (N, P) Jacobian (P =
    2 m^2 + ... parameters: 2.7 GB at N = 20, m = 4096, H = 3). The sum over k is the full
    empirical NTK; entry H - 1 is Du et al.'s G^(H), whose m -> infinity limit is `limit_ntk`.
    activation, arch, c_res: those of the `du_mlp` that made params (width and depth are read
    from params). Pure, jit- and vmap-safe; equal to `empirical_ntk_gram(..., wrt=(k,))`.
    """
    _check("activation", activation, KERNEL_ACTIVATIONS)
    _check("arch", arch, ARCHS)
    depth = len(params) - 1
    width = params[0]["w"].shape[0]
    act = _JAX_ACT[activation]
    scale = math.sqrt(_c_sigma_cached(activation) / width)
    res = float(c_res) / (depth * math.sqrt(width))
    h0 = jnp.reshape(x, (x.shape[0], -1)).astype(params[0]["w"].dtype)
    dot = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)

    def forward(taps):
        inputs, h = [], h0
        for k, p in enumerate(params):
            inputs.append(h)
            z = dot(h, p["w"].T) + taps[k]
            if k == depth:
                return jnp.sum(z), inputs
            if k == 0 or arch == "mlp":
                h = scale * act(z)
            else:
                h = h + res * act(z)
        raise AssertionError("unreachable")

    taps = [jnp.zeros((h0.shape[0], p["w"].shape[0]), h0.dtype) for p in params]
    deltas, inputs = jax.grad(forward, has_aux=True)(taps)
    grams = [dot(d, d.T) * dot(h, h.T) for d, h in zip(deltas, inputs, strict=True)]
    return lax.stop_gradient(jnp.stack(grams))


GRAM_STATS = ("min_eig", "max_eig", "drift", "rel_drift", "ref_dev")


def ntk_gram_observables(
    probe,
    model: Model | None = None,
    *,
    layer_grams: Callable | None = None,
    wrt: Sequence[int] | None = None,
    prefix: str = "ntk",
    stats: Sequence[str] = ("min_eig", "drift", "rel_drift"),
    reference=None,
    n_probe: int | None = None,
    costly: bool = False,
) -> tuple:
    """Observables of the empirical NTK Gram matrix G(t) on a fixed probe set, recorded online.

    G(t) = sum_{k in wrt} G^(k)(t), G^(k)_ij = <d f(x_i)/d theta_k, d f(x_j)/d theta_k> over the
    weight layers k (`wrt`: layer indices, negative allowed; None: every layer, the full NTK; Du
    et al.'s G^(H) of a `du_mlp` is wrt=(H - 1,)), x_i the probe inputs: a RunData field name
    ("x_train", "x_eval", "x_test"; the first n_probe rows) or fixed inputs (n, ...). One
    observable `{prefix}_{stat}` per stat of `stats`, each a scalar:
      min_eig    lambda_min(G(t));            max_eig    lambda_max(G(t));
      drift      ||G(t) - G(0)||_2;           rel_drift  ||G(t) - G(0)||_2 / ||G(0)||_2;
      ref_dev    ||G(t) - R||_2 / ||R||_2 against a fixed `reference` matrix R (n, n), e.g. the
                 limit kernel `limit_ntk` of the probe inputs (needs reference).
    G(0) is the Gram matrix of the run's initial parameters (`RecordContext.init_params`,
    recomputed from the run's key as `relative_distance` and `flipped_patterns` do: nothing is
    carried). The Gram matrices come from `layer_grams(params, x) -> (L, n, n)` per-layer Grams
    (e.g. `functools.partial(du_layer_grams, activation=...)`: no Jacobian) or, without it, from
    `empirical_ntk_gram(model.apply, ...)` (J J^T by reverse mode, memory n * P). The observables
    of one call share one computation of G(t) and G(0) per record. Spectral norms and
    eigenvalues in the run's precision (float32 by default).
    """
    stats = tuple(stats)
    if not stats:
        raise ValueError("stats: at least one of " + ", ".join(GRAM_STATS))
    for s in stats:
        _check("stats", s, GRAM_STATS)
    if layer_grams is None and model is None:
        raise ValueError("model or layer_grams: one is needed to compute the Gram matrix")
    if layer_grams is not None and not callable(layer_grams):
        raise ValueError(
            f"layer_grams: expected a function (params, x) -> (L, n, n), got {layer_grams!r}"
        )
    ref = None
    if "ref_dev" in stats:
        if reference is None:
            raise ValueError("reference: the stat 'ref_dev' needs a reference matrix")
        ref = np.asarray(reference, np.float64)
        if ref.ndim != 2 or ref.shape[0] != ref.shape[1]:
            raise ValueError(f"reference: expected a square matrix, got shape {ref.shape}")
    from dynamics.representations import _probe_fn  # representations imports recording

    get = _probe_fn(probe, n_probe)
    layers = None if wrt is None else tuple(int(k) for k in wrt)

    def gram(params, x):
        n_layers = len(params)
        idx = tuple(range(n_layers)) if layers is None else layers
        idx = tuple(k + n_layers if k < 0 else k for k in idx)
        if not idx or any(k < 0 or k >= n_layers for k in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"wrt: must be distinct layer indices of {n_layers} layers: {layers}")
        if layer_grams is not None:
            g = layer_grams(params, x)
            return jnp.sum(g[jnp.asarray(idx)], axis=0)
        return empirical_ntk_gram(model.apply, params, x, idx)

    # the observables of one call run on the same RecordContext object within one record (one
    # trace): the first computes G(t) and G(0), the others reuse them
    cache: dict = {}

    def compute(ctx):
        hit = cache.get("ctx")
        if hit is not None and hit[0] is ctx:
            return hit[1]
        x = get(ctx)
        G = gram(ctx.params, x)
        out = {}
        if "min_eig" in stats or "max_eig" in stats:
            ev = jnp.linalg.eigvalsh(0.5 * (G + G.T))
            out["min_eig"], out["max_eig"] = ev[0], ev[-1]
        if "drift" in stats or "rel_drift" in stats:
            G0 = gram(ctx.init_params(), x)
            d = jnp.linalg.norm(G - G0, ord=2)
            out["drift"], out["rel_drift"] = d, d / jnp.linalg.norm(G0, ord=2)
        if ref is not None:
            R = jnp.asarray(ref, G.dtype)
            out["ref_dev"] = jnp.linalg.norm(G - R, ord=2) / jnp.linalg.norm(R, ord=2)
        out = {k: lax.stop_gradient(v) for k, v in out.items()}
        cache["ctx"] = (ctx, out)
        return out

    docs = {
        "min_eig": "smallest eigenvalue of the NTK Gram matrix on the probe set",
        "max_eig": "largest eigenvalue of the NTK Gram matrix on the probe set",
        "drift": "||G(t) - G(0)||_2 of the NTK Gram matrix on the probe set",
        "rel_drift": "||G(t) - G(0)||_2 / ||G(0)||_2 of the NTK Gram matrix on the probe set",
        "ref_dev": "||G(t) - R||_2 / ||R||_2, R a fixed reference (the limit kernel)",
    }
    where = "all layers" if layers is None else f"layers {list(layers)}"
    from dynamics.recording import Observable

    return tuple(
        Observable(
            f"{prefix}_{s}",
            functools.partial(lambda ctx, s: compute(ctx)[s], s=s),
            dims=(),
            costly=costly,
            doc=f"{docs[s]} ({where})",
        )
        for s in stats
    )
