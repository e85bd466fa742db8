"""One training run as one pure function: `run = make_run(spec); trace = run(hp, key)`.

Structure (no Python step loop, no host synchronization):

    records at steps 0, r, 2r, ..., T                       (r = record_every, T = steps)
    scan over T / (r s) slow blocks                          (s = slow_every)
      scan over s records
        scan over r steps: sample batch -> step_fn -> per-step accumulators in the carry
        cheap observables
      costly observables (spectra, ranks, sharpness, neural collapse)

`jax.jit(jax.vmap(run))` over a grid of `Hparams` compiles once and gives every run the
numbers it gets alone. Batch size is traced: a batch always has the static size `spec.batch`
and its first `hp.batch_size` examples carry weight 1/hp.batch_size (the rest 0), so a masked
batch gives the gradient of the smaller batch; batch indices
are drawn so that the first b of them do not depend on the static size B, so
grouping runs by batch size ("bucketing") gives the same numbers as masking.

A run whose loss or parameters become non-finite is marked diverged at that step; its state
is frozen and every later record is NaN, with no effect on other runs of the same vmap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import losses as _losses
from dynamics import observables as obs
from dynamics import steps as _steps
from dynamics.models import Model, layer_weights, scale_weights
from dynamics.steps import Batch, Hparams, Stepper

# --------------------------------------------------------------------------- observables registry


class ObservableInfo(NamedTuple):
    dims: tuple[str, ...]  # beyond the leading `step` axis
    kind: str  # "state": a function of the parameters at the record; "step": accumulated per step
    costly: bool  # computed every `slow_every` records only
    doc: str


_L = ("layer",)
OBSERVABLES: dict[str, ObservableInfo] = {
    "loss": ObservableInfo(
        (), "state", False, "training loss on the evaluation subset of the training set"
    ),
    "accuracy": ObservableInfo((), "state", False, "training accuracy on the evaluation subset"),
    "test_loss": ObservableInfo((), "state", False, "loss on the test set"),
    "test_accuracy": ObservableInfo((), "state", False, "accuracy on the test set"),
    "rho": ObservableInfo((), "state", False, "prod_k ||W_k||_F"),
    "layer_norm": ObservableInfo(_L, "state", False, "||W_k||_F"),
    "effective_lr": ObservableInfo(_L, "state", False, "lr / ||W_k||_F^2"),
    "balancedness": ObservableInfo(_L, "state", False, "||W_{k+1}^T W_{k+1} - W_k W_k^T||_F"),
    "margin_mean": ObservableInfo((), "state", False, "mean normalized margin y f(x) / rho"),
    "margin_std": ObservableInfo((), "state", False, "std of normalized margins"),
    "margin_min": ObservableInfo((), "state", False, "smallest normalized margin"),
    "sv": ObservableInfo(
        ("layer", "sv_index"), "state", True, "singular values of W_k, descending, NaN-padded"
    ),
    "rank": ObservableInfo(_L, "state", True, "numerical rank at rank_tol of W_k / ||W_k||_F"),
    "stable_rank": ObservableInfo(_L, "state", True, "||W_k||_F^2 / ||W_k||_2^2"),
    "sharpness": ObservableInfo((), "state", True, "top Hessian eigenvalue of the evaluation loss"),
    **{
        n: ObservableInfo((), "state", True, "neural collapse, see observables.neural_collapse")
        for n in obs.NC_NAMES
    },
    "batch_loss": ObservableInfo((), "step", False, "mean minibatch loss over the record interval"),
    "grad_norm": ObservableInfo(_L, "step", False, "||g_k|| of the last step's gradient"),
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
    "update_size": ObservableInfo(_L, "step", False, "'dist': mean ||W_{t+1} - W_t||_F / lr"),
}

ALIASES: dict[str, tuple[str, ...]] = {
    "nc": obs.NC_NAMES,
    "margins": ("margin_mean", "margin_std", "margin_min"),
    "spectrum": ("sv", "rank", "stable_rank"),
    "grad_corr": ("grad_cos", "grad_cos_global", "grad_cos_neg_frac", "grad_cos_neg_frac_global"),
}

_EVAL_NAMES = {"loss", "accuracy", "margin_mean", "margin_std", "margin_min", *obs.NC_NAMES}
_SPECTRAL = {"sv", "rank", "stable_rank"}
SAMPLINGS = ("replacement", "permutation", "full")
GRADIENTS = ("auto", "autodiff")


def resolve_observables(names) -> tuple[str, ...]:
    """Expand aliases and check names; keeps the given order, drops repeats."""
    out: list[str] = []
    for n in names:
        for m in ALIASES.get(n, (n,)):
            if m not in OBSERVABLES:
                raise ValueError(
                    f"unknown observable {m!r}; known: {', '.join(sorted(OBSERVABLES))}"
                )
            if m not in out:
                out.append(m)
    return tuple(out)


# --------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything static about a run: shapes, step counts, schedule, what to record.

    model: a `Model`; data: a `dynamics.data.Dataset`; loss: a name in `losses.LOSSES` or
    `loss(pred, target, weights)`; stepper: `stepper(loss_fn) -> Stepper` (e.g. `steps.sgd` or
    `functools.partial(steps.sgd, momentum="heavy_ball")`); steps, record_every: records at
    steps 0, r, ..., T (r must divide T); observables: names of `OBSERVABLES` or `ALIASES`;
    slow_every: costly observables every that many records (NaN in between);
    batch: the static batch dimension (the largest batch size of a sweep, or the exact size when
    runs are grouped by it); sampling: "replacement" (each slot i of step t draws an index
    uniformly; slot i's draw does not depend on B), "permutation" (the first `batch` entries of a fresh
    random permutation per step: without replacement) or "full" (the whole training set in
    order: gradient descent); eval_size: records evaluate the first eval_size training
    examples; rank_tol: tolerance of `rank`; spectrum_method: a method of
    `observables.singular_values` ("auto", "native", "svd" or "gram");
    sharpness_iters: power iterations for `sharpness`; gradient: "auto" (the training step takes
    a plain MLP's loss gradient from the compiled CPU kernel, `native.dense_loss_fn`, where the
    model and loss allow it and the kernel is available; autodiff otherwise) or "autodiff".
    """

    model: Model
    data: Any
    loss: str | Callable = "square"
    stepper: Callable[..., Stepper] = _steps.sgd
    steps: int = 1000
    record_every: int = 100
    observables: tuple[str, ...] = ("loss",)
    slow_every: int = 1
    batch: int | None = None
    sampling: str = "replacement"
    eval_size: int | None = 4096
    rank_tol: float = 1e-3
    spectrum_method: str = "auto"
    sharpness_iters: int = 20
    gradient: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the field if the spec cannot run."""
        if self.steps < 1:
            raise ValueError(f"steps: must be at least 1, got {self.steps}")
        if self.record_every < 1 or self.steps % self.record_every:
            raise ValueError(
                f"record_every: {self.record_every} does not divide steps={self.steps}"
            )
        n_rec = self.steps // self.record_every
        if self.slow_every < 1 or n_rec % self.slow_every:
            raise ValueError(
                f"slow_every: {self.slow_every} does not divide the {n_rec} records (steps/record_every)"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: must be one of {SAMPLINGS}, got {self.sampling!r}")
        n = self.data.x_train.shape[0]
        if self.batch is not None and self.sampling != "full":
            if self.batch < 1:
                raise ValueError(f"batch: must be at least 1, got {self.batch}")
            if self.sampling == "permutation" and self.batch > n:
                raise ValueError(f"batch: {self.batch} exceeds the {n} training examples")
        names = resolve_observables(self.observables)
        if {"test_loss", "test_accuracy"} & set(names) and self.data.x_test.shape[0] == 0:
            raise ValueError(
                "observables: test_loss/test_accuracy need a data set with a test split"
            )
        if set(obs.NC_NAMES) & set(names):
            if self.model.apply_features is None:
                raise ValueError("observables: neural collapse needs a model with apply_features")
            if self.data.num_classes < 2:
                raise ValueError("observables: neural collapse needs class labels")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient: must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.spectrum_method not in obs.SPECTRUM_METHODS:
            raise ValueError(
                f"spectrum_method: must be one of {obs.SPECTRUM_METHODS}, "
                f"got {self.spectrum_method!r}"
            )

    @property
    def static_batch(self) -> int:
        if self.sampling == "full" or self.batch is None:
            return int(self.data.x_train.shape[0])
        return int(self.batch)

    def record_steps(self) -> np.ndarray:
        return np.arange(0, self.steps + 1, self.record_every)


class RunData(NamedTuple):
    """The arrays a run reads, passed as an argument so they are not baked into the program."""

    x_train: jax.Array
    y_train: jax.Array
    x_eval: jax.Array
    y_eval: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def run_data(spec: RunSpec) -> RunData:
    d = spec.data
    n_eval = (
        d.x_train.shape[0] if spec.eval_size is None else min(spec.eval_size, d.x_train.shape[0])
    )
    return RunData(
        jnp.asarray(d.x_train),
        jnp.asarray(d.y_train),
        jnp.asarray(d.x_train[:n_eval]),
        jnp.asarray(d.y_train[:n_eval]),
        jnp.asarray(d.x_test),
        jnp.asarray(d.y_test),
    )


def as_hparams(hp) -> Hparams:
    """Hparams of float32 arrays (batch_size int32); accepts Python numbers or a dict."""
    if isinstance(hp, dict):
        hp = Hparams(**hp)
    return Hparams(
        *[
            jnp.asarray(v, jnp.int32 if f == "batch_size" else jnp.float32)
            for f, v in zip(Hparams._fields, hp, strict=True)
        ]
    )


def hparams(**fields) -> Hparams:
    """Hparams of equal-length arrays, one entry per run, defaults filled in.

    `hparams(lr=[0.1, 0.2], weight_decay=[0, 1e-3])` gives lr, weight_decay of shape (2,) and the
    other fields at their defaults (batch_size 0: the spec's batch), ready for `vmap(run)`.
    """
    unknown = set(fields) - set(Hparams._fields)
    if unknown:
        raise ValueError(
            f"hparams: unknown field {sorted(unknown)[0]!r}; fields: {Hparams._fields}"
        )
    lengths = {len(np.atleast_1d(v)) for v in fields.values()}
    if len(lengths) > 1:
        raise ValueError(f"hparams: fields have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 1
    defaults = Hparams()
    out = {}
    for f in Hparams._fields:
        v = np.atleast_1d(fields.get(f, getattr(defaults, f)))
        v = np.broadcast_to(v, (n,))
        out[f] = jnp.asarray(v, jnp.int32 if f == "batch_size" else jnp.float32)
    return Hparams(**out)


def make_loss_fn(model: Model, loss: str | Callable) -> Callable[[Any, Batch], jax.Array]:
    """loss_fn(params, batch) = loss(model.apply(params, batch.x, mask), batch.y, batch.weights)."""
    loss = _losses.resolve(loss)

    def loss_fn(params, batch: Batch):
        pred = model.apply(params, batch.x, batch.weights > 0)
        return loss(pred, batch.y, batch.weights)

    return loss_fn


def dense_gradient(spec: RunSpec) -> bool:
    """Whether the spec's training step differentiates `native.dense_loss_fn` (spec.gradient
    "auto", a plain MLP and loss the kernel computes, the kernel built): its gradient is then
    the compiled kernel's wherever the program runs on the CPU, autodiff's elsewhere."""
    from dynamics import native

    return (
        spec.gradient == "auto"
        and native.dense_eligible(spec.model, spec.loss)
        and native.available()
    )


def cpu_kernels() -> bool:
    """Whether programs built now run on the CPU, with the compiled kernels."""
    from dynamics import native

    return jax.local_devices()[0].platform == "cpu" and native.available()


def train_loss_fn(spec: RunSpec) -> Callable[[Any, Batch], jax.Array]:
    """The loss function a run's training step differentiates: `make_loss_fn`'s, or where
    `dense_gradient(spec)`, the same loss whose gradient is the compiled kernel's on the CPU
    (`native.dense_loss_fn`: the step's whole forward and backward pass in one call)."""
    if dense_gradient(spec):
        from dynamics import native

        return native.dense_loss_fn(spec.model, spec.loss)
    return make_loss_fn(spec.model, spec.loss)


class _Carry(NamedTuple):
    state: Any
    prev_grads: Any  # the last step's gradient, kept only for adjacent-gradient cosines
    grad_sq: Any  # per-layer ||g_k||^2 of the last step's gradient (L,), when needed
    acc: dict
    diverged: jax.Array
    diverged_step: jax.Array


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def describe(spec: RunSpec) -> dict[str, tuple[str, ...]]:
    """Dimension names of every variable of a run's trace (after the leading run axes)."""
    out = {n: ("step",) + OBSERVABLES[n].dims for n in resolve_observables(spec.observables)}
    out["status"] = ()
    out["diverged_step"] = ()
    return out


def make_run(spec: RunSpec) -> Callable:
    """Build `run(hp, key, data=None) -> trace` for a spec.

    hp: `Hparams` (arrays or numbers); key: a PRNG key, split into an initialization key
    and a data-order key, so runs that share a key share their initialization and batches.
    data: `RunData` (default: the spec's data set).
    trace: dict of float32 arrays of shape (n_records, *dims) per observable, with
    n_records = steps / record_every + 1 (step 0 included; per-step statistics are NaN at
    step 0 and costly ones NaN between their records), plus "status" (0 finished, 1 diverged)
    and "diverged_step" (the step whose loss or update was non-finite, -1 if none).
    """
    spec.validate()
    names = resolve_observables(spec.observables)
    model = spec.model
    loss = _losses.resolve(spec.loss)
    loss_fn = make_loss_fn(model, loss)
    stepper = spec.stepper(train_loss_fn(spec))
    default_data = run_data(spec)
    B = spec.static_batch
    n_train = int(spec.data.x_train.shape[0])
    num_classes = int(spec.data.num_classes)

    state_names = [n for n in names if OBSERVABLES[n].kind == "state"]
    cheap_state = [n for n in state_names if not OBSERVABLES[n].costly]
    costly_state = [n for n in state_names if OBSERVABLES[n].costly]
    step_names = [n for n in names if OBSERVABLES[n].kind == "step"]
    want = set(names)
    track_cos = bool(want & set(ALIASES["grad_corr"]))
    track_update = "update_size" in want
    track_loss = "batch_loss" in want
    track_grad = "grad_norm" in want or track_cos

    params_shape = jax.eval_shape(model.init, jax.random.key(0))
    n_layers = len(params_shape)
    sv_pad = obs.max_singular_values(params_shape) if want & _SPECTRAL else 0

    # ------------------------------------------------------------------ batches

    def sample(key, hp, data: RunData) -> Batch:
        if spec.sampling == "full":
            w = jnp.full((n_train,), 1.0 / n_train, jnp.float32)
            return Batch(data.x_train, data.y_train, w)
        if spec.sampling == "permutation":
            idx = jax.random.permutation(key, n_train)[:B]
        elif jax.config.jax_threefry_partitionable:
            # Partitionable threefry draws element i from counter i alone, so the first b
            # indices are the same whatever the static batch B: one draw suffices.
            idx = jax.random.randint(key, (B,), 0, n_train)
        else:
            slots = jnp.arange(B, dtype=jnp.uint32)
            idx = jax.vmap(
                lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, n_train)
            )(slots)
        bs = jnp.where(hp.batch_size > 0, hp.batch_size, B)
        w = jnp.where(jnp.arange(B) < bs, 1.0 / bs.astype(jnp.float32), 0.0)
        return Batch(data.x_train[idx], data.y_train[idx], w)

    # ------------------------------------------------------------------ observables

    def zero_acc():
        L = n_layers
        acc = {"steps": jnp.zeros((), jnp.float32)}
        if track_loss:
            acc["loss"] = jnp.zeros((), jnp.float32)
        if track_cos:
            acc.update(
                pairs=jnp.zeros((), jnp.float32),
                cos=jnp.zeros((L,), jnp.float32),
                cos_g=jnp.zeros((), jnp.float32),
                neg=jnp.zeros((L,), jnp.float32),
                neg_g=jnp.zeros((), jnp.float32),
            )
        if track_update:
            acc["upd"] = jnp.zeros((L,), jnp.float32)
        return acc

    def observe_steps(carry: _Carry) -> dict:
        acc = carry.acc
        out = {}
        if "batch_loss" in want:
            out["batch_loss"] = acc["loss"] / acc["steps"]
        if "grad_norm" in want:
            out["grad_norm"] = jnp.where(acc["steps"] > 0, jnp.sqrt(carry.grad_sq), jnp.nan)
        if track_cos:
            out["grad_cos"] = acc["cos"] / acc["pairs"]
            out["grad_cos_global"] = acc["cos_g"] / acc["pairs"]
            out["grad_cos_neg_frac"] = acc["neg"] / acc["pairs"]
            out["grad_cos_neg_frac_global"] = acc["neg_g"] / acc["pairs"]
        if track_update:
            out["update_size"] = acc["upd"] / acc["steps"]
        return {n: out[n] for n in step_names}

    def evaluate(params, data: RunData, features: bool):
        if features:
            return model.apply_features(params, data.x_eval, None)
        return model.apply(params, data.x_eval, None), None

    def observe_state(params, hp, data: RunData, key, which: list[str]) -> dict:
        if not which:
            return {}
        params = jax.tree.map(jax.lax.stop_gradient, params)
        w = set(which)
        out: dict[str, jax.Array] = {}
        if w & _EVAL_NAMES:
            nc = bool(w & set(obs.NC_NAMES))
            pred, h = evaluate(params, data, nc)
            out["loss"] = loss(pred, data.y_eval)
            out["accuracy"] = _losses.accuracy(pred, data.y_eval)
            if nc:
                out.update(
                    obs.neural_collapse(
                        h, data.y_eval, layer_weights(params)[-1], pred, num_classes
                    )
                )
            if w & set(ALIASES["margins"]):
                m = obs.margins(pred, data.y_eval, obs.rho(params))
                out.update(margin_mean=jnp.mean(m), margin_std=jnp.std(m), margin_min=jnp.min(m))
        if w & {"test_loss", "test_accuracy"}:
            pred = model.apply(params, data.x_test, None)
            out["test_loss"] = loss(pred, data.y_test)
            out["test_accuracy"] = _losses.accuracy(pred, data.y_test)
        if w & {"rho", "layer_norm"}:
            norms = obs.layer_norms(params)
            out.update(rho=jnp.prod(norms), layer_norm=norms)
        if "effective_lr" in w:
            out["effective_lr"] = obs.effective_lr(hp.lr, params)
        if "balancedness" in w:
            out["balancedness"] = obs.balancedness(params)
        if w & _SPECTRAL:
            sv = obs.singular_values(params, pad_to=sv_pad, method=spec.spectrum_method)
            out.update(
                sv=sv, rank=obs.numerical_rank(sv, spec.rank_tol), stable_rank=obs.stable_rank(sv)
            )
        if "sharpness" in w:
            n_eval = data.x_eval.shape[0]
            batch = Batch(data.x_eval, data.y_eval, jnp.full((n_eval,), 1.0 / n_eval, jnp.float32))
            out["sharpness"] = obs.sharpness(loss_fn, params, batch, key, spec.sharpness_iters)
        return {n: jnp.asarray(out[n], jnp.float32) for n in which}

    # ------------------------------------------------------------------ the run

    n_rec = spec.steps // spec.record_every
    n_slow = n_rec // spec.slow_every
    # The step loop is unrolled by two when adjacent gradients are compared with XLA's
    # reductions (off the CPU, or without the compiled kernels), so that the last gradient and
    # the new one alternate between two buffers instead of being copied into the carry. The CPU
    # kernel (`observables.adjacent_parts`) writes the new gradient over the last one, and there
    # unrolling only doubles the gradients in flight: the reference grid with every observable
    # ran 0.4-4.5% slower with it (three A/B runs), its batch-128 runs 5-6%.
    unroll = 2 if track_cos and not cpu_kernels() else 1

    def run(hp, key, data: RunData | None = None):
        data = default_data if data is None else data
        hp = as_hparams(hp)
        k_init, k_data = jax.random.split(key)
        k_obs = jax.random.fold_in(key, 7)
        params = scale_weights(model.init(k_init), hp.init_scale)
        state = stepper.init_fn(params)
        prev0 = jax.tree.map(jnp.zeros_like, params) if track_cos else ()
        sq0 = jnp.zeros((n_layers,), jnp.float32) if track_grad else ()
        carry = _Carry(
            state, prev0, sq0, zero_acc(), jnp.zeros((), bool), jnp.full((), -1, jnp.int32)
        )

        def step(c: _Carry, t):
            batch = sample(jax.random.fold_in(k_data, t), hp, data)
            new_state, info = stepper.step_fn(c.state, batch, hp)
            # Divergence is read off the loss each step; the parameters are checked once per
            # record interval (see `check_params`), which pins the same step: non-finite
            # parameters give a non-finite loss at the next step. The freeze is then a select
            # the update's own loop absorbs, instead of two more passes over the parameters.
            ok = jnp.isfinite(info.loss)
            diverged = c.diverged | ~ok
            live = ~diverged
            state = _tree_where(diverged, c.state, new_state)
            acc = dict(c.acc)
            inc = live.astype(jnp.float32)
            acc["steps"] = acc["steps"] + inc
            if track_loss:
                acc["loss"] = acc["loss"] + jnp.where(live, info.loss, 0.0)
            # Per-step statistics cost a few passes over the gradient: its per-layer squared
            # norms (kept for the next step's cosine) and its inner products with the last one.
            if track_cos:  # every step's norms enter the cosines, with its dot with the last
                dots, grad_sq, prev = obs.adjacent_parts(c.prev_grads, info.grads)
            elif track_grad:  # only the record interval's last step is read
                grad_sq = jax.lax.cond(
                    t % spec.record_every == 0,
                    obs.layer_sq_norms,
                    lambda _: c.grad_sq,
                    info.grads,
                )
            else:
                grad_sq = ()
            if track_cos:
                per, whole = obs.cosines_from_parts(dots, c.grad_sq, grad_sq)
                pair = live & (t > 1)
                pf = pair.astype(jnp.float32)
                acc["pairs"] = acc["pairs"] + pf
                acc["cos"] = acc["cos"] + jnp.where(pair, per, 0.0)
                acc["cos_g"] = acc["cos_g"] + jnp.where(pair, whole, 0.0)
                acc["neg"] = acc["neg"] + pf * (per < 0)
                acc["neg_g"] = acc["neg_g"] + pf * (whole < 0)
            if track_update:
                upd = obs.update_sizes(c.state.params, state.params, hp.lr)
                acc["upd"] = acc["upd"] + jnp.where(live, upd, 0.0)
            # After divergence nothing reads the gradients any more (pairs and records are
            # masked), so they are carried without a select.
            prev = prev if track_cos else ()
            div_step = jnp.where(c.diverged | ok, c.diverged_step, t.astype(jnp.int32))
            return _Carry(state, prev, grad_sq, acc, diverged, div_step), None

        def check_params(c: _Carry, t0, t1) -> _Carry:
            """After the steps t0+1..t1: the step whose update first made the parameters
            non-finite. A run stopped by a non-finite loss at step s is frozen at the parameters
            that loss was computed from; if those are non-finite, the update of step s - 1 made
            them so (the earlier parameters were finite, or an earlier loss would not have
            been). A run whose parameters after step t1 are non-finite while every loss was
            finite diverged at t1."""
            finite = _all_finite(c.state.params)
            here = c.diverged & (c.diverged_step > t0)
            div_step = jnp.where(here & ~finite, c.diverged_step - 1, c.diverged_step)
            newly = ~c.diverged & ~finite
            div_step = jnp.where(newly, t1, div_step).astype(jnp.int32)
            return c._replace(diverged=c.diverged | newly, diverged_step=div_step)

        def observed(params, diverged):
            # a diverged run's records are NaN; its (possibly non-finite) parameters are not
            # handed to the observables, whose LAPACK calls would only be slowed by them
            return jax.tree.map(lambda x: jnp.where(diverged, jnp.zeros_like(x), x), params)

        def mask_nan(values: dict, diverged) -> dict:
            return {n: jnp.where(diverged, jnp.nan, v) for n, v in values.items()}

        def record(c: _Carry, r):
            t0 = r * spec.record_every
            c, _ = jax.lax.scan(
                step, c, t0 + jnp.arange(1, spec.record_every + 1, dtype=jnp.int32), unroll=unroll
            )
            c = check_params(c, t0, t0 + spec.record_every)
            values = observe_steps(c)
            values.update(
                observe_state(
                    observed(c.state.params, c.diverged),
                    hp,
                    data,
                    jax.random.fold_in(k_obs, 1 + r),
                    cheap_state,
                )
            )
            acc = zero_acc()
            return c._replace(acc=acc), mask_nan(values, c.diverged)

        def slow_block(c: _Carry, s):
            c, cheap = jax.lax.scan(record, c, s * spec.slow_every + jnp.arange(spec.slow_every))
            costly = observe_state(
                observed(c.state.params, c.diverged),
                hp,
                data,
                jax.random.fold_in(k_obs, 1 + n_rec + s),
                costly_state,
            )
            return c, (cheap, mask_nan(costly, c.diverged))

        # step 0: state observables at initialization; per-step statistics are NaN (0/0 or masked).
        init_values = observe_steps(carry)
        init_values.update(
            observe_state(params, hp, data, jax.random.fold_in(k_obs, 0), state_names)
        )
        carry, (cheap, costly) = jax.lax.scan(slow_block, carry, jnp.arange(n_slow))

        trace = {}
        for n in names:
            if n in costly:
                v = costly[n]  # (n_slow, ...)
                full = jnp.full((n_slow, spec.slow_every) + v.shape[1:], jnp.nan, jnp.float32)
                v = full.at[:, -1].set(v).reshape((n_rec,) + v.shape[1:])
            else:
                v = cheap[n].reshape((n_rec,) + cheap[n].shape[2:])
            trace[n] = jnp.concatenate([init_values[n][None].astype(jnp.float32), v])
        trace["status"] = carry.diverged.astype(jnp.int8)
        trace["diverged_step"] = carry.diverged_step
        return trace

    return run
