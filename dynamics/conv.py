"""Convolutions of the models, in the formulation that runs fast where the program runs.

`conv(x, w, stride, padding)` is the cross-correlation of `lax.conv_general_dilated`

    y[b, o, i] = sum_{c, t} w[o, c, t] x_pad[b, c, stride * i + t]

over 1 or 2 spatial axes (i and t multi-indices), x: (B, C, *spatial), w: (O, C, *kernel),
y: (B, O, *out), with x_pad the input padded as `padding` says:
  "zero":     zeros as lax's "SAME": out = ceil(n / stride), total padding
              max((out - 1) stride + k - n, 0), its floor half before and the rest after;
  "valid":    none, out = floor((n - k) / stride) + 1;
  "circular": periodic (wrap), (k - 1) // 2 before and the rest after, then "valid": out =
              ceil(n / stride), and with stride 1 the circular convolution of length n.

Every formulation computes these numbers, to float rounding (tests/test_conv.py), from
differentiable lax ops, so reverse mode, forward-over-reverse (Hessian-vector products) and
vmap all work through each:
  "xla":      `lax.conv_general_dilated`, XLA's own convolution;
  "patches":  the input channels-last, its k-tap windows gathered by k strided slices into a
              (B * out, k * C) patch matrix, one matrix product with the (O, k * C) kernel;
  "taps":     a sum over the k taps of (O, C) channel products of shifted inputs (no patch
              matrix: for few channels, where a product of inner dimension C * k does little).
A 1x1 convolution of stride 1 is always the contraction over channels (the same numbers; under
vmap XLA's SPMD partitioner miscompiles the grouped convolution a vmapped
conv_general_dilated becomes when the run axis is sharded over more devices than the layer
has output channels).

Why not XLA's convolution on the CPU (beyond a few channels): vmapped over runs, whose kernels
differ, a convolution becomes a grouped convolution (one group per run), which XLA's CPU backend
computes at 2-5% of the matmul peak, and a single run's convolution and its two gradient convolutions are no
faster on these small maps (`python -m bench --only conv` measures the forms per layer). The
patch form is a batched matrix product whose batch axis is the run axis (vmap of a dot_general
adds a batch dimension), which XLA's CPU backend runs near its dense speed.

Which formulation: `formulation=` (or the context `forced(name)`, or the environment variable
`DYNAMICS_CONV`, read at trace time) names one; otherwise `choose(x.shape, w.shape, stride,
padding)` picks the CPU's from the shape and every other platform keeps XLA's convolution,
through `lax.platform_dependent`, so a program lowered for an accelerator never contains the
CPU form.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

FORMULATIONS = ("xla", "patches", "taps")
PADDINGS = ("zero", "valid", "circular")
_DIMENSION_NUMBERS = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW")}

_forced: list[str] = []
_recording: list[list] = []


@contextlib.contextmanager
def forced(name: str | None):
    """Within the block, every `conv` traced without `formulation=` uses `name` ("auto" or None:
    the usual choice). A jitted function traced before keeps the formulation it was traced
    with: jit a new function inside the block."""
    if name is not None and name != "auto":
        _check_formulation(name)
    _forced.append(name or "auto")
    try:
        yield
    finally:
        _forced.pop()


class Call(NamedTuple):
    """One convolution met while tracing (`calls`): its shapes, stride, padding, and the
    formulation it computes with on the CPU (`choose`, unless one was named)."""

    x_shape: tuple
    w_shape: tuple
    stride: int
    padding: str
    cpu: str


def calls(fn, *args) -> list[Call]:
    """Every convolution `fn(*args)` computes through `conv`, in order (traced abstractly with
    `jax.eval_shape`, nothing is computed): e.g. `calls(model.apply, params, x)`."""
    import jax

    _recording.append([])
    try:
        jax.eval_shape(fn, *args)
    finally:
        found = _recording.pop()
    return found


def _check_formulation(name):
    if name not in FORMULATIONS:
        raise ValueError(f"conv formulation must be one of {FORMULATIONS}, got {name!r}")


def _requested(formulation: str | None) -> str:
    if formulation is not None:
        return formulation
    if _forced:
        return _forced[-1]
    return os.environ.get("DYNAMICS_CONV", "auto") or "auto"


# --------------------------------------------------------------------------- geometry


def out_size(n: int, k: int, stride: int, padding: str) -> int:
    """Output length of one spatial axis of length n, kernel k (see the module docstring)."""
    if padding == "valid":
        return (n - k) // stride + 1
    return -(-n // stride)


def _pads(n: int, k: int, stride: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "circular":
        return (k - 1) // 2, k - 1 - (k - 1) // 2
    total = max((out_size(n, k, stride, padding) - 1) * stride + k - n, 0)
    return total // 2, total - total // 2


def _check(x_shape, w_shape, stride: int, padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    nd = len(w_shape) - 2
    if nd not in (1, 2):
        raise ValueError(
            f"conv kernel w: expected (out, in, k) or (out, in, kh, kw), got {w_shape}"
        )
    if len(x_shape) != nd + 2:
        raise ValueError(
            f"conv input x: expected (batch, channels) + {nd} spatial axes for a kernel of shape "
            f"{tuple(w_shape)}, got {tuple(x_shape)}"
        )
    if x_shape[1] != w_shape[1]:
        raise ValueError(
            f"conv input x: {x_shape[1]} channels, but the kernel w {tuple(w_shape)} takes "
            f"{w_shape[1]}"
        )
    if int(stride) < 1:
        raise ValueError(f"conv stride must be a positive integer, got {stride}")
    for n, k in zip(x_shape[2:], w_shape[2:], strict=True):
        if padding == "valid" and k > n:
            raise ValueError(
                f"conv: kernel {tuple(w_shape[2:])} larger than the input "
                f"{tuple(x_shape[2:])} with padding 'valid'"
            )


def pad(x, kernel: Sequence[int], stride: int, padding: str):
    """x (B, C, *spatial) padded on its spatial axes as `padding` says, ready for a "valid"
    convolution of `kernel` and `stride` (circular: periodic, zero: zeros as lax's SAME)."""
    widths = [(0, 0), (0, 0)] + [
        _pads(n, k, stride, padding) for n, k in zip(x.shape[2:], kernel, strict=True)
    ]
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths, mode="wrap" if padding == "circular" else "constant")


# --------------------------------------------------------------------------- formulations


def conv_xla(x, w, stride: int = 1, padding: str = "zero"):
    """The reference: `lax.conv_general_dilated` (circular padding by a periodic pad first)."""
    nd = w.ndim - 2
    if padding == "circular":
        x, pad_mode = pad(x, w.shape[2:], stride, padding), "VALID"
    else:
        pad_mode = "SAME" if padding == "zero" else "VALID"
    return lax.conv_general_dilated(
        x, w, (stride,) * nd, pad_mode, dimension_numbers=_DIMENSION_NUMBERS[nd]
    )


def _live_taps(spatial, kernel, stride: int, padding: str) -> list[int]:
    """The taps (flat indices, C order) whose windows meet the input for some output position.
    With zero padding on a small map a tap can see only padding (a 3x3 kernel of stride 2 on a
    2x2 map: 5 of its 9 taps), and its products are exact zeros, so skipping it changes no sum
    (unless the kernel holds an infinity or a NaN, whose product with zero is NaN)."""
    live_axes = []
    for n, k in zip(spatial, kernel, strict=True):
        lo = _pads(n, k, stride, padding)[0]
        o = out_size(n, k, stride, padding)
        live_axes.append(
            [
                padding != "zero" or any(lo <= t + stride * i < lo + n for i in range(o))
                for t in range(k)
            ]
        )
    taps = itertools.product(*[range(k) for k in kernel])
    return [
        j
        for j, t in enumerate(taps)
        if all(live[ti] for live, ti in zip(live_axes, t, strict=True))
    ]


def _windows(xp, kernel, stride: int, out: Sequence[int], axes: Sequence[int], taps):
    """The strided views xp[..., t + stride * i, ...] (i < out) of the padded input along
    `axes`, one per tap t of `taps` (flat indices into the kernel, C order)."""
    views = []
    for j in taps:
        t = np.unravel_index(j, kernel)
        start = [0] * xp.ndim
        limit = list(xp.shape)
        strides = [1] * xp.ndim
        for a, ti, o in zip(axes, t, out, strict=True):
            ti = int(ti)
            start[a], limit[a], strides[a] = ti, ti + stride * (o - 1) + 1, stride
        views.append(lax.slice(xp, start, limit, strides))
    return views


def conv_patches(x, w, stride: int = 1, padding: str = "zero"):
    """Patch matrix and one product: channels-last windows (B * out, k * C) times the kernel
    (O, k * C) reordered to (tap, channel), back to (B, O, *out); k: the taps that meet the
    input (`_live_taps`)."""
    nd = w.ndim - 2
    kernel = w.shape[2:]
    B, C, O = x.shape[0], x.shape[1], w.shape[0]
    out = [out_size(n, k, stride, padding) for n, k in zip(x.shape[2:], kernel, strict=True)]
    taps = _live_taps(x.shape[2:], kernel, stride, padding)
    xl = jnp.moveaxis(pad(x, kernel, stride, padding), 1, -1)  # (B, *spatial, C)
    views = _windows(xl, kernel, stride, out, range(1, nd + 1), taps)
    k = len(views)
    p = jnp.stack(views, axis=-2).reshape(B * math.prod(out), k * C)  # rows (b, i), cols (t, c)
    wt = w.reshape(w.shape[:2] + (-1,))
    if k < wt.shape[-1]:
        wt = jnp.stack([wt[:, :, t] for t in taps], axis=2)
    wm = jnp.swapaxes(wt, 1, 2).reshape(O, k * C)
    y = jnp.dot(p, wm.T)  # (B * out, O)
    return jnp.moveaxis(y.reshape((B, *out, O)), -1, 1)


def conv_taps(x, w, stride: int = 1, padding: str = "zero"):
    """Shift and add: y = sum_t W_t x_pad[..., t + stride * i] with W_t = w[:, :, t] (O, C),
    over the taps that meet the input (`_live_taps`)."""
    nd = w.ndim - 2
    kernel = w.shape[2:]
    out = [out_size(n, k, stride, padding) for n, k in zip(x.shape[2:], kernel, strict=True)]
    taps = _live_taps(x.shape[2:], kernel, stride, padding)
    views = _windows(pad(x, kernel, stride, padding), kernel, stride, out, range(2, nd + 2), taps)
    wt = w.reshape(w.shape[:2] + (-1,))
    C = x.shape[1]
    y = None
    for t, v in zip(taps, views, strict=True):
        if C == 1:  # an outer product: an elementwise multiply XLA fuses with the sum
            term = wt[None, :, 0, t].reshape((1, -1) + (1,) * nd) * v
        else:
            term = jnp.einsum("oc,bc...->bo...", wt[:, :, t], v)
        y = term if y is None else y + term
    return y


def conv_channels(x, w):
    """A 1x1 convolution of stride 1: the contraction over channels."""
    return jnp.einsum("oi,bi...->bo...", w.reshape(w.shape[:2]), x)


_FORMS = {"xla": conv_xla, "patches": conv_patches, "taps": conv_taps}


# --------------------------------------------------------------------------- choice


def choose(x_shape, w_shape, stride: int = 1, padding: str = "zero") -> str:
    """The CPU formulation of a convolution of these shapes, from measurements of whole
    networks' training gradients (`bench.gradient_forms`: 20-100 SGD steps in a scan, runs
    vmapped and sharded over 2 CPU devices, milliseconds per call):

      2 spatial axes, more than 2 input or output channels: "patches" (the 4-layer stride-2
          CNN on 16x16 digits, batch 64, 8 runs per device: channels (16, 32, 64) 872 us per
          step of its 16 -> 32 layer against XLA's 10956 us; channels (4, 4, 4) 29.4 ms against
          XLA's 83.5 ms, (8, 16, 16) 60.9 against 653.5; (2, 2, 2) 29.3 against 32.6 at batch
          64 and 3.6 against 2.9 at batch 8, a tie);
      1 spatial axis, more than 8 channels: "patches" (the 12-layer 1-D decoder, kernel 3,
          4 runs per device, batch 1: 16 channels, 1024 positions 452 ms against XLA's 1182,
          128 positions 74 against 120);
      otherwise "xla", whose grouped convolution is cheap at so few channels (the decoder at
          8 channels: 22 ms against patches' 30 and taps' 37 at 128 positions, 216 against 278
          at 1024; at 4 channels 57 against 115; the single-channel linear conv nets of
          channel_norm_depth, 15 taps, batch 1, 16 runs per device, 128 positions: 11 ms
          against shifted taps' 32; 32 to 512 positions, 1 to 16 runs per device: XLA's 2 to 6
          times faster than taps).
    "taps" is never chosen on these measurements; it stays a formulation to name.
    """
    del stride, padding
    O, C = w_shape[0], w_shape[1]
    most = 2 if len(x_shape) - 2 >= 2 else 8
    return "patches" if max(C, O) > most else "xla"


def conv(x, w, stride: int = 1, padding: str = "zero", *, formulation: str | None = None):
    """The convolution of the module docstring: x (B, C, *spatial) with w (O, C, *kernel), 1 or
    2 spatial axes, -> (B, O, *out). `formulation`: one of FORMULATIONS, or None / "auto" for
    `choose`'s on the CPU and XLA's convolution elsewhere (`lax.platform_dependent`)."""
    stride = int(stride)
    _check(x.shape, w.shape, stride, padding)
    name = _requested(formulation)
    if name != "auto":
        _check_formulation(name)
    one_by_one = all(k == 1 for k in w.shape[2:]) and stride == 1
    cpu = "channels" if one_by_one else choose(x.shape, w.shape, stride, padding)
    for found in _recording:
        found.append(
            Call(tuple(x.shape), tuple(w.shape), stride, padding, cpu if name == "auto" else name)
        )
    if one_by_one:
        return conv_channels(x, w)
    if name != "auto":
        return _FORMS[name](x, w, stride, padding)
    if cpu == "xla":
        return conv_xla(x, w, stride, padding)
    return lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: _FORMS[cpu](x, w, stride, padding),
        default=lambda x, w: conv_xla(x, w, stride, padding),
    )
