"""Un-trained networks as image priors (P5 of REPRODUCTIONS.md): the deep decoder as its authors
build it, the two-layer convolutional generator, measurement operators, noise, PSNR, and the
observables that compare a fit with a clean reference it never sees.

Papers and code: Heckel & Hand, "Deep Decoder" (ICLR 2019, reinhardh/supplement_deep_decoder);
Heckel & Soltanolkotabi, "Denoising and regularization via exploiting the structural bias of
convolutional generators" (ICLR 2020, MLI-lab/overparameterized_convolutional_generators) and
"Compressive sensing with un-trained neural networks" (ICML 2020, MLI-lab/cs_deep_decoder).
File citations are in docs/protocols/P5.md.

Networks (`Model`s, pure, vmap-safe):
  `deep_decoder`         blocks  h <- BN(relu(resize(W_i h)))  with 1x1 convolutions W_i (no bias),
                         bilinear resizing to given sizes (PyTorch's align_corners=False), the
                         authors' BatchNorm over one image (channel norm with the biased variance,
                         affine), then sigmoid(W_out h); `doubling_sizes` (decodernw) and
                         `geometric_sizes` (the cs repo's deepdecoder) give their size schedules.
  `two_layer_generator`  G(C) = relu(U C) v, U a fixed (circulant) convolution, v fixed, C trained.
Data (host-side numpy, deterministic in `seed`): `fixed_input`, `add_noise`, `uniform_noise_like`,
  `pixel_mask`, `gaussian_operator`, `prior_data`, `fourier_signal`, `gaussian_kernel`.
Losses: `mask_loss` (and `dynamics.losses.measurement_loss` for y = A x).
Metrics: `psnr` (peak 1, the authors' `psnr(x_hat, x_true, maxv=1.)`), `least_norm_psnr`.
Observables: `clean_observables` (error and PSNR to the clean reference at every record),
  `target_observable` (the PSNR of the training target itself), `constant_observable`,
  `jacobian_observables` (top singular values / vectors of the output Jacobian, their overlap
  with a reference subspace and their drift from initialization; costly tier).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dynamics import models as _models
from dynamics import norms as _norms
from dynamics.data import Dataset
from dynamics.models import Model
from dynamics.recording import Observable

GAMMA_INITS = ("one", "uniform")

# --------------------------------------------------------------------------- bilinear resizing


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The matrix of PyTorch's linear interpolation along one axis, align_corners=False
    (`nn.Upsample(size=n_out, mode="bilinear")`, also its scale_factor=n_out/n_in), float64
    (n_out, n_in):

      src = max((i + 1/2) n_in / n_out - 1/2, 0),  i0 = floor(src),  i1 = min(i0 + 1, n_in - 1),
      out[i] = (1 - (src - i0)) x[i0] + (src - i0) x[i1].
    Only upsampling (n_out >= n_in) is supported: PyTorch does not antialias, jax.image.resize does.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < n_in:
        raise ValueError(f"linear_resize_matrix: need 1 <= n_in <= n_out, got {n_in}, {n_out}")
    i = np.arange(n_out)
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    M = np.zeros((n_out, n_in))
    np.add.at(M, (i, i0), 1.0 - lam)
    np.add.at(M, (i, i1), lam)
    return M


def _double(x, axis: int):
    """x2 linear upsampling along `axis` (align_corners=False): out[2i] = x[i-1]/4 + 3x[i]/4,
    out[2i+1] = 3x[i]/4 + x[i+1]/4, the edges repeated; a stencil instead of a dense matrix."""
    n = x.shape[axis]
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    last = lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :]
    return out.reshape(shape)


def upsample_linear(x, size: Sequence[int]):
    """Resize the trailing len(size) axes of x to `size` by PyTorch's (bi)linear interpolation
    with align_corners=False (`linear_resize_matrix` per axis; a stencil for exact doubling).
    x: (..., *spatial) -> (..., *size). Equal to jax.image.resize(method="linear") when upsampling.
    """
    size = tuple(int(s) for s in size)
    nd = len(size)
    if x.ndim < nd:
        raise ValueError(f"upsample_linear: x of shape {x.shape} has fewer than {nd} axes")
    for k, n_out in enumerate(size):
        axis = x.ndim - nd + k
        n_in = x.shape[axis]
        if n_out == n_in:
            continue
        if n_out == 2 * n_in:
            x = _double(x, axis)
            continue
        M = jnp.asarray(linear_resize_matrix(n_in, n_out).T, x.dtype)  # (n_in, n_out)
        x = jnp.moveaxis(jnp.tensordot(x, M, axes=([axis], [0])), -1, axis)
    return x


# --------------------------------------------------------------------------- the deep decoder


def _as_size(s, dim: int | None = None) -> tuple[int, ...]:
    if isinstance(s, int | np.integer):
        return (int(s),) * (2 if dim is None else dim)
    return tuple(int(v) for v in s)


def doubling_sizes(in_size, n_up: int) -> tuple[tuple[int, ...], ...]:
    """The authors' `decodernw(num_channels_up=[k] * n_up)` schedule: n_up + 1 blocks, block i
    doubling every spatial axis for i < n_up, the last block keeping the size (supplement and
    overparameterized repos, include/decoder.py). in_size: int (square) or a tuple."""
    s = _as_size(in_size)
    n_up = int(n_up)
    if n_up < 0:
        raise ValueError(f"n_up must be >= 0, got {n_up}")
    out = [tuple(v * 2 ** (i + 1) for v in s) for i in range(n_up)]
    return tuple(out + [out[-1] if out else s])


def geometric_sizes(in_size, out_size, depth: int) -> tuple[tuple[int, ...], ...]:
    """The cs repo's `deepdecoder(in_size, out_size, num_channels=[k] * depth)` schedule
    (MLI-lab/cs_deep_decoder include/decoder.py:24-80): every block upsamples, to
    ceil(scale^n in) with scale = (out/in)^(1/depth) for n = 1..depth-1, the last to out_size.
    16 -> 256 in 5 blocks: 28, 49, 85, 148, 256."""
    a, b = _as_size(in_size), _as_size(out_size)
    depth = int(depth)
    if depth < 1 or len(a) != len(b):
        raise ValueError(f"geometric_sizes: need depth >= 1 and matching sizes, got {a}, {b}")
    scale = [(bo / ai) ** (1.0 / depth) for ai, bo in zip(a, b, strict=True)]
    hidden = [
        tuple(int(np.ceil(sc**n * ai)) for sc, ai in zip(scale, a, strict=True))
        for n in range(1, depth)
    ]
    return tuple(hidden + [b])


def deep_decoder(
    channels: int,
    in_size,
    sizes: Sequence,
    *,
    out_channels: int = 1,
    in_channels: int | None = None,
    sigmoid: bool = True,
    eps: float = 1e-5,
    gamma_init: str = "one",
) -> Model:
    """The deep decoder as Heckel & Hand's code builds it (decodernw and deepdecoder, see the
    module docstring), for one image at a time (batch statistics = that image's statistics):

      h_0 = x,  h_i = gamma_i * N(relu(R_i(W_i h_{i-1}))) + beta_i   (i = 1..len(sizes)),
      y = sigmoid(W_out h_L),
    W_i: 1x1 convolutions, (channels, channels_in), no bias; R_i: (bi)linear resizing to sizes[i]
    with align_corners=False (identity where the size does not change; `upsample_linear`);
    N: PyTorch's BatchNorm2d in train mode over one image, N(h)[c] = (h[c] - mean h[c]) /
    sqrt(var h[c] + eps) with the biased variance over space (never eval mode, as in the authors'
    `fit`); W_out: 1x1 to out_channels, no bias. The convolution comes before the resizing (the
    authors' upsample_first=True order; for 1x1 convolutions without bias both orders are the
    same function, and this one convolves at the smaller size).

    Init: PyTorch's defaults, W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), beta = 0 and gamma = 1
    (gamma_init="one", PyTorch >= 1.2) or gamma ~ U(0, 1) ("uniform", PyTorch <= 1.1, probably the
    2019 supplement's). Params are laid out as `dynamics.deep_decoder`'s with norm="channel",
    affine=True ([{"w": (k, k_in, 1, ..), "gamma", "beta"}, ..., {"w": (out, k, 1, ..)}]), drawn
    identically from the same key. in_size: the input's spatial size (int: square 2-D; a tuple of
    one entry: 1-D); x: (batch, in_channels, *in_size) -> y: (batch, out_channels, *sizes[-1]).
    """
    if gamma_init not in GAMMA_INITS:
        raise ValueError(f"gamma_init must be one of {GAMMA_INITS}, got {gamma_init!r}")
    in_size = _as_size(in_size)
    dim = len(in_size)
    if dim not in (1, 2, 3) or min(in_size) < 1:
        raise ValueError(f"in_size must have 1-3 positive entries, got {in_size}")
    sizes = tuple(_as_size(s, dim) for s in sizes)
    if not sizes:
        raise ValueError("sizes: give the spatial size after each block (at least one)")
    prev = in_size
    for i, s in enumerate(sizes):
        if len(s) != dim or any(b < a for a, b in zip(prev, s, strict=True)):
            raise ValueError(f"sizes[{i}] = {s} must have {dim} entries, none below {prev}")
        prev = s
    channels = int(channels)
    in_channels = channels if in_channels is None else int(in_channels)
    if channels < 1 or in_channels < 1 or out_channels < 1:
        raise ValueError("channels, in_channels and out_channels must be positive")
    depth = len(sizes)
    ref = _models.deep_decoder(
        channels,
        depth,
        in_channels=in_channels,
        out_channels=out_channels,
        dim=dim,
        norm="channel",
        channel_form="var",
        affine=True,
        eps=eps,
        init="pytorch",
    )

    def init_fn(key):
        params = ref.init(key)
        if gamma_init == "uniform":
            keys = jax.random.split(jax.random.fold_in(key, 1), depth)
            for i in range(depth):
                params[i] = {**params[i], "gamma": jax.random.uniform(keys[i], (channels,))}
        return params

    shape1 = (1, -1) + (1,) * dim

    def conv(w, h):
        return jnp.einsum("oi,bi...->bo...", w.reshape(w.shape[:2]), h)

    def apply_features(params, x, mask=None):
        if x.shape[1:] != (in_channels, *in_size):
            raise ValueError(
                f"deep_decoder: x must be (batch, {in_channels}, {', '.join(map(str, in_size))}), "
                f"got {x.shape}"
            )
        h = x
        for i in range(depth):
            p = params[i]
            h = jax.nn.relu(upsample_linear(conv(p["w"], h), sizes[i]))
            h = _norms.channel_norm(h, eps=eps, form="var")
            h = h * p["gamma"].reshape(shape1) + p["beta"].reshape(shape1)
        y = conv(params[-1]["w"], h)
        return (jax.nn.sigmoid(y) if sigmoid else y), h

    return Model(init_fn, lambda params, x, mask=None: apply_features(params, x)[0], apply_features)


def n_params(model: Model) -> int:
    """Number of trained scalars of a model."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)))


# --------------------------------------------------------------------------- two-layer generator


def gaussian_kernel(n: int, sigma: float) -> np.ndarray:
    """The authors' Gaussian convolution kernel (kernels_and_associated_dual_kernels.ipynb),
    as the first row of a circulant: r[d] = exp(-p^2 / (sigma^2 n^2)), p = min(d, n - d) the
    circular distance, normalized to ||r||_2 = 1. float64 (n,)."""
    n = int(n)
    if n < 2 or not sigma > 0:
        raise ValueError(f"gaussian_kernel: need n >= 2 and sigma > 0, got {n}, {sigma}")
    d = np.arange(n)
    p = np.minimum(d, n - d).astype(np.float64)
    r = np.exp(-(p**2) / (float(sigma) ** 2 * n**2))
    return r / np.linalg.norm(r)


def generator_output_weights(k: int) -> np.ndarray:
    """v of the authors' two-layer generator (visualization_linear_approximation.ipynb):
    v_l = -1/sqrt(k) for l < k/2, +1/sqrt(k) otherwise. float64 (k,)."""
    k = int(k)
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    v = np.ones(k) / math.sqrt(k)
    v[: k // 2] *= -1.0
    return v


def two_layer_generator(U, k: int, *, omega: float = 1.0, v=None) -> Model:
    """Heckel & Soltanolkotabi's two-layer convolutional generator (ICLR 2020, section 3):

      G(C) = relu(U C) v,
    U: (n, n) fixed convolution (e.g. `kernels.circulant(gaussian_kernel(n, s))`), C: (n, k) the
    trained coefficients, initialized C_ij ~ N(0, omega^2) (scaled further by the run's
    init_scale), v: (k,) fixed (default `generator_output_weights(k)`, +-1/sqrt(k)). params =
    [{"w": C}]; apply(params, x) -> (batch, n): the generator has no input, x only sets the batch.
    Its Jacobian is `kernels.generator_jacobian`; `generator_gram` gives J J^T in closed form.
    """
    U = np.asarray(U, np.float64)
    if U.ndim != 2 or U.shape[0] != U.shape[1]:
        raise ValueError(f"U must be a square matrix, got shape {U.shape}")
    n, k = U.shape[0], int(k)
    v = generator_output_weights(k) if v is None else np.asarray(v, np.float64)
    if v.shape != (k,):
        raise ValueError(f"v must have shape ({k},), got {v.shape}")
    if not omega > 0:
        raise ValueError(f"omega must be positive, got {omega}")
    U32, v32 = jnp.asarray(U, jnp.float32), jnp.asarray(v, jnp.float32)

    def init_fn(key):
        return [{"w": float(omega) * jax.random.normal(key, (n, k))}]

    def apply_features(params, x, mask=None):
        C = params[0]["w"]
        h = jax.nn.relu(jnp.matmul(U32.astype(C.dtype), C))  # (n, k)
        g = h @ v32.astype(C.dtype)
        return jnp.broadcast_to(g, (x.shape[0], n)), h

    return Model(init_fn, lambda params, x, mask=None: apply_features(params, x)[0], apply_features)


def generator_gram(U, v=None) -> Callable:
    """gram(params) -> J J^T (n, n) of `two_layer_generator` in closed form (jnp, vmap-safe):

      J J^T = (U U^T) o (D diag(v^2) D^T),  D = 1[U C > 0] (n, k),
    since dG_i / dC_al = v_l 1[(U C)_il > 0] U_ia (`kernels.generator_jacobian`). v=None: the
    default v = +-1/sqrt(k), v^2 = 1/k with k read off C, so one gram serves every width."""
    U = jnp.asarray(np.asarray(U, np.float64), jnp.float32)
    v2 = None if v is None else jnp.asarray(np.asarray(v, np.float64) ** 2, jnp.float32)
    UUt = U @ U.T

    def gram(params):
        C = params[0]["w"]
        D = (U.astype(C.dtype) @ C > 0).astype(C.dtype)
        if v2 is None:
            return UUt.astype(C.dtype) * (D @ D.T) / C.shape[1]
        if v2.shape != (C.shape[1],):
            raise ValueError(f"generator_gram: v has {v2.shape[0]} entries, C {C.shape[1]} columns")
        return UUt.astype(C.dtype) * ((D * v2.astype(C.dtype)[None, :]) @ D.T)

    return gram


def fourier_signal(n: int, freqs: Sequence[int], seed: int = 0) -> np.ndarray:
    """A random signal in the span of the given Fourier frequencies: sum_f a_f cos(2 pi f t / n)
    + b_f sin(2 pi f t / n) (no sine for f = 0 or n/2), a, b ~ N(0, 1), scaled to unit L2 norm.
    float64 (n,)."""
    n = int(n)
    freqs = [int(f) for f in freqs]
    if not freqs or min(freqs) < 0 or max(freqs) > n // 2:
        raise ValueError(f"freqs must lie in 0..{n // 2}, got {freqs}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5]))
    t = np.arange(n)
    x = np.zeros(n)
    for f in freqs:
        x += rng.standard_normal() * np.cos(2 * np.pi * f * t / n)
        if 0 < f < n / 2:
            x += rng.standard_normal() * np.sin(2 * np.pi * f * t / n)
    return x / np.linalg.norm(x)


# --------------------------------------------------------------------------- data


def _rng(seed, tag: int) -> np.random.Generator:
    """One independent stream per kind of draw, so changing one draw never changes another."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), tag]))


def fixed_input(channels: int, in_size, seed: int = 0, low: float = 0.0, high: float = 0.1):
    """The decoder's fixed input tensor, uniform [low, high) (the authors' `fit`: uniform_() then
    *= 1/10), float32 (1, channels, *in_size)."""
    size = _as_size(in_size)
    return _rng(seed, 1).uniform(low, high, (1, int(channels), *size)).astype(np.float32)


def add_noise(clean, sigma: float, seed: int = 0) -> np.ndarray:
    """clip(clean + sigma z, 0, 1), z ~ N(0, 1) independently per pixel and channel (the
    authors' denoising notebooks: np.random.normal, then np.clip). float32, clean's shape."""
    clean = np.asarray(clean, np.float64)
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    z = _rng(seed, 2).standard_normal(clean.shape)
    return np.clip(clean + float(sigma) * z, 0.0, 1.0).astype(np.float32)


def uniform_noise_like(clean, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) noise rescaled to the L2 norm of `clean` (the "noise" target of
    denoising_MSE_curves.ipynb, Fig 1 of the ICLR 2020 paper). float32, clean's shape."""
    clean = np.asarray(clean, np.float64)
    u = _rng(seed, 3).uniform(0.0, 1.0, clean.shape)
    return (u * np.linalg.norm(clean) / np.linalg.norm(u)).astype(np.float32)


def pixel_mask(shape, p: float = 1 / 3, seed: int = 0) -> np.ndarray:
    """A random pixel mask keeping each pixel independently with probability p (the cs repo:
    `randint(3, size) < 1`, p = 1/3). float32 0/1 of `shape`."""
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1], got {p}")
    return (_rng(seed, 4).random(tuple(shape)) < p).astype(np.float32)


def gaussian_operator(m: int, n: int, seed: int = 0) -> np.ndarray:
    """Gaussian measurements A (m, n), entries N(0, 1/m) (the cs repo: `A = normal_(0, 1)`,
    `A *= 1/sqrt(m)`, applied as y = x A with A (n, m); here y = A x). float32."""
    m, n = int(m), int(n)
    if not 1 <= m or n < 1:
        raise ValueError(f"gaussian_operator: need m, n >= 1, got {m}, {n}")
    return (_rng(seed, 6).standard_normal((m, n)) / math.sqrt(m)).astype(np.float32)


def prior_data(x, target, reference, name: str = "prior") -> Dataset:
    """One fit as a `Dataset`: x_train = x (1, C_in, ...) the fixed input, y_train = target[None]
    (what the loss sees: a noisy image, masked pixels or measurements), x_test = x and y_test =
    reference[None], the clean signal the run never trains on (read by `clean_observables`)."""
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or x.shape[0] != 1:
        raise ValueError(f"x must have shape (1, channels, ...), got {x.shape}")
    t = np.asarray(target, np.float32)[None]
    r = np.asarray(reference, np.float32)[None]
    return Dataset(x, t, x.copy(), r, 0, str(name))


# --------------------------------------------------------------------------- losses and metrics


def mask_loss(mask) -> Callable:
    """Inpainting / compressive sensing with a pixel mask M (the cs repo's `mse(out * mask,
    img * mask)`): L = sum_i w_i mean_j (M_j (f(x_i)_j - y_ij))^2, the mean over ALL pixels j,
    masked-out ones included (they contribute 0). mask: one output's shape; target: (batch, ...)
    the masked image (the unobserved pixels' values never enter)."""
    M = jnp.asarray(np.asarray(mask, np.float32))

    def loss(pred, target, weights=None):
        if pred.shape[1:] != M.shape:
            raise ValueError(f"mask_loss: outputs {pred.shape[1:]} do not match the mask {M.shape}")
        d = (M[None] * (pred - target.reshape(pred.shape))).reshape(pred.shape[0], -1)
        per = jnp.mean(d**2, axis=1)
        if weights is None:
            return jnp.mean(per)
        return jnp.sum(jnp.where(weights > 0, per * weights, 0.0))

    return loss


def psnr(x_hat, x, peak: float = 1.0):
    """PSNR = 10 log10(peak^2 / mean((x_hat - x)^2)), peak 1 as in the authors' helpers.psnr
    (images in [0, 1]). Works on jnp and numpy arrays (mean over all entries)."""
    mse = jnp.mean((jnp.asarray(x_hat) - jnp.asarray(x)) ** 2)
    return 10.0 * jnp.log10(peak**2 / mse)


def least_norm_psnr(A, y, clean, peak: float = 1.0) -> float:
    """PSNR (float64) of the least-norm reconstruction A^+ y (`kernels.least_norm_solution`)
    against the clean image; A: (m, n), y: (m,), clean: n values."""
    from dynamics.kernels import least_norm_solution

    x = least_norm_solution(A, np.asarray(y, np.float64).ravel()).reshape(np.shape(clean))
    return float(10.0 * np.log10(peak**2 / np.mean((x - np.asarray(clean, np.float64)) ** 2)))


# --------------------------------------------------------------------------- observables


def _fit_output(ctx):
    # the authors evaluate net(ni) in train mode (their nets are never put in eval mode)
    return ctx.predict(ctx.data.x_train, train=True)[0]


@functools.cache
def clean_observables(peak: float = 1.0) -> tuple[Observable, Observable, Observable]:
    """Observables of the fit f = model(x_train) against the clean reference r = y_test, which
    the run never trains on (`prior_data`), at every record:

      clean_mse       = mean((f - r)^2)                  (the authors' mse_wrt_truth),
      clean_psnr      = 10 log10(peak^2 / clean_mse)     (their psnr, peak 1),
      clean_rel_error = ||f - r||_2 / ||r||_2.
    All over the first training example (one fit per run). Cached: the same objects for the same
    peak, so every static point of a sweep records equal observables."""

    def err(ctx):
        f = _fit_output(ctx)[:1]
        return f - ctx.data.y_test[:1].reshape(f.shape)

    def mse(ctx):
        return jnp.mean(err(ctx) ** 2)

    def rel(ctx):
        r = ctx.data.y_test[:1]
        return jnp.sqrt(jnp.sum(err(ctx) ** 2) / jnp.sum(r**2))

    return (
        Observable("clean_mse", mse, doc="mean squared error of the fit to the clean reference"),
        Observable(
            "clean_psnr",
            lambda ctx: 10.0 * jnp.log10(peak**2 / mse(ctx)),
            doc=f"PSNR of the fit to the clean reference, peak {peak:g}",
        ),
        Observable("clean_rel_error", rel, doc="||fit - clean||_2 / ||clean||_2"),
    )


@functools.cache
def target_observable(peak: float = 1.0) -> Observable:
    """target_psnr = 10 log10(peak^2 / mean((y_train - y_test)^2)): the PSNR of what the run
    fits (a noisy image; a masked image, which is A^+ y for a pixel mask) to the clean
    reference, computed from the run's data (the same at every record)."""

    def fn(ctx):
        t = ctx.data.y_train[:1]
        return psnr(t, ctx.data.y_test[:1].reshape(t.shape), peak)

    return Observable("target_psnr", fn, doc="PSNR of the training target to the clean reference")


def constant_observable(name: str, value: float, doc: str = "") -> Observable:
    """An Observable recording a number computed on the host before the run (e.g. a baseline's
    PSNR, `least_norm_psnr`), so that it is stored beside the run's own numbers."""
    v = float(value)
    return Observable(name, lambda ctx: jnp.full((), v, jnp.float32), doc=doc or name)


def output_gram(model: Model, x) -> Callable:
    """gram(params) -> J J^T (n_out, n_out) with J = d vec(model(params, x[:1])) / d params over
    every trained array (reverse mode: n_out vector-Jacobian products). jnp, vmap-safe."""

    def gram(params):
        def out(p):
            return model.apply(p, x[:1]).reshape(-1)

        J = jax.jacrev(out)(params)
        n = jax.eval_shape(out, params).shape[0]
        parts = [j.reshape(n, -1) for j in jax.tree.leaves(J)]
        return sum(jnp.matmul(a, a.T, precision=lax.Precision.HIGHEST) for a in parts)

    return gram


def _orthonormal_columns(V):
    """Gram-Schmidt on the columns of V (n, b), in order, each column orthogonalized twice
    against the earlier ones; pure jnp (no LAPACK call, see `top_eigvecs`), one small loop."""
    b = V.shape[1]
    tiny = jnp.finfo(V.dtype).tiny

    def column(j, Q):
        earlier = (jnp.arange(b) < j).astype(V.dtype)
        v = lax.dynamic_index_in_dim(V, j, axis=1, keepdims=False)
        for _ in range(2):
            v = v - Q @ (earlier * (Q.T @ v))
        v = v / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), tiny)
        return lax.dynamic_update_index_in_dim(Q, v, j, axis=1)

    return lax.fori_loop(0, b, column, jnp.zeros_like(V))


def top_eigvecs(G, top: int, iters: int = 64, power: int = 4):
    """(values, vectors) of the `top` largest eigenvalues of a symmetric positive semidefinite
    G (n, n), descending; vectors (top, n), each signed so that its largest-magnitude entry is
    positive. Subspace iteration V <- orth(G^power V) from a fixed start, `iters` times (the span
    of the first j vectors converges as (lambda_{j+1} / lambda_j)^(power iters)), values the
    Rayleigh quotients v_j^T G v_j. Pure jnp (matmuls and Gram-Schmidt): LAPACK's batched eigh
    (jnp.linalg.eigh under vmap) deadlocked in sweep programs sharded over several CPU devices.
    """
    n = G.shape[0]
    top, power = int(top), int(power)
    if not 1 <= top <= n or power < 1 or int(iters) < 1:
        raise ValueError(f"top_eigvecs: need 1 <= top <= {n}, power >= 1, iters >= 1")
    G = 0.5 * (G + G.T)
    scale = jnp.maximum(jnp.sqrt(jnp.sum(G * G)), jnp.finfo(G.dtype).tiny)
    Gp = G / scale
    for _ in range(power - 1):
        Gp = Gp @ (G / scale)
    V0 = jnp.asarray(np.random.default_rng(0).standard_normal((n, top)), G.dtype)
    V = lax.fori_loop(
        0, int(iters), lambda _, V: _orthonormal_columns(Gp @ V), _orthonormal_columns(V0)
    )
    w = jnp.sum(V * (G @ V), axis=0)
    order = jnp.argsort(-w)
    w, V = w[order], V[:, order].T
    idx = jnp.argmax(jnp.abs(V), axis=1)
    sign = jnp.sign(jnp.take_along_axis(V, idx[:, None], axis=1))
    return w, V * jnp.where(sign == 0, 1.0, sign)


def jacobian_observables(
    top: int,
    gram: Callable,
    *,
    reference=None,
    prefix: str = "jac",
) -> tuple[Observable, ...]:
    """Costly-tier observables of the Jacobian J of the network output w.r.t. its parameters,
    through gram(params) = J J^T (`generator_gram`, or `output_gram(model, x)` for any model):

      {prefix}_sv     (jac_index,)            s_1 >= ... >= s_top, singular values of J;
      {prefix}_vec    (jac_index, position)   the left singular vectors u_j (unit norm, signed
                                              so that the largest-magnitude entry is positive);
      {prefix}_drift  (jac_index,)            ||P0 u_j||^2, P0 the projection on the span of the
                                              top singular vectors at initialization: 1 = u_j
                                              has not left the initial leading subspace;
      {prefix}_ref    (jac_index,)            ||P_ref u_j||^2, P_ref the projection on the span
                                              of `reference` (top, n) (e.g. the dual kernel's
                                              leading eigenvectors); only if reference is given.
    Spans rather than single vectors, since a circulant U gives equal eigenvalue pairs (cos and
    sine of one frequency) whose vectors are fixed only up to a rotation."""
    top = int(top)
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")

    def spectrum(params):
        w, V = top_eigvecs(gram(params), top)
        return jnp.sqrt(jnp.maximum(w, 0.0)), V

    def overlap(V, B):
        # B (top, n) orthonormal rows; ||B u_j||^2 for each row u_j of V
        return jnp.sum((V @ B.T) ** 2, axis=1)

    obs = [
        Observable(
            f"{prefix}_sv",
            lambda ctx: spectrum(ctx.params)[0],
            dims=("jac_index",),
            costly=True,
            doc="top singular values of the output Jacobian",
        ),
        Observable(
            f"{prefix}_vec",
            lambda ctx: spectrum(ctx.params)[1],
            dims=("jac_index", "position"),
            costly=True,
            doc="top left singular vectors of the output Jacobian",
        ),
        Observable(
            f"{prefix}_drift",
            lambda ctx: overlap(spectrum(ctx.params)[1], spectrum(ctx.init_params())[1]),
            dims=("jac_index",),
            costly=True,
            doc="energy of each top singular vector in the initial top-singular subspace",
        ),
    ]
    if reference is not None:
        R = np.asarray(reference, np.float64)
        if R.ndim != 2 or R.shape[0] != top:
            raise ValueError(f"reference must be (top={top}, n), got shape {R.shape}")
        Q, _ = np.linalg.qr(R.T)
        B = jnp.asarray(Q.T, jnp.float32)
        obs.append(
            Observable(
                f"{prefix}_ref",
                lambda ctx: overlap(*(lambda V: (V, B.astype(V.dtype)))(spectrum(ctx.params)[1])),
                dims=("jac_index",),
                costly=True,
                doc="energy of each top singular vector in the reference subspace",
            )
        )
    return tuple(obs)


def dual_kernel_eigvecs(U, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors (top, n)) of the two-layer generator's dual kernel
    `kernels.generator_dual_kernel(U)`, the top `top`, descending, float64."""
    from dynamics.kernels import generator_dual_kernel

    w, V = np.linalg.eigh(generator_dual_kernel(U))
    return w[::-1][:top], V[:, ::-1][:, :top].T
