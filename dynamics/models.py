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

import contextvars
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dynamics import lapack as _lapack
from dynamics import norms as _norms
from dynamics import stacks as _stacks

Params = list[dict[str, Any]]

INITS = ("gaussian", "uniform", "pytorch", "orthogonal", "frobenius")
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


class Forward(NamedTuple):
    """One forward pass: outputs y, penultimate features h (None if the model does not say), and
    the model state after the pass (train mode updates running statistics; eval mode returns
    the state it read)."""

    y: jax.Array
    h: Any
    state: Any


class Model(NamedTuple):
    """A network as pure functions: `init(key) -> params`, `apply(params, x, mask=None) -> y`.

    `apply_features(params, x, mask=None) -> (y, h)` also returns the penultimate features
    (the input of the last layer), which neural-collapse observables read; None if unknown.
    `dense` describes a plain MLP (`Dense`: no normalization, plain weights), whose training
    gradient a compiled kernel computes on the CPU for the activations it knows
    (`native.dense_eligible`); None for every other network.

    Non-trained state (batch-norm running statistics, a dropout layer's need for a key) is not
    part of params: `init_state(key) -> state` builds it (None: the model has none) and
    `forward(params, state, x, mask=None, *, train=True, key=None) -> Forward` runs the model in
    train mode (batch statistics over the kept examples, running statistics updated, dropout
    drawn from `key`) or eval mode (running statistics, no dropout), as PyTorch's `model.train()`
    / `model.eval()`. `apply` is the train-mode output without state. `stochastic`: the train-mode
    output depends on `key`. Use `models.forward` and `models.init_state`, which also accept
    models without state. `init_stacked(key) -> stacks.LayerList`: the same params as `init`
    with runs of identical layers stacked, each run drawn as one vmapped call (None: the model
    takes only lists); apply, apply_features and forward of such a model also take that form,
    with which a uniform stack runs as a scan over its own arrays, and the runner keeps the
    params stacked across steps. init_stacked carries the init it draws like (its `source`):
    a model whose init is replaced (`model._replace(init=...)`) has its params packed from the
    new init (`stacked_init`), never drawn by a stale init_stacked.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    apply_features: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    dense: Dense | None = None
    init_state: Callable[[jax.Array], Any] | None = None
    forward: Callable[..., Forward] | None = None
    stochastic: bool = False
    init_stacked: Callable[[jax.Array], Any] | None = None
    stack: Stack | None = None
    width: Width | None = None


class Stack(NamedTuple):
    """A model's uniform stack of identical layers, the part of it that its depth alone changes
    (`Model.stack`; None: the model has none): layers first .. first + count - 1 (indices into
    params), and `family`, what else fixes the model (the factory and every other argument,
    hashable), so two models with equal families differ only in the stack's count.

    Such models are one program at the deepest count (`masked_stack`): a run at count n < M
    carries all M layers, the M - n past its n-th are skipped (`active_stack`: the stack's
    layer carries h through unchanged) and start, and stay, at zero, and its other layers are
    drawn from the keys the count-n model draws them from (`Model.init.from_keys`), so its
    numbers are the count-n model's to float rounding (tests/test_depth_masking.py)."""

    family: tuple
    first: int
    count: int


class Width(NamedTuple):
    """A model's hidden width, the one size that its width alone changes (`Model.width`; None:
    the model has none): `value`, `family` (what else fixes the model: the factory and every
    other argument, hashable), so two models with equal families differ only in that width, and
    `at(w)`, the family's model of width w.

    Such models are one program at the widest (`masked_width`): a run of width n < W carries
    every layer at width W, its params the width-n model's own (drawn by that model's init)
    padded with zeros (`pad_params`); under `active_width` the model applies the width-n
    model's multipliers (those that depend on the width: the "ntk" parameterization, Hu et
    al.'s 1/sqrt(m)), and since every activation it takes maps 0 to 0, a padded unit's output
    and every padded weight's gradient are exactly zero, so the padding stays zero under any
    optimizer that treats each weight on its own and the run's numbers are the width-n model's
    to float rounding (tests/test_width_masking.py)."""

    family: tuple
    value: int
    at: Callable[[int], Any]


def masked_width(models: Sequence[Model]) -> Model | None:
    """The widest of `models` when all of them have a `Width` of one family (each is then that
    model at a smaller width, `Width.at`); else None."""
    ws = [getattr(m, "width", None) for m in models]
    if not models or any(w is None for w in ws) or len({w.family for w in ws}) != 1:
        return None
    return max(models, key=lambda m: m.width.value)


# (family, n) of the model being traced at width n (`active_width`), per thread
_WIDTH: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("active_width", default=None)


class active_width:
    """Trace a model with `Width` `width` as the width-n model (n: a traced int; the model's
    params padded from the width-n model's, `pad_params`): the model uses the width-n
    multipliers. Read by the factories at trace time."""

    def __init__(self, width: Width | None, n):
        self.entry = None if width is None else (width.family, n)
        self.token = None

    def __enter__(self):
        self.token = _WIDTH.set(self.entry)
        return self

    def __exit__(self, *exc):
        _WIDTH.reset(self.token)
        return False


def traced_width(width: Width | None):
    """The traced width a model of `width` runs at (`active_width`), None when it runs at its own."""
    entry = _WIDTH.get()
    if entry is None or width is None or entry[0] != width.family:
        return None
    return entry[1]


def pad_params(params, like):
    """`params` (a narrower model's, list or `stacks.LayerList`) zero-padded at the end of every
    axis to the shapes of `like` (the widest model's params or their shapes), in `like`'s
    layout."""

    def pad(a, ref):
        if a.ndim != len(ref.shape) or any(s > r for s, r in zip(a.shape, ref.shape, strict=True)):
            raise ValueError(f"pad_params: a leaf of shape {a.shape} does not fit {ref.shape}")
        return jnp.pad(a, [(0, r - s) for s, r in zip(a.shape, ref.shape, strict=True)])

    if isinstance(like, _stacks.LayerList):
        if not (isinstance(params, _stacks.LayerList) and params.counts == like.counts):
            params = _stacks.like(like, _stacks.unpack(params))
        return _stacks.LayerList(
            [jax.tree.map(pad, a, r) for a, r in zip(params.segments, like.segments, strict=True)],
            like.counts,
        )
    return [jax.tree.map(pad, a, r) for a, r in zip(_stacks.unpack(params), like, strict=True)]


def masked_stack(models: Sequence[Model]) -> Model | None:
    """The deepest of `models` when all of them have a `Stack` of one family and keys-drawn
    inits (`init.from_keys`), so each is that model with its stack cut short (`active_stack`);
    else None."""
    stacks = [getattr(m, "stack", None) for m in models]
    if not models or any(st is None for st in stacks):
        return None
    if len({st.family for st in stacks}) != 1 or len({st.first for st in stacks}) != 1:
        return None
    if any(getattr(m.init, "from_keys", None) is None for m in models):
        return None
    return max(models, key=lambda m: m.stack.count)


# (first, count, n) of the stack being cut short while a model is traced (`active_stack`), per
# thread (the runner traces several programs at once)
_ACTIVE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("active_stack", default=None)


class active_stack:
    """Trace a model with `Stack` `stack` as if its stack held only its first `n` layers (n: a
    traced int; negative, or n >= stack.count: every layer): those past them leave h (and
    their state) unchanged. Read by the models' layer loops at trace time."""

    def __init__(self, stack: Stack | None, n):
        self.entry = None if stack is None else (stack.first, stack.count, n)
        self.token = None

    def __enter__(self):
        self.token = _ACTIVE.set(self.entry)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self.token)
        return False


def cut_count(count: int, n):
    """The layers a stack of `count` keeps when cut to `n` (negative: all of them)."""
    return jnp.where(n >= 0, jnp.minimum(n, count), count)


def stack_absent(stack: Stack, n, n_layers: int) -> jax.Array:
    """(n_layers,) bool: the layers a run cut to `n` of its stack's layers skips (n < 0: none)."""
    k = jnp.arange(n_layers)
    n = cut_count(stack.count, n)
    return (k >= stack.first + n) & (k < stack.first + stack.count)


def _live(offset: int, count: int):
    """Per layer offset .. offset + count - 1: None where it always runs (outside the stack
    being cut short, or no stack is), else a traced bool, whether it runs; None: none is cut."""
    entry = _ACTIVE.get()
    if entry is None:
        return None
    first, total, n = entry
    n = cut_count(total, n)
    return [
        (k - first < n) if first <= k < first + total else None
        for k in range(offset, offset + count)
    ]


def _live_array(live, i: int, j: int):
    """The entries i..j-1 of `_live`'s list as one (j - i,) bool array (None: all run)."""
    if live is None or all(x is None for x in live[i:j]):
        return None
    return jnp.stack([jnp.asarray(True) if x is None else x for x in live[i:j]])


def _keep(live, new, old):
    """new where the layer runs, old where it is skipped (live None: new)."""
    if live is None or old is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(live, a, b), new, old)


def stacked_init(model: Model):
    """key -> the model's initial params as a `stacks.LayerList`: `init_stacked` while it is
    the one made with the model's `init` (its `source`), else `stacks.pack(init(key))`; None for
    a model without init_stacked."""
    f = model.init_stacked
    if f is None:
        return None
    if getattr(f, "source", None) is model.init:
        return f
    return lambda key: _stacks.pack(model.init(key))


def init_state(model: Model, key=None):
    """The model's initial non-trained state, `()` for a model without one."""
    if model.init_state is None:
        return ()
    return model.init_state(jax.random.key(0) if key is None else key)


def forward(model: Model, params, state, x, mask=None, *, train: bool = True, key=None) -> Forward:
    """`model.forward` where the model has one; otherwise its (stateless, deterministic) apply,
    which is the same in train and eval mode."""
    if model.forward is not None:
        return model.forward(params, state, x, mask, train=train, key=key)
    if model.apply_features is not None:
        y, h = model.apply_features(params, x, mask)
        return Forward(y, h, state)
    return Forward(model.apply(params, x, mask), None, state)


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


def check_params(params) -> None:
    """params must be a Model's: a list with one dict per weight layer (ValueError otherwise)."""
    if isinstance(params, _stacks.LayerList):
        return
    if isinstance(params, list | tuple) and all(isinstance(p, dict) for p in params):
        return
    if isinstance(params, dict):
        hint = (
            " (a flax variables dict: make the model with dynamics.from_flax or from_nnx, whose "
            "params are that list)"
            if "params" in params
            else ""
        )
        raise ValueError(
            f"params: expected a list with one dict per layer, got a dict with keys "
            f"{sorted(params)[:5]}{hint}"
        )
    shape = getattr(params, "shape", None)
    what = f"an array of shape {tuple(shape)}" if shape is not None else type(params).__name__
    raise ValueError(
        f"params: expected a list with one dict per layer (e.g. [{{'w': W}}] for one matrix W), "
        f"got {what}"
    )


def layer_weights(params: Params) -> list[jax.Array]:
    """Effective weights of every layer as matrices (out, in * prod(kernel))."""
    check_params(params)
    out = []
    for p in params:
        w = layer_weight(p)
        out.append(w.reshape(w.shape[0], -1) if w.ndim != 2 else w)
    return out


def scale_weights(params: Params, s) -> Params:
    """Multiply every layer's weight by s (so each ||W_k||_F is multiplied by |s|)."""
    if isinstance(params, _stacks.LayerList):  # a stacked segment is layers of one structure
        return _stacks.LayerList(scale_weights(list(params.segments), s), params.counts)
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


def _orthogonal(shape):
    """key -> jax's orthogonal init of `shape` (a QR of a Gaussian matrix), drawn one key at a
    time under vmap on several CPU devices: a batched QR there can deadlock the program (see
    `dynamics.lapack`; seen as a runner that never returns with 8 seeds of 128 x 128 layers)."""
    return _lapack.one_matrix_at_a_time(lambda key: jax.nn.initializers.orthogonal()(key, shape))


def _sample(key, shape, fan_in, init, gain, scale):
    if init == "gaussian":
        return gain / math.sqrt(fan_in) * jax.random.normal(key, shape)
    if init in ("uniform", "pytorch"):
        a = gain * math.sqrt(3.0 / fan_in)
        return jax.random.uniform(key, shape, minval=-a, maxval=a)
    if init == "orthogonal":
        flat = (shape[0], math.prod(shape[1:]))
        return gain * _orthogonal(flat)(key).reshape(shape)
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
    bias_init: str = "zeros"


BIAS_INITS = ("zeros", "pytorch")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# kaiming_uniform_(a=sqrt 5), PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
PYTORCH_GAIN = 1.0 / math.sqrt(3.0)


def _cfg(
    init, gain, scale, parameterization, weight_param, activation, bias_init=None
) -> _WeightCfg:
    _check("init", init, INITS)
    if bias_init is None:
        bias_init = "pytorch" if init == "pytorch" else "zeros"
    _check("bias_init", bias_init, BIAS_INITS)
    _check("parameterization", parameterization, PARAMETERIZATIONS)
    _check("weight_param", weight_param, WEIGHT_PARAMS)
    if gain is None:
        if init == "pytorch":
            gain = PYTORCH_GAIN
        else:
            gain = math.sqrt(2.0) if activation == "relu" else 1.0
    return _WeightCfg(init, float(gain), float(scale), parameterization, weight_param, bias_init)


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


def _new_layer(key, shape, cfg: _WeightCfg, bias: bool) -> dict:
    """A weight of `shape` (out, in, *kernel) and, with bias, its bias: zeros, or PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with bias_init="pytorch" (the default under
    init="pytorch"; weight and bias then draw from two halves of the key)."""
    if not bias:
        return _new_weight(key, shape, cfg)
    if cfg.bias_init != "pytorch":
        return {**_new_weight(key, shape, cfg), "b": jnp.zeros((shape[0],))}
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    b = jax.random.uniform(kb, (shape[0],), minval=-bound, maxval=bound)
    return {**_new_weight(kw, shape, cfg), "b": b}


def _dense(p, x, c):
    y = c * (x @ layer_weight(p).T)
    return y + p["b"][None, :] if "b" in p else y


def _pad_spatial(x, kernel, padding):
    """x padded periodically for a circular convolution of `kernel` (unchanged otherwise)."""
    from dynamics import conv as _convs

    return _convs.pad(x, kernel, 1, padding) if padding == "circular" else x


def _conv(p, x, c, stride, padding):
    """c (w * x) + b: the convolution of `dynamics.conv.conv` (the formulation that is fast on
    the platform the program runs on; 1x1 of stride 1 as a contraction over channels)."""
    from dynamics import conv as _convs

    w = layer_weight(p)
    y = c * _convs.conv(x, w, stride, padding)
    if "b" in p:
        y = y + p["b"].reshape((1, -1) + (1,) * (w.ndim - 2))
    return y


NORMS = (None, "batch", "channel", "bias")


class _NormCfg(NamedTuple):
    """How a layer normalizes (see `_apply_norm`): kind None, "batch" (Lp batch norm with running
    statistics), "channel" (per-example channel norm of `form`), or "bias" (no normalization, a
    learned per-channel shift: the P4 authors' baseline); affine adds gamma and beta; bias
    (without affine) a learned shift beta after the normalization."""

    kind: str | None = None
    bn_p: str = "l2"
    bn_k: int = 10
    eps: float = 1e-5
    affine: bool = False
    momentum: float = 0.1
    form: str = "std"
    bias: bool = False


def _norm_cfg(
    norm,
    *,
    bn_p="l2",
    bn_k=10,
    eps=1e-5,
    affine=False,
    momentum=0.1,
    form="std",
    bias=False,
    allowed=NORMS,
) -> _NormCfg:
    _check("norm", norm, allowed)
    _check("bn_p", bn_p, _norms.BATCH_NORM_KINDS)
    _check("channel_form", form, _norms.CHANNEL_NORM_FORMS)
    if not 0 <= momentum <= 1:
        raise ValueError(f"bn_momentum must lie in [0, 1], got {momentum}")
    return _NormCfg(norm, bn_p, int(bn_k), float(eps), bool(affine), float(momentum), form, bias)


def _affine(p, x):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if "gamma" in p:
        x = x * p["gamma"].reshape(shape)
    if "beta" in p:
        x = x + p["beta"].reshape(shape)
    return x


def _norm_params(width, nc: _NormCfg) -> dict:
    if nc.kind is None:
        return {}
    if nc.affine and nc.kind != "bias":
        return {"gamma": jnp.ones((width,)), "beta": jnp.zeros((width,))}
    if nc.bias or nc.kind == "bias":
        return {"beta": jnp.zeros((width,))}
    return {}


def _norm_state(width, nc: _NormCfg) -> dict:
    """A layer's running statistics: {"mean", "var"} (l2) or {"mean", "scale"} (l1, linf)."""
    if nc.kind != "batch":
        return {}
    r = _norms.init_running(width)
    return {"mean": r.mean, ("var" if nc.bn_p == "l2" else "scale"): r.spread}


def _apply_norm(p, s, x, mask, nc: _NormCfg, train: bool):
    """(normalized x, the layer's new state). s: the layer's state dict, or None when the caller
    keeps no state (train mode without running statistics)."""
    if nc.kind is None:
        return x, s
    if nc.kind == "batch":
        spread = "var" if nc.bn_p == "l2" else "scale"
        if train:
            x, stats = _norms.batch_norm_train(x, mask, p=nc.bn_p, k=nc.bn_k, eps=nc.eps)
            if s is not None:
                old = _norms.BatchStats(s["mean"], s[spread])
                new = _norms.update_running(old, stats, nc.momentum)
                s = {"mean": new.mean, spread: new.spread}
        else:
            x = _norms.batch_norm_eval(
                x, _norms.BatchStats(s["mean"], s[spread]), p=nc.bn_p, eps=nc.eps
            )
    elif nc.kind == "channel":
        x = _norms.channel_norm(x, eps=nc.eps, form=nc.form)
    return _affine(p, x), s


def _stateful(nc: _NormCfg) -> bool:
    return nc.kind == "batch"


# --------------------------------------------------------------------------- uniform stacks

# Runs of at least this many consecutive identical layers are one lax.scan (`_run_layers`).
SCAN_MIN = 2


def _signature(key, p, s):
    """What must agree for two layers to share a scan body: the static key, and the structure,
    shapes and dtypes of the layer's params and state."""

    def shapes(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves)

    return key, shapes(p), shapes(s)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def _run_layers(step, h, params, states, keys, scan: bool = True, offset: int = 0):
    """(h, new states) after the layers i = 0..n-1 in order, each (h, s_i') = step(keys[i],
    params[i], s_i, h) with s_i = states[i] (states None: every s_i is None).

    A run of at least SCAN_MIN consecutive layers with equal `keys` (hashable static settings:
    a multiplier, whether the layer changes the shape of h) and params and states of equal
    shapes is one `lax.scan` over their stacked params (jnp.stack of the layer dicts, whose
    transpose hands each layer its own gradient), so the program holds one copy of the layer
    however deep the stack: compile time does not grow with depth, and the backward pass is a
    scan too. The numbers are the unrolled layers' to float rounding (XLA fuses across layers
    only when they are unrolled). The caller's keys must make a layer keep the shape of h inside
    a run; a body whose output dtype differs from its input's (mixed precisions) is unrolled.
    scan=False unrolls every layer. Under `active_stack` the layers a run skips (params[k] is
    the model's layer offset + k) carry h and their state through unchanged."""
    n = len(params)
    ss = [None] * n if states is None else list(states)
    live = _live(offset, n)
    if isinstance(params, _stacks.LayerList):
        return _run_stacked(step, h, params, ss, keys, scan, states is None, live)
    new: list = []
    i = 0
    while i < n:
        j = i + 1
        if scan:
            sig = _signature(keys[i], params[i], ss[i])
            while j < n and _signature(keys[j], params[j], ss[j]) == sig:
                j += 1
        if j - i >= SCAN_MIN:
            key = keys[i]

            def body(h, ps, key=key):
                h2, s2 = step(key, ps[0], ps[1], h)
                if ps[2] is None:
                    return h2, s2
                return _keep(ps[2], h2, h), _keep(ps[2], s2, ps[1])

            m = _live_array(live, i, j)
            try:
                h, s_new = lax.scan(body, h, (_stack(params[i:j]), _stack(ss[i:j]), m))
            except TypeError:  # the body changes h's type (a promotion): unroll these layers
                j = i + 1
            else:
                new.extend(_unstack(s_new, j - i) if s_new is not None else [None] * (j - i))
                i = j
                continue
        for k in range(i, j):
            h2, s = step(keys[k], params[k], ss[k], h)
            if live is not None and live[k] is not None:
                h2, s = _keep(live[k], h2, h), _keep(live[k], s, ss[k])
            h = h2
            new.append(s)
        i = j
    return h, new


def _run_stacked(step, h, params, ss, keys, scan, stateless, live=None):
    """`_run_layers` over a `stacks.LayerList`: a segment's layers of equal keys and states
    scan over the segment's own stacked arrays (a contiguous part of them: one slice per leaf),
    so nothing is stacked or unstacked per layer; other layers run one by one."""
    new: list = []
    off = 0
    for seg, count in params.runs():
        i = 0
        while i < count:
            k = off + i
            j = i + 1
            if scan:
                sig = (keys[k], _signature(None, None, ss[k]))
                while j < count and (keys[off + j], _signature(None, None, ss[off + j])) == sig:
                    j += 1
            if j - i >= SCAN_MIN:
                key = keys[k]
                part = (
                    seg if (i, j) == (0, count) else jax.tree.map(lambda a, i=i, j=j: a[i:j], seg)
                )

                def body(h, ps, key=key):
                    h2, s2 = step(key, ps[0], ps[1], h)
                    if ps[2] is None:
                        return h2, s2
                    return _keep(ps[2], h2, h), _keep(ps[2], s2, ps[1])

                m = _live_array(live, off + i, off + j)
                try:
                    h, s_new = lax.scan(body, h, (part, _stack(ss[off + i : off + j]), m))
                except TypeError:  # the body changes h's type (a promotion): unroll
                    j = i + 1
                else:
                    new.extend(_unstack(s_new, j - i) if s_new is not None else [None] * (j - i))
                    i = j
                    continue
            for m in range(i, j):
                p = jax.tree.map(lambda a, m=m: a[m], seg)
                h2, s = step(keys[off + m], p, ss[off + m], h)
                if live is not None and live[off + m] is not None:
                    h2, s = _keep(live[off + m], h2, h), _keep(live[off + m], s, ss[off + m])
                h = h2
                new.append(s)
            i = j
        off += count
    return h, new


def _layer_inits(layers):
    """(init, init_stacked) from `layers`: one (signature, make(key) -> layer dict) per layer,
    layer k drawn from the k-th of len(layers) keys split from the model's key. Consecutive
    layers of equal signatures (hashable: what fixes the layer's structure and shapes) are drawn
    by init_stacked as one vmapped call over their keys: the same numbers as init's one by one."""
    n = len(layers)

    def init_from_keys(keys):
        return [make(keys[k]) for k, (_, make) in enumerate(layers)]

    def init(key):
        return init_from_keys(jax.random.split(key, n))

    def stacked_from_keys(keys):
        segs, counts = [], []
        i = 0
        while i < n:
            j = i + 1
            while j < n and layers[j][0] == layers[i][0]:
                j += 1
            if j - i < _stacks.MIN_RUN:
                j = i + 1
            make = layers[i][1]
            if j - i == 1:
                segs.append(jax.tree.map(lambda a: a[None], make(keys[i])))
            else:
                segs.append(jax.vmap(make)(keys[i:j]))
            counts.append(j - i)
            i = j
        return _stacks.LayerList(segs, counts)

    def init_stacked(key):
        return stacked_from_keys(jax.random.split(key, n))

    # layer k drawn from keys[k]: a model whose stack is cut short draws the layers after it
    # from the keys the shallower model draws them from (`Stack`)
    init.from_keys = init_from_keys
    init_stacked.from_keys = stacked_from_keys
    init_stacked.source = init
    return init, init_stacked


def _model(
    init_fn, run, init_state_fn=None, dense=None, init_stacked=None, stack=None, width=None
) -> Model:
    """A Model from `run(params, state, x, mask, train) -> Forward` (state None: not tracked)."""

    def apply_features(params, x, mask=None):
        f = run(params, None, x, mask, True)
        return f.y, f.h

    def fwd(params, state, x, mask=None, *, train=True, key=None):
        return run(params, state, x, mask, train)

    return Model(
        init_fn,
        lambda params, x, mask=None: run(params, None, x, mask, True).y,
        apply_features,
        dense,
        init_state_fn,
        fwd if init_state_fn is not None else None,
        init_stacked=init_stacked,
        stack=stack,
        width=width,
    )


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
    bn_momentum: float = 0.1,
    weight_param: str = "plain",
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    bias_init: str | None = None,
    scan: bool = True,
) -> Model:
    """Fully connected network  h_0 = x,  h_k = act(N(W_k h_{k-1} + b_k)),  y = W_L h_{L-1} + b_L.

    widths = (d_in, h_1, ..., d_out) gives len(widths) - 1 weight layers. With bias=False and
    norm=None it is the deep homogeneous ReLU network; with activation="linear" a deep linear
    network. norm: None, "batch" (Lp batch norm over the kept examples, `bn_p` in l2/l1/linf,
    before the activation as in Xu et al. 2023 and PyTorch's Linear -> BatchNorm1d -> ReLU) on
    every hidden layer, with running statistics (PyTorch's momentum `bn_momentum`, unbiased
    variance) as the model's state for eval mode. weight_param: "plain", "weight" (weight norm)
    or "lagrange" (W = rho V) on every layer. init="pytorch" is PyTorch's default for nn.Linear:
    W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias_init ("zeros" or "pytorch"; default:
    "pytorch" exactly under init="pytorch") draws the biases so under any weight init (every
    factory with biases takes it). Inputs of more than one feature axis are flattened.
    scan: hidden layers of equal shapes run as one `lax.scan` over their stacked params, so
    compile time does not grow with depth (params stay one dict per layer; the numbers are the
    unrolled network's to float rounding); False unrolls every layer (every factory with a
    stack of identical layers takes it).
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2:
        raise ValueError("mlp needs at least (d_in, d_out)")
    if min(widths) < 1:
        raise ValueError(f"mlp widths must be positive, got {widths}")
    _check("activation", activation, tuple(ACTIVATIONS))
    nc = _norm_cfg(
        norm,
        bn_p=bn_p,
        bn_k=bn_k,
        eps=eps,
        affine=affine,
        momentum=bn_momentum,
        allowed=(None, "batch"),
    )
    cfg = _cfg(init, gain, scale, parameterization, weight_param, activation, bias_init)
    act = ACTIVATIONS[activation]
    n_layers = len(widths) - 1
    mults = [_multiplier(cfg, widths[i]) for i in range(n_layers)]

    def make(i):
        def layer(key):
            p = _new_layer(key, (widths[i + 1], widths[i]), cfg, bias)
            if i < n_layers - 1:
                p.update(_norm_params(widths[i + 1], nc))
            return p

        return (widths[i + 1], widths[i], i < n_layers - 1), layer

    init_fn, init_stacked = _layer_inits([make(i) for i in range(n_layers)])

    def init_state_fn(key):
        return [_norm_state(widths[i + 1], nc) for i in range(n_layers - 1)] + [{}]

    def run(params, state, x, mask, train):
        n = traced_width(width)
        if n is None or cfg.parameterization != "ntk":
            keys, out = mults[:-1], mults[-1]
        else:  # the width-n model's multipliers where the fan-in is the hidden width
            keys = [(mults[0], False)] + [(mults[k], True) for k in range(1, n_layers - 1)]
            out = cfg.gain / jnp.sqrt(n.astype(jnp.float32))

        def hidden(c, p, s, h):
            if isinstance(c, tuple):
                c = cfg.gain / jnp.sqrt(n.astype(jnp.float32)) if c[1] else c[0]
            h, s = _apply_norm(p, s, _dense(p, h, c), mask, nc, train)
            return act(h), s

        h = x.reshape(x.shape[0], -1)
        states = None if state is None else state[:-1]
        h, new = _run_layers(hidden, h, params[:-1], states, keys, scan)
        y = _dense(params[-1], h, out)
        return Forward(y, h, None if state is None else new + [state[-1]])

    plain = norm is None and weight_param == "plain"
    dense = Dense(widths, activation, bias, tuple(mults)) if plain else None
    stack = width = None
    if plain and n_layers >= 2 and len(set(widths[1:-1])) == 1:
        # the hidden layers 1 .. L-2 of width w; a skipped one starts at zero (masked_stack)
        family = ("mlp", widths[0], widths[1], widths[-1], activation, bias, cfg, scan)
        stack = Stack(family, 1, n_layers - 2)
        if float(act(jnp.zeros(()))) == 0.0:  # a padded unit's output is exactly zero
            family = ("mlp", widths[0], n_layers, widths[-1], activation, bias, cfg, scan)
            kw = dict(
                activation=activation,
                bias=bias,
                init=init,
                gain=gain,
                scale=scale,
                parameterization=parameterization,
                bias_init=bias_init,
                scan=scan,
            )

            def at(w):
                return mlp((widths[0],) + (int(w),) * (n_layers - 1) + (widths[-1],), **kw)

            width = Width(family, widths[1], at)
    return _model(
        init_fn, run, init_state_fn if _stateful(nc) else None, dense, init_stacked, stack, width
    )


def deep_linear(widths: Sequence[int], **kwargs) -> Model:
    """Deep linear network y = W_L ... W_1 x (an `mlp` with identity activation, no bias)."""
    return mlp(widths, activation="linear", **kwargs)


# --------------------------------------------------------------------------- convolutions

HEADS = (None, "sigmoid", "linear")


def _head_layer(key, channels_in, channels_out, dim, cfg, bias) -> dict:
    return _new_layer(key, (channels_out, channels_in) + (1,) * dim, cfg, bias)


def linear_conv1d(
    depth: int,
    *,
    kernel: int = 15,
    channels: int = 1,
    padding: str = "circular",
    norm: str | None = None,
    channel_form: str = "std",
    norm_bias: bool = False,
    bias: bool = False,
    head: str | None = None,
    head_bias: bool = True,
    out_channels: int | None = None,
    eps: float = 1e-5,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    weight_param: str = "plain",
    bias_init: str | None = None,
    scan: bool = True,
) -> Model:
    """Deep linear 1-D convolutional network (Dai & Heckel 2019, section 4).

    Without a head (head=None): x_0 = x, x_k = N(w_k * x_{k-1} + b_k) for k < depth,
    y = w_depth * x_{depth-1} + b_depth. With head="sigmoid" (or "linear"), the authors' network
    (MLI-lab/channel_normalization, include/onedim.py): depth blocks x_k = N(w_k * x_{k-1} + b_k),
    then y = sigmoid(w_o x_depth + b_o) with a 1x1 convolution w_o to `out_channels` (default
    `channels`) with bias (head_bias). * is the convolution of `kernel` taps (circular padding
    keeps the length); b_k only with bias=True. N: None, "channel" (channel norm of
    `channel_form`, see `norms.channel_norm`; norm_bias adds a learned per-channel shift, as
    the authors' does) or "bias" (no normalization, a learned per-channel shift: the authors'
    baseline). x: (batch, channels, n) -> y: (batch, out_channels, n). scan: the blocks as
    one `lax.scan` over their stacked params (compile time independent of depth; see `mlp`).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    _check("padding", padding, ("circular", "zero"))
    _check("head", head, HEADS)
    nc = _norm_cfg(
        norm, eps=eps, form=channel_form, bias=norm_bias, allowed=(None, "channel", "bias")
    )
    cfg = _cfg(init, gain, scale, parameterization, weight_param, "linear", bias_init)
    c = _multiplier(cfg, channels * kernel)
    c_out = out_channels or channels
    c_head = _multiplier(cfg, channels)
    n_blocks = depth if head else depth - 1

    def make(i):
        def layer(key):
            p = _new_layer(key, (channels, channels, kernel), cfg, bias)
            if i < n_blocks:
                p.update(_norm_params(channels, nc))
            return p

        return ("block", i < n_blocks), layer

    def make_head():
        return "head", lambda key: _head_layer(key, channels, c_out, 1, cfg, head_bias)

    init_fn, init_stacked = _layer_inits(
        [make(i) for i in range(depth)] + ([make_head()] if head else [])
    )

    def run(params, state, x, mask, train):
        def block(c, p, s, h):
            return _apply_norm(p, None, _conv(p, h, c, 1, padding), mask, nc, train)[0], None

        h, _ = _run_layers(block, x, params[:n_blocks], None, [c] * n_blocks, scan)
        if not head:
            return Forward(_conv(params[-1], h, c, 1, padding), h, state)
        y = _conv(params[-1], h, c_head, 1, padding)
        return Forward(jax.nn.sigmoid(y) if head == "sigmoid" else y, h, state)

    stack = None
    # the blocks, when a skipped one (all zeros, `masked_stack`) has finite gradients: plain
    # weights, and a normalization whose spread keeps eps inside its square root
    if weight_param == "plain" and (norm != "channel" or channel_form != "std"):
        family = ("linear_conv1d", kernel, channels, padding, norm, channel_form, norm_bias)
        family += (bias, head, head_bias, c_out, eps, cfg, scan)
        stack = Stack(family, 0, n_blocks)
    return _model(init_fn, run, init_stacked=init_stacked, stack=stack)


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
    upsample_last: bool = True,
    norm: str | None = "channel",
    channel_form: str = "std",
    norm_bias: bool = False,
    affine: bool = False,
    bias: bool = False,
    head_bias: bool = False,
    eps: float = 1e-5,
    bn_momentum: float = 0.1,
    padding: str = "circular",
    output: str = "sigmoid",
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    bias_init: str | None = None,
    scan: bool = True,
) -> Model:
    """Deep-decoder generator (Heckel & Hand 2019; Dai & Heckel 2019).

    depth blocks  x_k = N(relu(w_k * U(x_{k-1}) + b_k))  (U: upsampling by `upsample` per
    spatial axis, identity when 1 and, with upsample_last=False, in the last block; * a
    `kernel`-tap convolution, 1x1 by default; b_k with bias=True; N: "channel" (channel norm of
    `channel_form`; norm_bias: a learned shift), "batch" (batch norm with running statistics:
    over one image it is channel norm with form "var"), "bias" (a learned shift only) or None;
    affine adds gamma and beta), then y = out(w_out * x_depth + b_out) with a 1x1 convolution to
    `out_channels` (b_out with head_bias) and out = sigmoid (or identity for output="linear").
    x: (batch, in_channels, *spatial) with `dim` spatial axes -> y: (batch, out_channels, ...).
    scan: blocks of equal shapes that keep the map's size (no upsampling) as one `lax.scan`
    over their stacked params (compile time independent of depth; see `mlp`).
    """
    _check("output", output, ("sigmoid", "linear"))
    _check("padding", padding, ("circular", "zero"))
    nc = _norm_cfg(
        norm, eps=eps, affine=affine, momentum=bn_momentum, form=channel_form, bias=norm_bias
    )
    in_channels = channels if in_channels is None else in_channels
    cfg = _cfg(init, gain, scale, parameterization, "plain", "relu", bias_init)
    ks = (kernel,) * dim
    c_in = _multiplier(cfg, in_channels * kernel**dim)
    c_mid = _multiplier(cfg, channels * kernel**dim)
    c_out = _multiplier(cfg, channels)

    def make(i):
        cin = in_channels if i == 0 else channels

        def layer(key):
            p = _new_layer(key, (channels, cin) + ks, cfg, bias)
            p.update(_norm_params(channels, nc))
            return p

        return ("block", cin), layer

    def make_head():
        return "head", lambda key: _head_layer(key, channels, out_channels, dim, cfg, head_bias)

    init_fn, init_stacked = _layer_inits([make(i) for i in range(depth)] + [make_head()])

    def init_state_fn(key):
        return [_norm_state(channels, nc) for _ in range(depth)] + [{}]

    def up(h, i):
        if upsample == 1 or (not upsample_last and i == depth - 1):
            return h
        shape = h.shape[:2] + tuple(s * upsample for s in h.shape[2:])
        return jax.image.resize(h, shape, method=upsample_method)

    def upsamples(i):
        return upsample != 1 and (upsample_last or i != depth - 1)

    # a block that upsamples changes the map's size: its own key, never inside a scan
    keys = [(c_in if i == 0 else c_mid, i if upsamples(i) else None) for i in range(depth)]

    def run(params, state, x, mask, train):
        def block(key, p, s, h):
            c, i = key
            h = _conv(p, h if i is None else up(h, i), c, 1, padding)
            return _apply_norm(p, s, jax.nn.relu(h), mask, nc, train)

        states = None if state is None else state[:depth]
        h, new = _run_layers(block, x, params[:depth], states, keys, scan)
        y = _conv(params[-1], h, c_out, 1, padding)
        y = jax.nn.sigmoid(y) if output == "sigmoid" else y
        return Forward(y, h, None if state is None else new + [state[-1]])

    return _model(init_fn, run, init_state_fn if _stateful(nc) else None, init_stacked=init_stacked)


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
    bn_momentum: float = 0.1,
    pool: str | None = None,
    bias: bool = False,
    init: str = "gaussian",
    gain: float | None = None,
    scale: float = 1.0,
    parameterization: str = "standard",
    weight_param: str = "plain",
    bias_init: str | None = None,
    scan: bool = True,
) -> Model:
    """1-D or 2-D convolutional classifier: conv blocks, then one dense output layer.

    x_k = act(N(w_k * x_{k-1} + b_k)) for each entry of `channels` (stride `stride`, padding
    "zero", "circular" or "valid"), h = flatten(x_K) (or its global mean over space with
    pool="avg"), y = W h + b. in_shape = (C, L) or (C, H, W), without the batch axis.
    norm="batch" keeps running statistics as the model's state (eval mode), as `mlp` does.
    scan: conv blocks of equal shapes that keep the map's size (stride 1, padding "zero" or
    "circular") as one `lax.scan` over their stacked params (see `mlp`).
    """
    in_shape = tuple(int(s) for s in in_shape)
    dim = len(in_shape) - 1
    if dim not in (1, 2):
        raise ValueError(f"cnn in_shape must be (C, L) or (C, H, W), got {in_shape}")
    _check("padding", padding, ("zero", "circular", "valid"))
    _check("pool", pool, (None, "avg"))
    _check("activation", activation, tuple(ACTIVATIONS))
    nc = _norm_cfg(norm, bn_p=bn_p, eps=eps, affine=affine, momentum=bn_momentum)
    cfg = _cfg(init, gain, scale, parameterization, weight_param, activation, bias_init)
    act = ACTIVATIONS[activation]
    chans = (in_shape[0],) + tuple(int(c) for c in channels)
    ks = (kernel,) * dim
    mults = [_multiplier(cfg, chans[i] * kernel**dim) for i in range(len(channels))]

    # a block that changes the map's size has its own key, never inside a scan
    same_size = stride == 1 and padding != "valid"
    keys = [(mults[i], None if same_size else i) for i in range(len(channels))]

    def conv_stack(params, state, x, mask, train):
        def block(key, p, s, h):
            h = _conv(p, h, key[0], stride, padding)
            h, s = _apply_norm(p, s, h, mask, nc, train)
            return act(h), s

        states = None if state is None else state[: len(channels)]
        h, new = _run_layers(block, x, params[: len(channels)], states, keys, scan)
        h = jnp.mean(h, axis=tuple(range(2, h.ndim))) if pool else h.reshape(h.shape[0], -1)
        return h, new

    def stub_params():
        return [{"w": jnp.zeros((chans[i + 1], chans[i]) + ks)} for i in range(len(channels))]

    feat = jax.eval_shape(
        lambda: conv_stack(stub_params(), None, jnp.zeros((1,) + in_shape), None, True)[0]
    )
    n_feat = feat.shape[1]
    c_last = _multiplier(cfg, n_feat)

    def make(i):
        def layer(key):
            p = _new_layer(key, (chans[i + 1], chans[i]) + ks, cfg, bias)
            p.update(_norm_params(chans[i + 1], nc))
            return p

        return ("block", chans[i + 1], chans[i]), layer

    def make_head():
        return "head", lambda key: _new_layer(key, (num_outputs, n_feat), cfg, bias)

    init_fn, init_stacked = _layer_inits([make(i) for i in range(len(channels))] + [make_head()])

    def init_state_fn(key):
        return [_norm_state(chans[i + 1], nc) for i in range(len(channels))] + [{}]

    def run(params, state, x, mask, train):
        h, new = conv_stack(params, state, x.reshape((x.shape[0],) + in_shape), mask, train)
        y = _dense(params[-1], h, c_last)
        return Forward(y, h, None if state is None else new + [state[-1]])

    return _model(init_fn, run, init_state_fn if _stateful(nc) else None, init_stacked=init_stacked)


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


def __getattr__(name):
    # the Flax adapters live in dynamics.adapters (which imports this module); found here too
    if name in ("from_flax", "from_nnx"):
        from dynamics import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'dynamics.models' has no attribute {name!r}")
