"""Step functions as factories returning `Stepper(init_fn, step_fn)`.

    state = init_fn(params)
    state, info = step_fn(state, batch, hp)

`step_fn` is pure, never samples data (the batch is given) and returns in `info.grads` the
gradient of the loss it used, without the weight-decay term, evaluated at the parameters before
the step. Everything a sweep varies lives in `hp` (`Hparams`, traced arrays); factory arguments
(the momentum form, the weight-decay convention, solver tolerances) are static.

A loss function is `loss_fn(params, batch) -> loss`, or, for a model with non-trained state
(batch-norm running statistics) or randomness (dropout), `loss_fn(params, batch) -> (loss,
new_model_state)` reading the current state from `batch.model_state` and its PRNG key from
`batch.key`. Steppers differentiate either form through `loss_and_grad` and hand the new model
state back in `info.model_state`; the state is never differentiated nor decayed.

Notation: w the parameters, g = grad L(w) on the batch, lr = hp.lr, wd = hp.weight_decay,
mu = hp.momentum.

Per-layer settings of `sgd` and `adam` (PyTorch's parameter groups, as pure data): `decay_mask`
multiplies wd leaf by leaf (e.g. no decay on a layer's weight), `lr_scale` multiplies each
leaf's update by a factor per layer or per output row that may depend on the step, the
parameters and the traced hyperparameters (`LayerScale`, `ScaleContext`); the forms are
`layer_multipliers`'. `norm_matched_lr` builds Hoffer et al.'s (2018) correction of a
weight-decay-free run from a weight-decay run's logged row norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dynamics import norms as _norms
from dynamics import stacks as _stacks


class Hparams(NamedTuple):
    """Hyperparameters a sweep varies: traced arrays, passed at call time, never closed over.

    batch_size is the true batch size of a masked batch (see `train.make_run`); 0, the default,
    means the spec's whole static batch. init_scale multiplies every layer's weight at
    initialization. stack_depth cuts the model's uniform stack (`models.Stack`) to its first
    stack_depth layers, as the runner does for runs of several depths that share one program
    (`models.masked_stack`); -1, the default, keeps the model's own depth. width runs the model
    at that hidden width (`models.Width`), as the runner does for runs of several widths that
    share one program (`models.masked_width`); -1, the default, keeps the model's own width.
    """

    lr: Any = 0.1
    weight_decay: Any = 0.0
    batch_size: Any = 0
    momentum: Any = 0.0
    init_scale: Any = 1.0
    stack_depth: Any = -1
    width: Any = -1


HPARAM_FIELDS = Hparams._fields
INT_FIELDS = ("batch_size", "stack_depth", "width")  # int32; every other field float32


class Batch(NamedTuple):
    """x: (B, ...) inputs; y: (B,) labels or (B, ...) targets; weights: (B,) summing to one over
    the kept examples and zero on padding. mask is `weights > 0`. model_state: the model's
    non-trained state before the step (`()` for a stateless model); key: a PRNG key for the
    model's randomness at this step (dropout), or None."""

    x: jax.Array
    y: jax.Array
    weights: jax.Array
    model_state: Any = ()
    key: Any = None


class StepInfo(NamedTuple):
    """What a step reports: the batch loss and the gradient it used, both at the old params, and
    the model state the step's forward pass left (running statistics; `()` when stateless)."""

    loss: jax.Array
    grads: Any
    model_state: Any = ()


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class FlowState(NamedTuple):
    params: Any
    t: jax.Array


class Stepper(NamedTuple):
    init_fn: Callable[[Any], Any]
    step_fn: Callable[[Any, Batch, Hparams], tuple[Any, StepInfo]]


LossFn = Callable[[Any, Batch], Any]


def _with_state(loss_fn: LossFn, batch: Batch):
    def f(params):
        out = loss_fn(params, batch)
        if isinstance(out, tuple):
            loss, state = out
            return loss, state
        return out, batch.model_state

    return f


def loss_and_grad(loss_fn: LossFn, params, batch: Batch):
    """(loss, grads, model_state) of a loss function of either form (see the module docstring):
    the gradient with respect to params only; model_state is the forward pass's new state, or
    batch.model_state unchanged for a stateless loss."""
    (loss, state), grads = jax.value_and_grad(_with_state(loss_fn, batch), has_aux=True)(params)
    return loss, grads, state


def loss_value(loss_fn: LossFn, params, batch: Batch) -> jax.Array:
    """The loss alone, of a loss function of either form."""
    return _with_state(loss_fn, batch)(params)[0]


def optax_stepper(
    loss_fn: LossFn,
    make_tx: Callable[[Hparams], optax.GradientTransformation],
    *,
    lr_scale=None,
) -> Stepper:
    """A step from an optax transformation rebuilt from the traced hyperparameters at each call.

    w <- w + u,  (u, s) = make_tx(hp).update(g, s, w).  make_tx must give the same state
    structure for every hp (it is initialized with `Hparams()`).

    lr_scale: per-layer (or per-row) learning-rate multipliers m (see `LayerScale` and
    `layer_multipliers` for the forms): w <- w + m_t * u, leaf by leaf, with m_t computed at
    every step from the step t, the parameters before the step, the step's hyperparameters and
    the multiplier's own state. The optimizer state is then a `ScaledState`; without lr_scale
    (None) the step and its state are exactly the plain ones.
    """
    scale = as_layer_scale(lr_scale)

    def init_fn(params):
        opt_state = make_tx(Hparams()).init(params)
        if scale is None:
            return TrainState(params, opt_state)
        return TrainState(
            params, ScaledState(opt_state, jnp.zeros((), jnp.int32), scale.init_fn(params))
        )

    def step_fn(state, batch, hp):
        loss, grads, model_state = loss_and_grad(loss_fn, state.params, batch)
        if scale is None:
            updates, opt_state = make_tx(hp).update(grads, state.opt_state, state.params)
        else:
            s = state.opt_state
            updates, inner = make_tx(hp).update(grads, s.inner, state.params)
            t = s.count + 1
            m = scale.scale_fn(ScaleContext(t, state.params, hp, s.scale))
            m = layer_multipliers(m, state.params, "lr_scale")
            updates = jax.tree.map(lambda u, k: (u * k).astype(u.dtype), updates, m)
            opt_state = ScaledState(inner, t, s.scale)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), StepInfo(
            loss, grads, model_state
        )

    return Stepper(init_fn, step_fn)


# --------------------------------------------------------------------------- per-layer factors


class ScaleContext(NamedTuple):
    """What a learning-rate multiplier sees at step t: t (int32, 1-based: the step being
    taken), the parameters before the step, the step's hyperparameters (hp.lr after the
    schedule; traced) and the multiplier's own state (`LayerScale.init_fn` of the initial
    parameters)."""

    t: jax.Array
    params: Any
    hp: Hparams
    state: Any


def _no_state(params):
    return ()


class LayerScale(NamedTuple):
    """A learning-rate multiplier per layer, per leaf or per output row, as a pure function:
    scale_fn(ScaleContext) -> multipliers in a form `layer_multipliers` accepts; init_fn(params)
    -> its state (arrays only), kept in `ScaledState.scale` for the whole run."""

    scale_fn: Callable[[ScaleContext], Any]
    init_fn: Callable[[Any], Any] = _no_state


class ScaledState(NamedTuple):
    """Optimizer state of a stepper with `lr_scale`: the transformation's state, the number of
    steps taken (int32) and the multiplier's state."""

    inner: Any
    count: jax.Array
    scale: Any


def as_layer_scale(lr_scale) -> LayerScale | None:
    """None; a `LayerScale`; a function ScaleContext -> multipliers; or constant multipliers (any
    form of `layer_multipliers`: arrays in it are compiled into the program)."""
    if lr_scale is None or isinstance(lr_scale, LayerScale):
        return lr_scale
    if callable(lr_scale):
        return LayerScale(lr_scale)
    return LayerScale(lambda ctx: lr_scale)


def _fit(m, leaf, where: str):
    m = jnp.asarray(m)
    if m.ndim == 0:
        return m
    if m.ndim == 1 and leaf.ndim >= 1 and m.shape[0] == leaf.shape[0]:
        return m.reshape((-1,) + (1,) * (leaf.ndim - 1))
    raise ValueError(
        f"{where}: a factor of shape {m.shape} does not fit the leaf's shape {leaf.shape} "
        f"(give a scalar or one value per output row, ({leaf.shape[0] if leaf.ndim else 1},))"
    )


def layer_multipliers(spec, params, name: str = "lr_scale", default: float = 1.0):
    """Per-leaf factors, a tree of params' structure, from a short description `spec`:

      a scalar:                    every leaf;
      a 1-D array of length L:     every leaf of layer k times spec[k] (params has L layers);
      a list or tuple of L entries, entry k for layer k:
        a scalar or an (out,) array: every leaf of layer k (an (out,) array scales output row i
                                     of each leaf, e.g. W[i, :] and b[i]: per channel);
        a dict {leaf name: scalar or (out,) array}: those leaves; the others get `default`.
    params: a list of layer dicts. Each factor comes back shaped to broadcast against its leaf
    ((out, 1, ...) for a per-row one). A spec that cannot fit raises ValueError naming `name`.
    """
    if isinstance(params, _stacks.LayerList):  # each layer's factors, stacked as the params
        flat = layer_multipliers(spec, _stacks.unpack(params), name, default)
        return _stacks.like_factors(params, flat)
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, dict) for p in params):
        raise ValueError(f"{name}: needs params as a list of layer dicts")
    L = len(params)
    if isinstance(spec, (list, tuple)):
        if len(spec) != L:
            raise ValueError(f"{name}: {len(spec)} entries for {L} layers")
        per_layer = list(spec)
    else:
        a = jnp.asarray(spec)
        if a.ndim == 0:
            per_layer = [a] * L
        elif a.ndim == 1 and a.shape[0] == L:
            per_layer = [a[k] for k in range(L)]
        else:
            raise ValueError(f"{name}: a scalar or one factor per layer ({L},), got {a.shape}")
    out = []
    for k, (p, s) in enumerate(zip(params, per_layer, strict=True)):
        if isinstance(s, dict):
            unknown = set(s) - set(p)
            if unknown:
                raise ValueError(f"{name}: layer {k} has no leaf {sorted(unknown)[0]!r}")
            out.append(
                {n: _fit(s.get(n, default), leaf, f"{name}[{k}][{n!r}]") for n, leaf in p.items()}
            )
        else:
            out.append({n: _fit(s, leaf, f"{name}[{k}][{n!r}]") for n, leaf in p.items()})
    return type(params)(out) if isinstance(params, tuple) else out


def _decayed_weights(weight_decay, decay_mask) -> optax.GradientTransformation:
    """u <- u + wd * m * w with per-leaf factors m from `decay_mask` (`layer_multipliers` forms,
    or a function params -> such a form; leaves it does not name get 1); optax's
    add_decayed_weights itself when decay_mask is None."""
    if decay_mask is None:
        return optax.add_decayed_weights(weight_decay)

    def update_fn(updates, state, params):
        spec = decay_mask(params) if callable(decay_mask) else decay_mask
        m = layer_multipliers(spec, params, "decay_mask")
        return (
            jax.tree.map(
                lambda u, w, k: u + (weight_decay * k * w).astype(u.dtype), updates, params, m
            ),
            state,
        )

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def weight_row_norms(params, layers, leaf: str = "w") -> list:
    """||w_i|| of every output row i of `leaf` (conv kernels: every output channel's filter) in
    each layer of `layers`: a list of (out_k,) arrays. This is the norm a batch norm after the
    layer makes the function blind to, row by row (Hoffer et al.'s per-channel norm,
    normmatters_wd/probes_lib/basic.py)."""
    out = []
    for k in layers:
        w = params[k][leaf]
        out.append(jnp.sqrt(jnp.sum(jnp.square(w.reshape(w.shape[0], -1)), axis=1)))
    return out


NORM_MATCH_FORMS = ("exact", "authors")


def norm_matched_lr(
    reference,
    layers,
    *,
    form: str = "exact",
    steps_per_epoch: int = 1,
    weight_decay=None,
    leaf: str = "w",
    rtol: float = 1e-5,
) -> LayerScale:
    """Hoffer et al.'s (2018) learning-rate correction: a run without weight decay on the
    normalized weights whose step on each row w_i of `leaf` in `layers` is multiplied so that
    it follows the directions of a run with weight decay (the reference), from the
    reference's logged row norms r_i.

    Why. With a batch norm after the layer the loss is invariant to each row's scale, so
    g(c w) = g(w) / c. The weight-decay run takes w <- (1 - lr lam) w - lr g(w); a run without
    decay at norm r'_i = c r_i takes w' <- w' - lr m g(w'), and with
        form="exact":    m_t = r'_i(t-1)^2 / ((1 - lr_t lam) r_i(t-1)^2)
    its new direction is exactly the reference's (REPRODUCTIONS.md P7): the discrete-time
    identity, for steps without momentum. r'_i is the run's own current row norm, r_i(t-1) the
    reference's before step t, lam = hp.weight_decay (the reference's decay; `weight_decay`
    fixes it instead), lr_t the step's rate.
        form="authors":  m_t = r'_i(t-1)^2 / r_i(end of epoch e)^2,  e = (t-1) // steps_per_epoch
    is the authors' version (normmatters_wd/optimizers_lib/custom_sgd.py, SGDWDMimic.step): the
    reference norm held for the epoch at its value after the epoch, applied to the momentum
    buffer (here: the whole update, which is the buffer times lr).

    reference: one array per entry of `layers`, the reference run's row norms at every record
    from initialization on: (T+1, out) for form "exact" (after 0, 1, ..., T steps: record every
    step), (E+1, out) for "authors" (after 0, 1, ..., E epochs); or (S, T+1, out) holding S
    reference runs, of which each run uses the one whose initial norms equal its own (relative
    tolerance rtol): the run started from the same initialization. A run that matches no
    reference, or runs past the reference's length, gets NaN factors (it is marked diverged).
    The other leaves and layers keep factor 1. Use with `decay_mask` leaving these rows out of
    the decay, e.g. sgd(loss_fn, decay_mask=..., lr_scale=norm_matched_lr(...)).
    """
    if form not in NORM_MATCH_FORMS:
        raise ValueError(f"form must be one of {NORM_MATCH_FORMS}, got {form!r}")
    layers = tuple(int(k) for k in layers)
    if len(reference) != len(layers):
        raise ValueError(f"reference: {len(reference)} arrays for {len(layers)} layers")
    refs = []
    for k, r in zip(layers, reference, strict=True):
        r = jnp.asarray(r)
        if r.ndim == 2:
            r = r[None]
        if r.ndim != 3:
            raise ValueError(f"reference[{k}]: (T+1, out) or (S, T+1, out), got {r.shape}")
        refs.append(r)
    if len({r.shape[:2] for r in refs}) != 1:
        raise ValueError(f"reference: layers disagree on (S, T+1): {[r.shape[:2] for r in refs]}")
    n_ref, length = refs[0].shape[:2]
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def init_fn(params):
        own = weight_row_norms(params, layers, leaf)
        for k, r, o in zip(layers, refs, own, strict=True):
            if r.shape[2] != o.shape[0]:
                raise ValueError(f"reference[{k}]: {r.shape[2]} rows, layer {k} has {o.shape[0]}")
        err = jnp.stack(
            [
                jnp.max(jnp.abs(r[:, 0].astype(o.dtype) - o[None]) / o[None], axis=1)  # (S,)
                for r, o in zip(refs, own, strict=True)
            ]
        ).max(axis=0)
        best = jnp.argmin(err)
        return jnp.where(err[best] <= rtol, best, -1).astype(jnp.int32)

    def scale_fn(ctx: ScaleContext):
        idx = jnp.maximum(ctx.state, 0)
        if form == "exact":
            row = ctx.t - 1
        else:
            row = (ctx.t - 1) // steps_per_epoch + 1
        bad = (ctx.state < 0) | (row >= length)
        row = jnp.minimum(row, length - 1)
        lam = ctx.hp.weight_decay if weight_decay is None else weight_decay
        own = weight_row_norms(ctx.params, layers, leaf)
        out = [1.0] * len(ctx.params)
        for k, r, o in zip(layers, refs, own, strict=True):
            # 1 - lr lam in the parameters' precision: the decay step forms it there too
            # (float32 hyperparameters promoted to a float64 run's dtype), and a float32
            # product would put a 1e-8 error into every step of a float64 run
            lr = jnp.asarray(ctx.hp.lr).astype(o.dtype)
            shrink = 1 - lr * jnp.asarray(lam).astype(o.dtype) if form == "exact" else 1.0
            ref = r[idx, row].astype(o.dtype)
            m = o**2 / (shrink * ref**2)
            out[k] = {leaf: jnp.where(bad, jnp.nan, m)}
        return out

    return LayerScale(scale_fn, init_fn)


MOMENTA = (None, "heavy_ball", "nesterov")
WEIGHT_DECAYS = ("l2", "decoupled")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def sgd(
    loss_fn: LossFn,
    *,
    momentum: str | None = None,
    weight_decay: str = "l2",
    decay_mask=None,
    lr_scale=None,
) -> Stepper:
    """(Stochastic) gradient descent; plain GD when the batch is the whole training set.

    weight_decay="l2" (the decay is part of the gradient, PyTorch's SGD(weight_decay=wd), and
    both of Zhang et al.'s SGD modes, gd-zhang/Weight-Decay libs/sgd/optimizer.py):
        d = g + wd w
    weight_decay="decoupled" (the decay bypasses the momentum buffer, as in SGDW):
        d = g
    then, with v_0 = 0,
        momentum=None:          w <- w - lr (d [+ wd w if decoupled])
        momentum="heavy_ball":  v <- mu v + d;  w <- w - lr (v [+ wd w])
        momentum="nesterov":    v <- mu v + d;  w <- w - lr (d + mu v [+ wd w])
    Without momentum both conventions give the same update.
    decay_mask: per-leaf factors of wd (wd m w in place of wd w; `layer_multipliers` forms or a
    function params -> one; unnamed leaves 1), e.g. [{"w": 0.0}, {}] for no decay on layer 0's
    weight: PyTorch's parameter groups with their own weight_decay.
    lr_scale: per-layer or per-row learning-rate factors m_t (a `LayerScale`, a function of a
    `ScaleContext`, or constants): w <- w - lr m_t (...), the bracket above (see
    `optax_stepper`; `norm_matched_lr` is Hoffer et al.'s correction).
    """
    _check("momentum", momentum, MOMENTA)
    _check("weight_decay", weight_decay, WEIGHT_DECAYS)

    def make_tx(hp):
        parts = []
        if weight_decay == "l2":
            parts.append(_decayed_weights(hp.weight_decay, decay_mask))
        if momentum is not None:
            parts.append(optax.trace(decay=hp.momentum, nesterov=momentum == "nesterov"))
        if weight_decay == "decoupled":
            parts.append(_decayed_weights(hp.weight_decay, decay_mask))
        parts.append(optax.scale(-hp.lr))
        return optax.chain(*parts)

    return optax_stepper(loss_fn, make_tx, lr_scale=lr_scale)


def gd(loss_fn: LossFn, **kwargs) -> Stepper:
    """Gradient descent: `sgd` fed the whole training set (the run's sampling="full")."""
    return sgd(loss_fn, **kwargs)


def adam(
    loss_fn: LossFn,
    *,
    weight_decay: str = "decoupled",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_mask=None,
    lr_scale=None,
) -> Stepper:
    """Adam (Kingma & Ba) with weight decay as L2 in the gradient or decoupled (AdamW).

    d = g + wd w (l2) or d = g (decoupled)
    m <- b1 m + (1 - b1) d;  s <- b2 s + (1 - b2) d^2;  m^ = m/(1 - b1^t);  s^ = s/(1 - b2^t)
    w <- w - lr (m^ / (sqrt(s^) + eps) [+ wd w if decoupled])
    The decoupled decay is multiplied by lr: each step shrinks w by lr wd (1e-3 x 0.3 = 3e-4 in
    Zhang et al.'s Adam configs), as in Zhang et al.'s code (gd-zhang/Weight-Decay
    libs/adam/optimizer.py: the "wd" type adds wd w to the Adam step, which TensorFlow's
    gradient-descent apply multiplies by lr; the "l2" type adds it to the gradient before the
    moments), PyTorch's AdamW and optax.adamw; Loshchilov & Hutter's schedule multiplier is
    the lr schedule here. eps is outside the root, eps_root = 0 (Zhang et al.: 1e-8, same).
    decay_mask, lr_scale: as in `sgd` (lr_scale multiplies the whole bracket).
    """
    _check("weight_decay", weight_decay, WEIGHT_DECAYS)

    def make_tx(hp):
        parts = []
        if weight_decay == "l2":
            parts.append(_decayed_weights(hp.weight_decay, decay_mask))
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
        if weight_decay == "decoupled":
            parts.append(_decayed_weights(hp.weight_decay, decay_mask))
        parts.append(optax.scale(-hp.lr))
        return optax.chain(*parts)

    return optax_stepper(loss_fn, make_tx, lr_scale=lr_scale)


# --------------------------------------------------------------------------- normalized dynamics


def _is_lagrange(p) -> bool:
    return isinstance(p, dict) and "v" in p and "rho" in p


def _map_layers(fn, *trees):
    """Apply fn(layer_dicts...) to every layer of list-of-dict params (a `stacks.LayerList`:
    vmapped over each segment, the result in its layout)."""
    if isinstance(trees[0], _stacks.LayerList):
        segs = zip(*(t.segments for t in trees), strict=True)
        return _stacks.LayerList([jax.vmap(fn)(*s) for s in segs], trees[0].counts)
    return [fn(*layers) for layers in zip(*trees, strict=True)]


def _normalized_direction(params, grads, wd):
    """The vector field of the normalized dynamics (Xu et al. 2023), as a descent direction d
    with dw/dt = -d:
        V_k:   P_V g_V = g_V - <g_V, V_k> V_k   (projection onto the sphere's tangent space)
        rho_k: g_rho + wd rho_k
        other parameters: g + wd w
    """

    def layer(p, g):
        out = {}
        for name in p:
            if _is_lagrange(p) and name == "v":
                out[name] = _norms.tangent_project(p["v"], g["v"])
            else:
                out[name] = g[name] + wd * p[name]
        return out

    return _map_layers(layer, params, grads)


def _renormalize(params):
    def layer(p):
        if not _is_lagrange(p):
            return p
        q = dict(p)
        q["v"] = p["v"] / jnp.linalg.norm(p["v"].ravel())
        return q

    return _map_layers(layer, params)


def normalized_gd(loss_fn: LossFn) -> Stepper:
    """Gradient descent on the Lagrange-multiplier normalization W_k = rho_k V_k, ||V_k||_F = 1.

        V_k   <- (V_k - lr P_V g_V) / ||V_k - lr P_V g_V||_F      (projected step, then retraction)
        rho_k <- rho_k - lr (g_rho + wd rho_k)
        other <- w - lr (g + wd w)
    P_V g = g - <g, V> V. Weight decay acts on the scales rho_k only, as in Xu et al. (2023).
    Params are a list of layer dicts; layers of the form {"v", "rho"} are normalized.
    """

    def init_fn(params):
        return TrainState(params, ())

    def step_fn(state, batch, hp):
        loss, grads, model_state = loss_and_grad(loss_fn, state.params, batch)
        d = _normalized_direction(state.params, grads, hp.weight_decay)
        params = jax.tree.map(lambda w, u: w - hp.lr * u, state.params, d)
        return TrainState(_renormalize(params), ()), StepInfo(loss, grads, model_state)

    return Stepper(init_fn, step_fn)


# --------------------------------------------------------------------------- gradient flow


def gradient_flow(
    loss_fn: LossFn,
    *,
    normalized: bool = False,
    solver=None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 4096,
) -> Stepper:
    """Gradient flow dw/dt = -(grad L(w) + wd w), integrated with error control (diffrax).

    One "step" advances time by hp.lr, so a run of T steps recorded every r steps records the
    flow at the fixed times t = k r lr, the same times gradient descent with learning rate lr
    reaches after k r steps. The solver (default Tsit5) adapts its own steps inside each interval
    under a PID controller with tolerances rtol and atol.
    normalized=True integrates the normalized flow of `normalized_gd` instead:
        dV_k/dt = -P_V g_V,  drho_k/dt = -(g_rho + wd rho_k),
    which keeps ||V_k|| = 1 up to the tolerance (it is renormalized after each interval).
    A non-finite solution is returned as is (the run marks it diverged).
    """
    import diffrax

    solver = diffrax.Tsit5() if solver is None else solver

    def init_fn(params):
        return FlowState(params, jnp.zeros((), jnp.float32))

    def step_fn(state, batch, hp):
        # A model's state (running statistics) follows the step's forward pass at the interval's
        # start; the flow itself sees the batch in train mode, whose output does not read it.
        loss, grads, model_state = loss_and_grad(loss_fn, state.params, batch)

        def field(t, w, args):
            g = jax.grad(lambda p: loss_value(loss_fn, p, batch))(w)
            if normalized:
                d = _normalized_direction(w, g, hp.weight_decay)
            else:
                d = jax.tree.map(lambda gi, wi: gi + hp.weight_decay * wi, g, w)
            return jax.tree.map(jnp.negative, d)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=0.0,
            t1=hp.lr,
            dt0=None,
            y0=state.params,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.successful
        params = jax.tree.map(lambda y: jnp.where(ok, y[-1], jnp.nan), sol.ys)
        if normalized:
            params = _renormalize(params)
        return FlowState(params, state.t + hp.lr), StepInfo(loss, grads, model_state)

    return Stepper(init_fn, step_fn)
