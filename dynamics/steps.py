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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dynamics import norms as _norms


class Hparams(NamedTuple):
    """Hyperparameters a sweep varies: traced arrays, passed at call time, never closed over.

    batch_size is the true batch size of a masked batch (see `train.make_run`); 0, the default,
    means the spec's whole static batch. init_scale multiplies every layer's weight at
    initialization.
    """

    lr: Any = 0.1
    weight_decay: Any = 0.0
    batch_size: Any = 0
    momentum: Any = 0.0
    init_scale: Any = 1.0


HPARAM_FIELDS = Hparams._fields


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
    loss_fn: LossFn, make_tx: Callable[[Hparams], optax.GradientTransformation]
) -> Stepper:
    """A step from an optax transformation rebuilt from the traced hyperparameters at each call.

    w <- w + u,  (u, s) = make_tx(hp).update(g, s, w).  make_tx must give the same state
    structure for every hp (it is initialized with `Hparams()`).
    """

    def init_fn(params):
        return TrainState(params, make_tx(Hparams()).init(params))

    def step_fn(state, batch, hp):
        loss, grads, model_state = loss_and_grad(loss_fn, state.params, batch)
        updates, opt_state = make_tx(hp).update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), StepInfo(
            loss, grads, model_state
        )

    return Stepper(init_fn, step_fn)


MOMENTA = (None, "heavy_ball", "nesterov")
WEIGHT_DECAYS = ("l2", "decoupled")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def sgd(loss_fn: LossFn, *, momentum: str | None = None, weight_decay: str = "l2") -> Stepper:
    """(Stochastic) gradient descent; plain GD when the batch is the whole training set.

    weight_decay="l2" (the decay is part of the gradient, PyTorch's SGD):
        d = g + wd w
    weight_decay="decoupled" (the decay bypasses the momentum buffer, as in SGDW):
        d = g
    then, with v_0 = 0,
        momentum=None:          w <- w - lr (d [+ wd w if decoupled])
        momentum="heavy_ball":  v <- mu v + d;  w <- w - lr (v [+ wd w])
        momentum="nesterov":    v <- mu v + d;  w <- w - lr (d + mu v [+ wd w])
    Without momentum both conventions give the same update.
    """
    _check("momentum", momentum, MOMENTA)
    _check("weight_decay", weight_decay, WEIGHT_DECAYS)

    def make_tx(hp):
        parts = []
        if weight_decay == "l2":
            parts.append(optax.add_decayed_weights(hp.weight_decay))
        if momentum is not None:
            parts.append(optax.trace(decay=hp.momentum, nesterov=momentum == "nesterov"))
        if weight_decay == "decoupled":
            parts.append(optax.add_decayed_weights(hp.weight_decay))
        parts.append(optax.scale(-hp.lr))
        return optax.chain(*parts)

    return optax_stepper(loss_fn, make_tx)


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
) -> Stepper:
    """Adam (Kingma & Ba) with weight decay as L2 in the gradient or decoupled (AdamW).

    d = g + wd w (l2) or d = g (decoupled)
    m <- b1 m + (1 - b1) d;  s <- b2 s + (1 - b2) d^2;  m^ = m/(1 - b1^t);  s^ = s/(1 - b2^t)
    w <- w - lr (m^ / (sqrt(s^) + eps) [+ wd w if decoupled])
    """
    _check("weight_decay", weight_decay, WEIGHT_DECAYS)

    def make_tx(hp):
        parts = []
        if weight_decay == "l2":
            parts.append(optax.add_decayed_weights(hp.weight_decay))
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
        if weight_decay == "decoupled":
            parts.append(optax.add_decayed_weights(hp.weight_decay))
        parts.append(optax.scale(-hp.lr))
        return optax.chain(*parts)

    return optax_stepper(loss_fn, make_tx)


# --------------------------------------------------------------------------- normalized dynamics


def _is_lagrange(p) -> bool:
    return isinstance(p, dict) and "v" in p and "rho" in p


def _map_layers(fn, *trees):
    """Apply fn(layer_dicts...) to every layer of list-of-dict params (pytrees otherwise leafwise)."""
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
