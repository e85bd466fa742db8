"""Models as `Model(init, apply)` pairs of pure functions over plain pytrees.

`params = init(key)` is a list with one dict per layer, so "layer k" means the same thing in
every observable; `y = apply(params, x, mask=None)` runs a batch, and layers that mix examples
(batch norm) only pool the examples `mask` keeps. `apply_features(params, x, mask=None)`
returns `(y, h)` with h the input of the last layer (penultimate features).

A layer dict holds its weight under one of three forms, read by `layer_weight`:
  {"w": W}                  plain weight;
  {"v": V, "g": g}          weight norm, W[i] = g[i] V[i] / ||V[i]||;
  {"v": V, "rho": rho}      Lagrange-multiplier form, W = rho V with ||V||_F = 1;
plus optional "b" (bias), "gamma"/"beta" (affine normalization) and, for blocks with a second
matrix, "w2". Dense weights are (out, in); conv kernels (out, in, *kernel).

Initialization (`init=`), with fan_in = in * prod(kernel) and `gain` (default sqrt 2 after ReLU,
1 otherwise); "gaussian" and "uniform" give entries of variance gain^2 / fan_in:
  "gaussian":    W_ij ~ N(0, gain^2 / fan_in)
  "uniform":     W_ij ~ U(-a, a), a = gain sqrt(3 / fan_in)   (PyTorch's default is gain = 1/sqrt 3)
  "orthogonal":  W = gain Q, Q with orthonormal rows (out <= fan_in: entry variance gain^2/fan_in)
                 or columns (out > fan_in: gain^2/out); conv kernels through the (out, in*k) reshape
  "frobenius":   W = scale G / ||G||_F with G Gaussian, so ||W||_F = scale for every layer.
Parameterization (`parameterization=`):
  "standard":    layer output = W x, W initialized as above;
  "ntk":         layer output = (gain / sqrt(fan_in)) W x with W stored divided by that factor, so
                 the function at initialization is the same and only the gradient scale differs.
                 Observables (norms, spectra, rho) read the stored, trained W, not (gain/sqrt(fan_in)) W.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dynamics import norms as _norms

Params = list[dict[str, Any]]

INITS = ("gaussian", "uniform", "orthogonal", "frobenius")
PARAMETERIZATIONS = ("standard", "ntk")
WEIGHT_PARAMS = ("plain", "weight", "lagrange")
ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "linear": lambda x: x,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}


class Dense(NamedTuple):
    """What a plain MLP is, for the compiled CPU gradient (`dynamics.native.dense_loss_fn`):
    h_0 = x (flattened), h_k = act(c_k h_{k-1} W_k^T + b_k), y = c_L h_{L-1} W_L^T + b_L, with
    params [{"w": W_k} (and "b": b_k with bias), ...], c_k = multipliers[k - 1]."""

    widths: tuple[int, ...]
    activation: str
    bias: bool
    multipliers: tuple[float, ...]


class Model(NamedTuple):
    """A network as pure functions: `init(key) -> params`, `apply(params, x, mask=None) -> y`.

    `apply_features(params, x, mask=None) -> (y, h)` also returns the penultimate features
    (the input of the last layer), which neural-collapse observables read; None if unknown.
    `dense` describes a plain MLP (`Dense`: no normalization, plain weights), whose training
    gradient a compiled kernel computes on the CPU for the activations it knows
    (`native.dense_eligible`); None for every other network.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    apply_features: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    dense: Dense | None = None


# --------------------------------------------------------------------------- weights


def layer_weight(p: dict) -> jax.Array:
    """The effective weight of one layer dict (see the module docstring for the forms)."""
    if "w" in p:
        return p["w"]
    if "v" in p and "g" in p:
        return _norms.weight_norm(p["v"], p["g"])
    if "v" in p and "rho" in p:
        return _norms.lagrange_weight(p["v"], p["rho"])
    if "kernel" in p:  # flax: (..., in, out) -> (out, ..., in)
        return jnp.moveaxis(p["kernel"], -1, 0)
    for v in p.values():  # a flax submodule nesting its own params
        if isinstance(v, dict):
            try:
                return layer_weight(v)
            except KeyError:
                continue
    raise KeyError(f"no weight in layer with keys {sorted(p)}")


def layer_weights(params: Params) -> list[jax.Array]:
    """Effective weights of every layer as matrices (out, in * prod(kernel))."""
    out = []
    for p in params:
        w = layer_weight(p)
        out.append(w.reshape(w.shape[0], -1) if w.ndim != 2 else w)
    return out


def scale_weights(params: Params, s) -> Params:
    """Multiply every layer's weight by s (so each ||W_k||_F is multiplied by |s|)."""
    out = []
    for p in params:
        q = dict(p)
        if "w" in q:
            q["w"] = q["w"] * s
        elif "g" in q:
            q["g"] = q["g"] * s
        elif "rho" in q:
            q["rho"] = q["rho"] * s
        elif "kernel" in q:
            q["kernel"] = q["kernel"] * s
        out.append(q)
    return out


def _sample(key, shape, fan_in, init, gain, scale):
    if init == "gaussian":
        return gain / math.sqrt(fan_in) * jax.random.normal(key, shape)
    if init == "uniform":
        a = gain * math.sqrt(3.0 / fan_in)
        return jax.random.uniform(key, shape, minval=-a, maxval=a)
    if init == "orthogonal":
        flat = (shape[0], math.prod(shape[1:]))
        return gain * jax.nn.initializers.orthogonal()(key, flat).reshape(shape)
    if init == "frobenius":
        g = jax.random.normal(key, shape)
        return scale * g / jnp.linalg.norm(g.ravel())
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


class _WeightCfg(NamedTuple):
    init: str
    gain: float
    scale: float
    parameterization: str
    weight_param: str


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _cfg(init, gain, scale, parameterization, weight_param, activation) -> _WeightCfg:
    _check("init", init, INITS)
    _check("parameterization", parameterization, PARAMETERIZATIONS)
    _check("weight_param", weight_param, WEIGHT_PARAMS)
    if gain is None:
        gain = math.sqrt(2.0) if activation == "relu" else 1.0
    return _WeightCfg(init, float(gain), float(scale), parameterization, weight_param)


def _multiplier(cfg: _WeightCfg, fan_in: int) -> float:
    return cfg.gain / math.sqrt(fan_in) if cfg.parameterization == "ntk" else 1.0


def _new_weight(key, shape, cfg: _WeightCfg) -> dict:
    fan_in = math.prod(shape[1:])
    w = _sample(key, shape, fan_in, cfg.init, cfg.gain, cfg.scale) / _multiplier(cfg, fan_in)
    if cfg.weight_param == "weight":
        g = jnp.linalg.norm(w.reshape(shape[0], -1), axis=1)
        return {"v": w, "g": g}
    if cfg.weight_param == "lagrange":
        rho = jnp.linalg.norm(w.ravel())
        return {"v": w / rho, "rho": rho}
    return {"w": w}


def _dense(p, x, c):
    y = c * (x @ layer_weight(p).T)
    return y + p["b"][None, :] if "b" in p else y


def _pad_spatial(x, kernel, padding):
    if padding != "circular":
        return x
    widths = [(0, 0), (0, 0)] + [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    return jnp.pad(x, widths, mode="wrap")


_DIMENSION_NUMBERS = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW")}


def _conv(p, x, c, stride, padding):
    w = layer_weight(p)
    nd = w.ndim - 2
    if all(k == 1 for k in w.shape[2:]) and stride == 1:
        # A 1x1 convolution as a contraction over channels (the same numbers): vmapped over
        # runs, conv_general_dilated becomes a grouped convolution that XLA's SPMD partitioner
        # miscompiles when the run axis is sharded and the layer has fewer output channels than
        # devices ("output feature dimension ... divisible by feature_group_count").
        y = c * jnp.einsum("oi,bi...->bo...", w.reshape(w.shape[:2]), x)
        return y + p["b"].reshape((1, -1) + (1,) * nd) if "b" in p else y
    x = _pad_spatial(x, w.shape[2:], padding)
    pad = {"circular": "VALID", "valid": "VALID", "zero": "SAME"}[padding]
    y = c * lax.conv_general_dilated(
        x, w, (stride,) * nd, pad, dimension_numbers=_DIMENSION_NUMBERS[nd]
    )
    if "b" in p:
        y = y + p["b"].reshape((1, -1) + (1,) * nd)
    return y


def _affine(p, x):
    if "gamma" in p:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = x * p["gamma"].reshape(shape) + p["beta"].reshape(shape)
    return x


NORMS = (None, "batch", "channel")


def _normalize(p, x, mask, norm, bn_p, bn_k, eps):
    if norm is None:
        return x
    if norm == "batch":
        x = _norms.batch_norm(x, mask, p=bn_p, k=bn_k, eps=eps)
    elif norm == "channel":
        x = _norms.channel_norm(x, eps=eps)
    return _affine(p, x)


def _norm_params(width, norm, affine):
    if norm is not None and affine:
        return {"gamma": jnp.ones((width,)), "beta": jnp.zeros((width,))}
    return {}


# --------------------------------------------------------------------------- MLPs


def mlp(
    widths: Sequence[int],
    *,
    activation: str = "relu",
    bias: bool = False,
    norm: str | None = None,
    bn_p: str = "l2",
    bn_k: int = 10,
    affine: bool = False,
    eps: float = 1e-5,
    weight_param: str = "plain",
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
) -> Model:
    """Fully connected network  h_0 = x,  h_k = act(N(W_k h_{k-1} + b_k)),  y = W_L h_{L-1} + b_L.

    widths = (d_in, h_1, ..., d_out) gives len(widths) - 1 weight layers. With bias=False and
    norm=None it is the deep homogeneous ReLU network; with activation="linear" a deep linear
    network. norm: None, "batch" (Lp batch norm over the kept examples, `bn_p` in l2/l1/linf,
    before the activation as in Xu et al. 2023) on every hidden layer. weight_param: "plain",
    "weight" (weight norm) or "lagrange" (W = rho V) on every layer. Inputs of more than one
    feature axis are flattened.
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2:
        raise ValueError("mlp needs at least (d_in, d_out)")
    _check("activation", activation, tuple(ACTIVATIONS))
    _check("norm", norm, (None, "batch"))
    cfg = _cfg(init, gain, scale, parameterization, weight_param, activation)
    act = ACTIVATIONS[activation]
    n_layers = len(widths) - 1
    mults = [_multiplier(cfg, widths[i]) for i in range(n_layers)]

    def init_fn(key):
        keys = jax.random.split(key, n_layers)
        params = []
        for i in range(n_layers):
            p = _new_weight(keys[i], (widths[i + 1], widths[i]), cfg)
            if bias:
                p["b"] = jnp.zeros((widths[i + 1],))
            if i < n_layers - 1:
                p.update(_norm_params(widths[i + 1], norm, affine))
            params.append(p)
        return params

    def apply_features(params, x, mask=None):
        h = x.reshape(x.shape[0], -1)
        for i in range(n_layers - 1):
            h = _dense(params[i], h, mults[i])
            h = act(_normalize(params[i], h, mask, norm, bn_p, bn_k, eps))
        return _dense(params[-1], h, mults[-1]), h

    plain = norm is None and weight_param == "plain"
    dense = Dense(widths, activation, bias, tuple(mults)) if plain else None
    return Model(
        init_fn,
        lambda params, x, mask=None: apply_features(params, x, mask)[0],
        apply_features,
        dense,
    )


def deep_linear(widths: Sequence[int], **kwargs) -> Model:
    """Deep linear network y = W_L ... W_1 x (an `mlp` with identity activation, no bias)."""
    return mlp(widths, activation="linear", **kwargs)


# --------------------------------------------------------------------------- convolutions


def linear_conv1d(
    depth: int,
    *,
    kernel: int = 15,
    channels: int = 1,
    padding: str = "circular",
    norm: str | None = None,
    eps: float = 1e-5,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    weight_param: str = "plain",
) -> Model:
    """Deep linear 1-D convolutional network (Dai & Heckel 2019, section 4).

    x_0 = x, x_k = N(w_k * x_{k-1}) for k < depth, y = w_depth * x_{depth-1}, with * the
    convolution of `kernel` taps (circular padding keeps the length), no bias and `channels`
    channels throughout (1: the single-channel network). norm: None or "channel".
    x: (batch, channels, n) -> y: (batch, channels, n).
    """
    _check("norm", norm, (None, "channel"))
    _check("padding", padding, ("circular", "zero"))
    cfg = _cfg(init, gain, scale, parameterization, weight_param, "linear")
    c = _multiplier(cfg, channels * kernel)

    def init_fn(key):
        keys = jax.random.split(key, depth)
        return [_new_weight(k, (channels, channels, kernel), cfg) for k in keys]

    def apply_features(params, x, mask=None):
        h = x
        for i in range(depth - 1):
            h = _normalize(params[i], _conv(params[i], h, c, 1, padding), mask, norm, "l2", 1, eps)
        return _conv(params[-1], h, c, 1, padding), h

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


def deep_decoder(
    channels: int,
    depth: int,
    *,
    in_channels: int | None = None,
    out_channels: int = 1,
    kernel: int = 1,
    dim: int = 1,
    upsample: int = 1,
    upsample_method: str = "linear",
    norm: str | None = "channel",
    affine: bool = False,
    eps: float = 1e-5,
    padding: str = "circular",
    output: str = "sigmoid",
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
) -> Model:
    """Deep-decoder generator (Heckel & Hand 2019; Dai & Heckel 2019).

    depth blocks  x_k = N(relu(w_k * U(x_{k-1})))  (U: upsampling by `upsample` per spatial
    axis, identity when 1; * a `kernel`-tap convolution, 1x1 by default; N: channel norm,
    batch norm or none), then y = out(w_out * x_depth) with a 1x1 convolution to
    `out_channels` and out = sigmoid (or identity for output="linear"). No biases.
    x: (batch, in_channels, *spatial) with `dim` spatial axes -> y: (batch, out_channels, ...).
    """
    _check("norm", norm, NORMS)
    _check("output", output, ("sigmoid", "linear"))
    _check("padding", padding, ("circular", "zero"))
    in_channels = channels if in_channels is None else in_channels
    cfg = _cfg(init, gain, scale, parameterization, "plain", "relu")
    ks = (kernel,) * dim
    c_in = _multiplier(cfg, in_channels * kernel**dim)
    c_mid = _multiplier(cfg, channels * kernel**dim)
    c_out = _multiplier(cfg, channels)

    def init_fn(key):
        keys = jax.random.split(key, depth + 1)
        params = []
        for i in range(depth):
            cin = in_channels if i == 0 else channels
            p = _new_weight(keys[i], (channels, cin) + ks, cfg)
            p.update(_norm_params(channels, norm, affine))
            params.append(p)
        params.append(_new_weight(keys[-1], (out_channels, channels) + (1,) * dim, cfg))
        return params

    def up(h):
        if upsample == 1:
            return h
        shape = h.shape[:2] + tuple(s * upsample for s in h.shape[2:])
        return jax.image.resize(h, shape, method=upsample_method)

    def apply_features(params, x, mask=None):
        h = x
        for i in range(depth):
            h = _conv(params[i], up(h), c_in if i == 0 else c_mid, 1, padding)
            h = _normalize(params[i], jax.nn.relu(h), mask, norm, "l2", 1, eps)
        y = _conv(params[-1], h, c_out, 1, padding)
        return (jax.nn.sigmoid(y) if output == "sigmoid" else y), h

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


def cnn(
    in_shape: Sequence[int],
    channels: Sequence[int],
    num_outputs: int,
    *,
    kernel: int = 3,
    stride: int = 1,
    padding: str = "zero",
    activation: str = "relu",
    norm: str | None = None,
    bn_p: str = "l2",
    affine: bool = False,
    eps: float = 1e-5,
    pool: str | None = None,
    bias: bool = False,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    weight_param: str = "plain",
) -> Model:
    """1-D or 2-D convolutional classifier: conv blocks, then one dense output layer.

    x_k = act(N(w_k * x_{k-1} + b_k)) for each entry of `channels` (stride `stride`, padding
    "zero", "circular" or "valid"), h = flatten(x_K) (or its global mean over space with
    pool="avg"), y = W h + b. in_shape = (C, L) or (C, H, W), without the batch axis.
    """
    in_shape = tuple(int(s) for s in in_shape)
    dim = len(in_shape) - 1
    if dim not in (1, 2):
        raise ValueError(f"cnn in_shape must be (C, L) or (C, H, W), got {in_shape}")
    _check("padding", padding, ("zero", "circular", "valid"))
    _check("norm", norm, NORMS)
    _check("pool", pool, (None, "avg"))
    _check("activation", activation, tuple(ACTIVATIONS))
    cfg = _cfg(init, gain, scale, parameterization, weight_param, activation)
    act = ACTIVATIONS[activation]
    chans = (in_shape[0],) + tuple(int(c) for c in channels)
    ks = (kernel,) * dim
    mults = [_multiplier(cfg, chans[i] * kernel**dim) for i in range(len(channels))]

    def conv_stack(params, x, mask):
        h = x
        for i in range(len(channels)):
            h = _conv(params[i], h, mults[i], stride, padding)
            h = act(_normalize(params[i], h, mask, norm, bn_p, 10, eps))
        return jnp.mean(h, axis=tuple(range(2, h.ndim))) if pool else h.reshape(h.shape[0], -1)

    def stub_params():
        return [{"w": jnp.zeros((chans[i + 1], chans[i]) + ks)} for i in range(len(channels))]

    feat = jax.eval_shape(lambda: conv_stack(stub_params(), jnp.zeros((1,) + in_shape), None))
    n_feat = feat.shape[1]
    c_last = _multiplier(cfg, n_feat)

    def init_fn(key):
        keys = jax.random.split(key, len(channels) + 1)
        params = []
        for i in range(len(channels)):
            p = _new_weight(keys[i], (chans[i + 1], chans[i]) + ks, cfg)
            if bias:
                p["b"] = jnp.zeros((chans[i + 1],))
            p.update(_norm_params(chans[i + 1], norm, affine))
            params.append(p)
        p = _new_weight(keys[-1], (num_outputs, n_feat), cfg)
        if bias:
            p["b"] = jnp.zeros((num_outputs,))
        params.append(p)
        return params

    def apply_features(params, x, mask=None):
        h = conv_stack(params, x.reshape((x.shape[0],) + in_shape), mask)
        return _dense(params[-1], h, c_last), h

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


def resnet_one_neuron(
    d_in: int,
    depth: int,
    d_out: int,
    *,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
) -> Model:
    """ResNet whose residual blocks are one hidden neuron wide (Lin & Jegelka 2018).

    x_k = x_{k-1} + V_k relu(U_k x_{k-1} + b_k), U_k: (1, d_in), V_k: (d_in, 1), for k = 1..depth;
    y = W x_depth. Layer k's dict holds U_k as "w", b_k as "b" and V_k as "w2".
    """
    cfg = _cfg(init, gain, scale, "standard", "plain", "relu")
    lin = _cfg(init, 1.0 if gain is None else gain, scale, "standard", "plain", "linear")

    def init_fn(key):
        keys = jax.random.split(key, 2 * depth + 1)
        params = []
        for k in range(depth):
            p = _new_weight(keys[2 * k], (1, d_in), cfg)
            p["b"] = jnp.zeros((1,))
            p["w2"] = _sample(keys[2 * k + 1], (d_in, 1), 1, init, lin.gain, scale)
            params.append(p)
        params.append(_new_weight(keys[-1], (d_out, d_in), lin))
        return params

    def apply_features(params, x, mask=None):
        h = x.reshape(x.shape[0], -1)
        for p in params[:-1]:
            h = h + jax.nn.relu(h @ p["w"].T + p["b"][None, :]) @ p["w2"].T
        return h @ params[-1]["w"].T, h

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


# --------------------------------------------------------------------------- adapters


def from_flax(module, example_x, *, features_method: str | None = None) -> Model:
    """Turn a `flax.linen` module into a `Model`.

    The module's top-level submodules ("Dense_0", "Conv_1", ...) become the layers, in the
    order flax created them; each layer dict is that submodule's params (its "kernel" is read
    as the layer weight, moved to (out, ...)). The module must need no mutable collections.
    `features_method`, if given, names a method returning the penultimate features.
    example_x: one batch of inputs, used to trace shapes once.
    """
    # eval_shape returns dicts with sorted keys ("Dense_10" before "Dense_2"); the creation
    # order is read from the variables inside the trace instead.
    order: list[list[str]] = []

    def _init(k):
        variables = module.init(k, example_x)
        order.append(list(variables.get("params", {}).keys()))
        return variables

    shapes = jax.eval_shape(_init, jax.random.key(0))
    if set(shapes) != {"params"}:
        raise ValueError(
            f"from_flax supports modules with only 'params'; this one also has {sorted(set(shapes) - {'params'})}"
        )
    names = order[0]

    def init_fn(key):
        p = module.init(key, example_x)["params"]
        return [dict(p[n]) for n in names]

    def as_tree(params):
        return {"params": dict(zip(names, params, strict=True))}

    def apply(params, x, mask=None):
        return module.apply(as_tree(params), x)

    apply_features = None
    if features_method is not None:

        def apply_features(params, x, mask=None):
            h = module.apply(as_tree(params), x, method=features_method)
            return module.apply(as_tree(params), x), h

    return Model(init_fn, apply, apply_features)


def from_nnx(make_module: Callable[[Any], Any]) -> Model:
    """Turn a `flax.nnx` module into a `Model` through split/merge.

    make_module(rngs) builds the module from an `nnx.Rngs`; its top-level attributes holding
    parameters become the layers, in attribute order. apply merges the graph definition with
    the params and calls the module.
    """
    from flax import nnx

    module = make_module(nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    # the pure dict's keys are sorted; the attribute (creation) order comes from the module.
    attrs = [n for n in vars(module) if n in pure]
    names = attrs + [n for n in pure if n not in attrs]

    def init_fn(key):
        _, st = nnx.split(make_module(nnx.Rngs(key)))
        d = nnx.to_pure_dict(st)
        return [d[n] for n in names]

    def apply(params, x, mask=None):
        st = jax.tree.map(lambda a: a, state)  # a fresh State: replace_by_pure_dict mutates
        nnx.replace_by_pure_dict(st, dict(zip(names, params, strict=True)))
        return nnx.merge(graphdef, st)(x)

    return Model(init_fn, apply, None)
