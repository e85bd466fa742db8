"""What a run records: the observable registry, users' own observables, and the functions that
compute a record from a training state (`make_state_observer`).

Every recordable quantity has a name (the variable of the stored dataset), its dimensions beyond
the leading record axis, a kind and a tier:
  kind "state": a function of the parameters (and model state) at the record;
  kind "step":  accumulated over the steps of a record interval, in the run's carry;
  costly:       computed every `slow_every` records only (NaN in between).
A user's observable is an `Observable(name, fn, dims, kind, costly, reduce, doc)` placed in
`RunSpec.observables` beside the built-in names; it is recorded and stored exactly like them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dynamics import losses as _losses
from dynamics import models as _models
from dynamics import observables as obs
from dynamics import stacks as _stacks
from dynamics.steps import Batch


class ObservableInfo(NamedTuple):
    dims: tuple[str, ...]  # beyond the leading record axis
    kind: str  # "state": a function of the parameters at the record; "step": accumulated per step
    costly: bool  # computed every `slow_every` records only
    doc: str


class RecordContext(NamedTuple):
    """What a state observable sees at a record: the parameters and model state (after the
    record's last step), the run's hyperparameters (lr: the rate applied at that step), the
    run's data (`train.RunData`: x_train, y_train, x_eval, y_eval, x_test, y_test), a PRNG key
    of its own, the step, `predict(x, train=False) -> (y, h)`: the model on inputs x in eval
    (running statistics) or train mode, and `init_params()`: the run's parameters at
    initialization (recomputed from its key when called, so quantities "since initialization"
    cost no copy in the carry)."""

    params: Any
    model_state: Any
    hp: Any
    data: Any
    key: Any
    step: Any
    predict: Callable
    init_params: Callable


class StepContext(NamedTuple):
    """What a step observable sees at every step t: the parameters before and after the step,
    the gradient the step used, the batch loss, the batch (with its weights), the
    hyperparameters with the applied lr, and the model state before the step."""

    t: Any
    params: Any
    new_params: Any
    grads: Any
    loss: Any
    batch: Batch
    hp: Any
    model_state: Any


REDUCTIONS = ("mean", "sum", "min", "max", "first", "last")


class Observable(NamedTuple):
    """A user's observable, recorded and stored like a built-in one.

    name: the variable name in the trace and the store; fn: for kind="state", fn(RecordContext)
    -> array of shape `dims`; for kind="step", fn(StepContext) -> array, combined over the steps
    of a record interval by `reduce` ("mean", "sum", "min", "max", "first", "last"); dims: names of the
    output's axes ("layer" for one entry per layer; any other name gets the output's length);
    costly: computed every `slow_every` records only; doc: one line stored as its description.
    layerwise: its value at a run cut to part of its model's stack (`models.active_stack`: the
    skipped layers all zeros, with zero gradients) is the shallower model's, as for a function
    of the output, a per-layer value (dims "layer": the skipped entries become NaN) or a sum
    over layers of terms that vanish at a zero layer; the runner then trains runs of several
    depths in one program (`train.masking_refusal`).
    fn must be pure and jit/vmap-safe; its output is cast to float32 (float64 in float64 runs).
    Two Observables are
    equal when they record the same thing under the same name (name, dims, kind, tier,
    reduction, layerwise): a config may build its Observable inside `build()`, once per static point.
    """

    name: str
    fn: Callable
    dims: tuple[str, ...] = ()
    kind: str = "state"
    costly: bool = False
    reduce: str = "mean"
    doc: str = ""
    layerwise: bool = False

    def info(self) -> ObservableInfo:
        return ObservableInfo(tuple(self.dims), self.kind, self.costly, self.doc or self.name)

    def _key(self):
        return (self.name, tuple(self.dims), self.kind, self.costly, self.reduce, self.layerwise)

    def __eq__(self, other):
        return isinstance(other, Observable) and self._key() == other._key()

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self._key())


_L = ("layer",)
OBSERVABLES: dict[str, ObservableInfo] = {
    "loss": ObservableInfo(
        (), "state", False, "training loss on the evaluation subset of the training set"
    ),
    "accuracy": ObservableInfo((), "state", False, "training accuracy on the evaluation subset"),
    "test_loss": ObservableInfo((), "state", False, "loss on the test set"),
    "test_accuracy": ObservableInfo((), "state", False, "accuracy on the test set"),
    "rho": ObservableInfo((), "state", False, "prod_k ||W_k||_F"),
    "rho_eff": ObservableInfo(
        (),
        "state",
        False,
        "prod_k ||W_k||_F / prod_BN ||sqrt(running_var)||_2 (x ||gamma||_2 if affine)",
    ),
    "layer_norm": ObservableInfo(_L, "state", False, "||W_k||_F"),
    "effective_lr": ObservableInfo(_L, "state", False, "lr / ||W_k||_F^2 (applied lr)"),
    "balancedness": ObservableInfo(_L, "state", False, "||W_{k+1}^T W_{k+1} - W_k W_k^T||_F"),
    "margin_mean": ObservableInfo((), "state", False, "mean normalized margin y f(x) / rho"),
    "margin_std": ObservableInfo((), "state", False, "std of normalized margins"),
    "margin_min": ObservableInfo((), "state", False, "smallest normalized margin"),
    "sv": ObservableInfo(
        ("layer", "sv_index"), "state", True, "singular values of W_k, descending, NaN-padded"
    ),
    "rank": ObservableInfo(_L, "state", True, "numerical rank at rank_tol of W_k / ||W_k||_F"),
    "mean_rank": ObservableInfo(
        (), "state", True, "mean numerical rank over rank_layers (default: all but the output)"
    ),
    "stable_rank": ObservableInfo(_L, "state", True, "||W_k||_F^2 / ||W_k||_2^2"),
    "sharpness": ObservableInfo((), "state", True, "top Hessian eigenvalue of the evaluation loss"),
    **{
        n: ObservableInfo((), "state", True, "neural collapse, see observables.neural_collapse")
        for n in obs.NC_NAMES
    },
    "batch_loss": ObservableInfo((), "step", False, "mean minibatch loss over the record interval"),
    "grad_norm": ObservableInfo(_L, "step", False, "||g_k|| of the last step's gradient"),
    "grad_norm_weight": ObservableInfo(
        _L, "step", False, "||dL/dW_k|| of the last step's gradient, weights only"
    ),
    "grad_cos": ObservableInfo(
        _L, "step", False, "mean cos(g_t, g_{t+1}) per layer over the interval"
    ),
    "grad_cos_global": ObservableInfo(
        (), "step", False, "mean cos(g_t, g_{t+1}) of the whole gradient"
    ),
    "grad_cos_neg_frac": ObservableInfo(
        _L, "step", False, "fraction of adjacent pairs with cos < 0"
    ),
    "grad_cos_neg_frac_global": ObservableInfo((), "step", False, "same, whole gradient"),
    "update_size": ObservableInfo(
        _L, "step", False, "mean ||W_{t+1} - W_t||_F / lr_t over the interval (applied lr)"
    ),
    "dist": ObservableInfo(
        (),
        "step",
        False,
        "'dist' of Galanti et al.: mean_k ||W_k(end) - W_k(start)||_F / ||W_k(start)||_F over "
        "the last epoch of the interval (training length in epochs)",
    ),
    "dist_layer": ObservableInfo(
        _L, "step", False, "||W_k(end) - W_k(start)||_F / ||W_k(start)||_F, last epoch"
    ),
    "train_margin_mean": ObservableInfo(
        (),
        "step",
        False,
        "mean normalized margin f_y - max_j!=y f_j over rho_eff on every training minibatch of "
        "the interval, in train mode before its step (rho_eff after its forward pass)",
    ),
    "train_margin_std": ObservableInfo((), "step", False, "std of those margins"),
    "train_margin_min": ObservableInfo((), "step", False, "smallest of those margins"),
}

ALIASES: dict[str, tuple[str, ...]] = {
    "nc": obs.NC_NAMES,
    "margins": ("margin_mean", "margin_std", "margin_min"),
    "train_margins": ("train_margin_mean", "train_margin_std", "train_margin_min"),
    "spectrum": ("sv", "rank", "stable_rank"),
    "grad_corr": ("grad_cos", "grad_cos_global", "grad_cos_neg_frac", "grad_cos_neg_frac_global"),
}

EVAL_NAMES = {"loss", "accuracy", "margin_mean", "margin_std", "margin_min", *obs.NC_NAMES}
SPECTRAL = {"sv", "rank", "stable_rank", "mean_rank"}
EPOCH_ONLY = {"dist", "dist_layer"}
RESERVED = {"status", "diverged_step", "step", "epoch", "final_state"}


def _unknown(name) -> ValueError:
    return ValueError(
        f"observables: unknown observable {name!r}; known: {', '.join(sorted(OBSERVABLES))} "
        f"and the aliases {', '.join(sorted(ALIASES))}"
    )


def split_observables(items) -> tuple[tuple[str, ...], dict[str, Observable]]:
    """(names in order, users' Observables by name): aliases expanded, repeats dropped, every
    name checked. items: a tuple of built-in names, aliases and `Observable`s."""
    if isinstance(items, str | Observable):
        raise ValueError(
            f"observables: expected a tuple of names (e.g. ({items!r},)), got {items!r}"
            if isinstance(items, str)
            else "observables: expected a tuple of names and Observables, got one Observable"
        )
    names: list[str] = []
    user: dict[str, Observable] = {}
    for item in items:
        if isinstance(item, Observable):
            if item.name in OBSERVABLES or item.name in ALIASES or item.name in RESERVED:
                raise ValueError(f"observables: {item.name!r} is a built-in name; rename yours")
            if item.kind not in ("state", "step"):
                raise ValueError(
                    f"observables: {item.name!r} kind must be 'state' or 'step', got {item.kind!r}"
                )
            if item.reduce not in REDUCTIONS:
                raise ValueError(
                    f"observables: {item.name!r} reduce must be one of {REDUCTIONS}, got {item.reduce!r}"
                )
            if not callable(item.fn):
                raise ValueError(f"observables: {item.name!r} fn must be callable")
            if item.name in user and user[item.name] is not item:
                raise ValueError(f"observables: two different observables named {item.name!r}")
            user[item.name] = item
            if item.name not in names:
                names.append(item.name)
            continue
        if callable(item):
            raise ValueError(
                "observables: wrap your function as dynamics.Observable(name, fn, dims=...), "
                f"got the bare callable {getattr(item, '__name__', item)!r}"
            )
        if not isinstance(item, str):
            raise ValueError(f"observables: expected names or Observables, got {item!r}")
        for m in ALIASES.get(item, (item,)):
            if m not in OBSERVABLES:
                raise _unknown(m)
            if m not in names:
                names.append(m)
    return tuple(names), user


def resolve_observables(items) -> tuple[str, ...]:
    """Expand aliases and check names; keeps the given order, drops repeats."""
    return split_observables(items)[0]


def info(name: str, user: dict[str, Observable]) -> ObservableInfo:
    return user[name].info() if name in user else OBSERVABLES[name]


# --------------------------------------------------------------------------- state observables


def layer_key(p: dict) -> str | None:
    """The key of a layer dict's trained weight ("w", "v" or a flax "kernel"), or None."""
    for k in ("w", "v", "kernel"):
        if k in p:
            return k
    return None


def weight_sq_norms(grads) -> jax.Array:
    """Per-layer ||dL/dW_k||^2 of the weight entry only (biases, norm parameters excluded)."""

    def one(g):
        k = layer_key(g) if isinstance(g, dict) else None
        return jnp.zeros(()) if k is None else jnp.sum(jnp.square(g[k]))

    return _stacks.per_layer(one, grads)


def record_dtype(spec):
    """Records are float32, or float64 when the run computes in float64 (its numbers kept)."""
    return jnp.float64 if spec.precision == "float64" else jnp.float32


def make_state_observer(
    spec, loss: Callable, loss_fn: Callable, n_layers: int, sv_pad: int, user: dict
) -> Callable:
    """observe(params, model_state, hp, data, key, step, which, init_params) -> {name: float32
    array} for the state observables `which` (built-in names and users' state Observables);
    init_params: a callable giving the run's initial parameters (for `RecordContext`)."""
    model = spec.model
    num_classes = int(spec.data.num_classes)
    eval_train = spec.eval_mode == "train" or model.forward is None
    rank_layers = spec.rank_layers
    rec = record_dtype(spec)

    def predict(params, model_state, x, train=None):
        train = eval_train if train is None else train
        f = _models.forward(model, params, model_state, x, None, train=train)
        return f.y, f.h

    def w_needs_list(which) -> bool:
        # every observable but these reads the list of layers (these take either form)
        takes_stacked = EVAL_NAMES - set(obs.NC_NAMES) - set(ALIASES["margins"])
        takes_stacked |= {"test_loss", "test_accuracy", "rho", "layer_norm", "effective_lr"}
        takes_stacked |= SPECTRAL
        return not set(which) <= takes_stacked

    def observe(params, model_state, hp, data, key, step, which, init_params=None) -> dict:
        if not which:
            return {}
        params = jax.tree.map(jax.lax.stop_gradient, params)
        model_state = jax.tree.map(jax.lax.stop_gradient, model_state)
        # params may be a stacks.LayerList (the run's layout): the forward passes and the
        # per-layer norms take it as it is, the other observables its list of layers
        packed = params
        if isinstance(packed, _stacks.LayerList) and w_needs_list(which):
            params = _stacks.unpack(packed)
        w = set(which)
        out: dict[str, jax.Array] = {}
        if w & EVAL_NAMES:
            pred, h = predict(packed, model_state, data.x_eval)
            out["loss"] = loss(pred, data.y_eval)
            out["accuracy"] = _losses.accuracy(pred, data.y_eval)
            if w & set(obs.NC_NAMES):
                out.update(
                    obs.neural_collapse(
                        h, data.y_eval, _models.layer_weights(params[-1:])[0], pred, num_classes
                    )
                )
            if w & set(ALIASES["margins"]):
                r = obs.rho_eff(params, model_state) if model.forward else obs.rho(params)
                m = obs.margins(pred, data.y_eval, r)
                out.update(margin_mean=jnp.mean(m), margin_std=jnp.std(m), margin_min=jnp.min(m))
        if w & {"test_loss", "test_accuracy"}:
            pred, _ = predict(packed, model_state, data.x_test)
            out["test_loss"] = loss(pred, data.y_test)
            out["test_accuracy"] = _losses.accuracy(pred, data.y_test)
        if w & {"rho", "layer_norm"}:
            norms = obs.layer_norms(packed)
            out.update(rho=jnp.prod(norms), layer_norm=norms)
        if "rho_eff" in w:
            out["rho_eff"] = obs.rho_eff(params, model_state)
        if "effective_lr" in w:
            out["effective_lr"] = obs.effective_lr(hp.lr, params)
        if "balancedness" in w:
            out["balancedness"] = obs.balancedness(params)
        if w & SPECTRAL:
            sv = obs.singular_values(params, pad_to=sv_pad, method=spec.spectrum_method)
            rank = obs.numerical_rank(sv, spec.rank_tol)
            out.update(sv=sv, rank=rank, stable_rank=obs.stable_rank(sv))
            layers = list(range(n_layers - 1)) if rank_layers is None else list(rank_layers)
            out["mean_rank"] = jnp.mean(rank[jnp.asarray(layers)])
        if "sharpness" in w:
            n_eval = data.x_eval.shape[0]
            weights = jnp.full((n_eval,), 1.0 / n_eval, jnp.float32)
            batch = Batch(data.x_eval, data.y_eval, weights, model_state)
            out["sharpness"] = obs.sharpness(
                _plain(loss_fn), params, batch, key, spec.sharpness_iters, spec.sharpness_tol
            )
        users = [n for n in which if n in user]
        if users:
            ctx = RecordContext(
                params,
                model_state,
                hp,
                data,
                key,
                step,
                lambda x, train=False: predict(params, model_state, x, train),
                init_params,
            )
            for n in users:
                out[n] = user[n].fn(ctx)
        return {n: jnp.asarray(out[n], rec) for n in which}

    return observe


def _plain(loss_fn):
    """A loss of either form as params, batch -> loss (for curvature: the model state is held)."""

    def f(params, batch):
        out = loss_fn(params, batch)
        return out[0] if isinstance(out, tuple) else out

    return f
