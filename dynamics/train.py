"""One training run as one pure function: `run = make_run(spec); trace = run(hp, key)`.

Structure (no Python step loop, no host synchronization):

    records at steps 0, r, 2r, ..., T                       (r = record_every, T = steps)
    scan over T / (r s) slow blocks                          (s = slow_every)      `_slow_block`
      scan over s records                                                          `_record`
        scan over r steps (or r epochs of shuffled batches):                       `_interval`
          sample a batch -> step_fn -> per-step statistics in the carry            `_train_step`
        cheap observables                                   (recording.make_state_observer)
      costly observables (spectra, ranks, sharpness, neural collapse)

The parts have names a reader can find: `_make_sampler` / `_epoch_batch` (which examples a
step sees), `_StepStats` (what accumulates between records), `recording.make_state_observer`
(what a record computes from the state), and `make_run`, which wires them into the scans.

`jax.jit(jax.vmap(run))` over a grid of `Hparams` compiles once and gives every run the
numbers it gets alone. Batch size is traced: a batch always has the static size `spec.batch`
and its first `hp.batch_size` examples carry weight 1/hp.batch_size (the rest 0), so a masked
batch gives the gradient of the smaller batch; batch indices are drawn so that the first b of
them do not depend on the static size B, so grouping runs by batch size ("bucketing") gives the
same numbers as masking.

Training length is `steps` or `epochs`. With epochs, every epoch is a fresh random permutation
of the training set cut into batches of `spec.batch`, the last one partial (PyTorch's
DataLoader with shuffle=True, drop_last=False), so every batch size trains for the same number
of passes over the data; records are then every `record_every` epochs.

A run whose loss or parameters become non-finite is marked diverged at that step; its state
is frozen and every later record is NaN, with no effect on other runs of the same vmap. A run
whose network ends computing the same output for every evaluation input (every ReLU dead) is
marked dead (status 2); a run whose hyperparameters cannot be right for the spec (a batch size
above the static batch) is marked invalid (status 3) and records NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import losses as _losses
from dynamics import models as _models
from dynamics import observables as obs
from dynamics import recording as _rec
from dynamics import schedules as _schedules
from dynamics import stacks as _stacks
from dynamics import steps as _steps
from dynamics.models import Model, scale_weights
from dynamics.recording import (  # noqa: F401  (re-exported: the registry's home was here)
    ALIASES,
    OBSERVABLES,
    Observable,
    ObservableInfo,
    RecordContext,
    StepContext,
    resolve_observables,
)
from dynamics.steps import INT_FIELDS, Batch, Hparams, Stepper

SAMPLINGS = ("replacement", "permutation", "full", "epochs")
GRADIENTS = ("auto", "autodiff")
EVAL_MODES = ("auto", "eval", "train")
PRECISIONS = ("float32", "bfloat16", "float16", "float64")
STATUS = {0: "finished", 1: "diverged", 2: "dead", 3: "invalid"}
DEFAULT_STEPS = 1000

# --------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything static about a run: shapes, step counts, schedule, what to record.

    model: a `Model`; data: a `dynamics.data.Dataset`; loss: a name in `losses.LOSSES` or
    `loss(pred, target, weights)`; stepper: `stepper(loss_fn) -> Stepper` (e.g. `steps.sgd` or
    `functools.partial(steps.sgd, momentum="heavy_ball")`).
    Length: `steps` (default 1000) or `epochs` (not both); records at 0, r, 2r, ... with r =
    record_every steps (or epochs), which must divide the length; observables: names of
    `OBSERVABLES` or `ALIASES` and users' `Observable`s; slow_every: costly observables every
    that many records (NaN in between).
    batch: the static batch dimension (the largest batch size of a sweep, or the exact size when
    runs are grouped by it); required except for sampling="full". sampling: "replacement" (each
    slot i of step t draws an index uniformly; slot i's draw does not depend on B),
    "permutation" (the first `batch` entries of a fresh random permutation per step: without
    replacement), "full" (the whole training set in order: gradient descent) or "epochs"
    (shuffled epochs, the last batch partial: the default with `epochs`).
    lr_schedule: a `dynamics.schedules` schedule multiplying the traced lr (default constant).
    eval_size: records evaluate the first eval_size training examples (None: all).
    eval_mode: how records run a model with state (batch norm): "eval" (running statistics, as
    PyTorch's model.eval(); the default, "auto", for such models) or "train" (the statistics of
    the evaluated batch). rank_tol: tolerance of `rank`; rank_layers: the layers `mean_rank`
    averages (default: all but the output layer); spectrum_method: a method of
    `observables.singular_values` ("auto", "native", "svd" or "gram"); sharpness_iters,
    sharpness_tol: `sharpness` by Lanczos, at most that many Hessian-vector products, stopped
    when the Ritz residual is below sharpness_tol times the value (`observables.sharpness`).
    gradient: "auto" (the training step takes a plain MLP's loss gradient from the compiled CPU
    kernel, `native.dense_loss_fn`, where the model and loss allow it and the kernel is
    available; autodiff otherwise) or "autodiff". precision: "float32"; "bfloat16" / "float16"
    (the forward and backward passes in half precision, float32 master weights, loss and
    observables); "float64" (everything in double; needs `jax.config.update("jax_enable_x64",
    True)` before any array is created). Params, model state and data are cast to the
    precision's dtype (float32 unless "float64") whatever the process's 64-bit mode; under
    `jax_enable_x64` the inits still draw in float64 before the cast, so a float32 run's numbers
    differ from a process without it unless traced inside `jax.enable_x64(False)` (as the sweep
    runner traces its programs). keep_state: the trace also holds the run's final
    `RunState` (parameters, optimizer and model state), to keep or to continue the run.
    data_transform: `f(key, data: RunData, hp) -> RunData`, a pure function giving each run its
    own draw of the data from a key of its own (a fresh noise input or noise realization per
    seed, as papers that fit one example do); None: every run reads the spec's data.
    stack_layers: carry the params (and the optimizer state, the last gradient) from step to
    step as a `stacks.LayerList`, runs of identical layers stacked, for models that take one
    (`Model.init_stacked`) and an autodiff gradient: a uniform stack's step is then the same program
    at any depth (compile time does not grow with it). The numbers are the list's to float
    rounding; observables, `StepContext`, `RecordContext` and "final_state" see the list of
    layers either way. False: the list throughout.
    """

    model: Model
    data: Any
    loss: str | Callable = "square"
    stepper: Callable[..., Stepper] = _steps.sgd
    steps: int | None = None
    record_every: int = 100
    observables: tuple = ("loss",)
    slow_every: int = 1
    batch: int | None = None
    sampling: str | None = None
    eval_size: int | None = 4096
    rank_tol: float = 1e-3
    spectrum_method: str = "auto"
    sharpness_iters: int = 100
    gradient: str = "auto"
    epochs: int | None = None
    lr_schedule: Any = None
    eval_mode: str = "auto"
    rank_layers: tuple[int, ...] | None = None
    precision: str = "float32"
    keep_state: bool = False
    sharpness_tol: float = 1e-4
    data_transform: Callable | None = None
    stack_layers: bool = True

    def __post_init__(self):
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        if self.sampling is None:
            object.__setattr__(self, "sampling", "epochs" if self.epochs else "replacement")
        if isinstance(self.observables, list):
            object.__setattr__(self, "observables", tuple(self.observables))

    def validate(self) -> None:
        """Raise ValueError naming the field if the spec cannot run."""
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"steps and epochs: give one training length, got steps={self.steps} and "
                f"epochs={self.epochs}"
            )
        length_name = "epochs" if self.epochs is not None else "steps"
        length = self.epochs if self.epochs is not None else self.steps
        if not isinstance(length, int | np.integer) or length < 1:
            raise ValueError(f"{length_name}: must be an integer >= 1, got {length!r}")
        if self.record_every < 1 or length % self.record_every:
            raise ValueError(
                f"record_every: {self.record_every} does not divide {length_name}={length}"
            )
        n_rec = length // self.record_every
        if self.slow_every < 1 or n_rec % self.slow_every:
            raise ValueError(
                f"slow_every: {self.slow_every} does not divide the {n_rec} records "
                f"({length_name}/record_every)"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.epochs is not None and self.sampling not in ("epochs", "full"):
            raise ValueError(
                f"sampling: training for epochs takes sampling='epochs' (shuffled epochs) or "
                f"'full', got {self.sampling!r}"
            )
        if self.sampling == "epochs" and self.epochs is None:
            raise ValueError("sampling: 'epochs' needs the training length in epochs (epochs=...)")
        n = self.data.x_train.shape[0]
        if self.sampling != "full":
            if self.batch is None:
                raise ValueError(
                    f"batch: sampling={self.sampling!r} needs the static batch size (the largest "
                    "of a sweep; smaller ones are masked); sampling='full' trains on the whole set"
                )
            if not isinstance(self.batch, int | np.integer) or self.batch < 1:
                raise ValueError(f"batch: must be an integer >= 1, got {self.batch!r}")
            if self.sampling in ("permutation", "epochs") and self.batch > n:
                raise ValueError(f"batch: {self.batch} exceeds the {n} training examples")
        if (
            self.epochs is not None
            and self.sampling == "epochs"
            and self.model.init_state is not None
            and n % self.batch == 1
        ):
            raise ValueError(
                f"batch: {n} training examples in batches of {self.batch} leave a last batch of "
                "one example, whose batch statistics are undefined (PyTorch refuses it): change "
                "the batch size or the number of training examples"
            )
        if self.eval_size is not None and (
            not isinstance(self.eval_size, int | np.integer) or self.eval_size < 1
        ):
            raise ValueError(
                f"eval_size: must be None (all) or an integer >= 1, got {self.eval_size!r}"
            )
        names, user = _rec.split_observables(self.observables)
        if {"test_loss", "test_accuracy"} & set(names) and self.data.x_test.shape[0] == 0:
            raise ValueError(
                "observables: test_loss/test_accuracy need a data set with a test split"
            )
        if set(obs.NC_NAMES) & set(names):
            if self.model.apply_features is None and self.model.forward is None:
                raise ValueError("observables: neural collapse needs a model with apply_features")
            if self.data.num_classes < 2:
                raise ValueError("observables: neural collapse needs class labels")
        if _rec.EPOCH_ONLY & set(names) and self.epochs is None:
            raise ValueError(
                "observables: dist is the change over the last epoch: give the length in epochs"
            )
        if set(_rec.ALIASES["train_margins"]) & set(names) and self.data.num_classes < 2:
            raise ValueError("observables: train margins need class labels")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient: must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.spectrum_method not in obs.SPECTRUM_METHODS:
            raise ValueError(
                f"spectrum_method: must be one of {obs.SPECTRUM_METHODS}, "
                f"got {self.spectrum_method!r}"
            )
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode: must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                "precision: float64 needs jax.config.update('jax_enable_x64', True) before any "
                "array is created"
            )
        if self.data_transform is not None and not callable(self.data_transform):
            raise ValueError("data_transform: must be a function f(key, data, hp) -> RunData")
        if self.sharpness_iters < 1:
            raise ValueError(f"sharpness_iters: must be at least 1, got {self.sharpness_iters}")
        _losses.resolve(self.loss)
        _schedules.resolve(self.lr_schedule)
        n_layers = _check_model_output(self)
        if self.rank_layers is not None:
            bad = [k for k in self.rank_layers if not 0 <= int(k) < n_layers]
            if bad or not self.rank_layers:
                raise ValueError(
                    f"rank_layers: must be layer indices in 0..{n_layers - 1}, got {self.rank_layers}"
                )

    @property
    def static_batch(self) -> int:
        if self.sampling == "full":
            return int(self.data.x_train.shape[0])
        return int(self.batch)

    @property
    def steps_per_epoch(self) -> int:
        """ceil(n_train / batch): one pass over the data at the static batch (1 for "full")."""
        if self.sampling == "full":
            return 1
        return math.ceil(self.data.x_train.shape[0] / self.static_batch)

    @property
    def total_steps(self) -> int:
        if self.epochs is not None:
            return self.epochs * self.steps_per_epoch
        return int(self.steps)

    @property
    def record_axis(self) -> str:
        """The trace's record dimension: "epoch" when the length is in epochs, else "step"."""
        return "epoch" if self.epochs is not None else "step"

    @property
    def n_records(self) -> int:
        length = self.epochs if self.epochs is not None else self.steps
        return length // self.record_every

    def record_steps(self) -> np.ndarray:
        """The step of every record (0 included)."""
        per = self.record_every * (self.steps_per_epoch if self.epochs is not None else 1)
        return np.arange(self.n_records + 1) * per

    def record_epochs(self) -> np.ndarray:
        """The epoch of every record when the length is in epochs (0 included)."""
        return np.arange(self.n_records + 1) * self.record_every

    def record_coords(self) -> np.ndarray:
        return self.record_epochs() if self.epochs is not None else self.record_steps()


def _check_model_output(spec: RunSpec) -> int:
    """The model's output must fit the data: as many outputs as classes for class labels, one for
    +-1 labels, the targets' shape for regression (named losses). Returns the layer count."""
    d = spec.data
    dtype = _rec.record_dtype(spec)  # the run's (a model's init draws float64 under x64)
    params = jax.eval_shape(lambda k: _to(dtype, spec.model.init(k)), jax.random.key(0))
    try:
        n_layers = len(params)
    except TypeError:
        raise ValueError(
            "model: init(key) must return a list with one dict per layer, got "
            f"{type(params).__name__}"
        ) from None
    x = jax.ShapeDtypeStruct((2,) + tuple(d.x_train.shape[1:]), dtype)
    out = jax.eval_shape(lambda p, x: spec.model.apply(p, x, None), params, x)
    width = math.prod(out.shape[1:])
    labels = np.issubdtype(d.y_train.dtype, np.integer)
    names = set(resolve_observables(spec.observables))
    classify = {"accuracy", "test_accuracy", *obs.NC_NAMES} & names or isinstance(spec.loss, str)
    if labels and d.num_classes > 0 and classify and width != d.num_classes:
        raise ValueError(
            f"model: its output has {width} entries per example but the data set "
            f"{d.name!r} has {d.num_classes} classes (labels >= {width} would be one-hot "
            "encoded as zero vectors)"
        )
    if d.binary and isinstance(spec.loss, str) and width != 1:
        raise ValueError(
            f"model: +-1 labels of data set {d.name!r} need one output, the model has {width}"
        )
    if not labels and not d.binary and isinstance(spec.loss, str):
        want = math.prod(d.y_train.shape[1:])
        if width != want:
            raise ValueError(
                f"model: its output has {width} entries per example but the targets of "
                f"{d.name!r} have {want}"
            )
    return n_layers


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

    def arr(a):
        # floating data in the spec's dtype (float32 unless precision is float64), whatever the
        # process's default dtype
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(_rec.record_dtype(spec))
        return a

    return RunData(
        arr(d.x_train),
        arr(d.y_train),
        arr(d.x_train[:n_eval]),
        arr(d.y_train[:n_eval]),
        arr(d.x_test),
        arr(d.y_test),
    )


def as_hparams(hp) -> Hparams:
    """Hparams of float32 arrays (batch_size and stack_depth int32); accepts Python numbers, a
    dict, or a tuple of the leading fields (the rest at their defaults)."""
    if isinstance(hp, dict):
        hp = Hparams(**hp)
    elif not isinstance(hp, Hparams):
        hp = Hparams(*hp)
    return Hparams(
        *[
            jnp.asarray(v, jnp.int32 if f in INT_FIELDS else jnp.float32)
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
        out[f] = jnp.asarray(v, jnp.int32 if f in INT_FIELDS else jnp.float32)
    return Hparams(**out)


_HALF = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _to(dtype, tree):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
    )


def make_loss_fn(
    model: Model, loss: str | Callable, precision: str = "float32"
) -> Callable[[Any, Batch], Any]:
    """The training loss of a model on a weighted batch (see `steps` for the two forms):

        loss_fn(params, batch) = loss(model(params, batch.x, mask), batch.y, batch.weights)

    in train mode (batch statistics over the kept examples, mask = weights > 0). For a model
    with state or randomness it returns (loss, new model state) and reads batch.model_state (`()`:
    none kept, the state returned is `()`) and batch.key; `steps.loss_and_grad` and
    `steps.loss_value` take either form. precision "bfloat16" / "float16": params and inputs are cast to half precision
    for the forward pass (and so the backward pass), the output back to float32 for the loss."""
    loss = _losses.resolve(loss)
    half = _HALF.get(precision)

    def cast(params, x):
        return (params, x) if half is None else (_to(half, params), x.astype(half))

    def out32(pred):
        return pred if half is None else pred.astype(jnp.float32)

    if model.forward is None and not model.stochastic:

        def loss_fn(params, batch: Batch):
            p, x = cast(params, batch.x)
            pred = model.apply(p, x, batch.weights > 0)
            return loss(out32(pred), batch.y, batch.weights)

        return loss_fn

    def stateful_loss_fn(params, batch: Batch):
        p, x = cast(params, batch.x)
        ms = batch.model_state
        if isinstance(ms, tuple) and not ms:  # no state given: batch statistics only, none kept
            f = _models.forward(model, p, None, x, batch.weights > 0, key=batch.key)
            return loss(out32(f.y), batch.y, batch.weights), ()
        f = _models.forward(model, p, ms, x, batch.weights > 0, key=batch.key)
        state = jax.tree.map(lambda new, old: new.astype(old.dtype), f.state, ms)
        return loss(out32(f.y), batch.y, batch.weights), state

    return stateful_loss_fn


def dense_gradient(spec: RunSpec) -> bool:
    """Whether the spec's training step differentiates `native.dense_loss_fn` (spec.gradient
    "auto", a plain MLP and loss the kernel computes, float32, the kernel built): its gradient is
    then the compiled kernel's wherever the program runs on the CPU, autodiff's elsewhere."""
    from dynamics import native

    return (
        spec.gradient == "auto"
        and spec.precision == "float32"
        and native.dense_eligible(spec.model, spec.loss)
        and native.available()
    )


def stacked_layers(spec: RunSpec) -> bool:
    """Whether the spec's runs carry their params as a `stacks.LayerList` (see
    RunSpec.stack_layers)."""
    return (
        bool(spec.stack_layers) and spec.model.init_stacked is not None and not dense_gradient(spec)
    )


def cpu_kernels() -> bool:
    """Whether programs built now run on the CPU, with the compiled kernels."""
    from dynamics import native

    return jax.local_devices()[0].platform == "cpu" and native.available()


def train_loss_fn(spec: RunSpec) -> Callable[[Any, Batch], Any]:
    """The loss function a run's training step differentiates: `make_loss_fn`'s, or where
    `dense_gradient(spec)`, the same loss whose gradient is the compiled kernel's on the CPU
    (`native.dense_loss_fn`: the step's whole forward and backward pass in one call)."""
    if dense_gradient(spec):
        from dynamics import native

        return native.dense_loss_fn(spec.model, spec.loss)
    return make_loss_fn(spec.model, spec.loss, spec.precision)


# --------------------------------------------------------------------------- carry


class RunState(NamedTuple):
    """What a run carries from step to step, apart from its per-interval statistics: the
    stepper's state (parameters, optimizer state), the model's state (running statistics), the
    last gradient (for adjacent-gradient cosines), its per-layer squared norms, and the
    divergence flag and step. `RunSpec(keep_state=True)` returns the final one in the trace
    ("final_state"); `make_run(spec, start=S)` continues a run from it."""

    state: Any
    model_state: Any
    prev_grads: Any
    grad_sq: Any
    diverged: jax.Array
    diverged_step: jax.Array


class _Carry(NamedTuple):
    run: RunState
    acc: dict


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def describe(spec: RunSpec) -> dict[str, tuple[str, ...]]:
    """Dimension names of every variable of a run's trace (after the leading run axes): each
    observable over the record axis ("step", or "epoch" with a length in epochs) and its own
    dimensions; the other record coordinate ("epoch" of each step record, or "step" of each epoch
    record); and per run "status" and "diverged_step"."""
    names, user = _rec.split_observables(spec.observables)
    axis = spec.record_axis
    out = {n: (axis,) + _rec.info(n, user).dims for n in names}
    out["step" if axis == "epoch" else "epoch"] = (axis,)
    out["status"] = ()
    out["diverged_step"] = ()
    return out


def docs(spec: RunSpec) -> dict[str, str]:
    """One line describing every variable of `describe(spec)`."""
    names, user = _rec.split_observables(spec.observables)
    out = {n: _rec.info(n, user).doc for n in names}
    out.update(
        step="the step count at each record",
        epoch="passes over the training set at each record (steps x batch size / n_train)",
        status="-1 not run, 0 finished, 1 diverged, 2 dead (output independent of the input), "
        "3 invalid hyperparameters",
        diverged_step="step whose loss or update was non-finite; -1 if none",
    )
    return out


# --------------------------------------------------------------------------- batches


def _make_sampler(spec: RunSpec, n_train: int, B: int) -> Callable:
    """sample(key, hp, data) -> Batch for a spec whose length is in steps (see RunSpec.sampling)."""

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

    return sample


def _epoch_batch(perm, j, B: int, n_train: int, data: RunData) -> Batch:
    """Batch j of an epoch in the order `perm`: examples perm[jB : (j+1)B], the last batch of the
    epoch holding the remaining n_train - jB, each kept example of weight 1/(its batch's size)."""
    pos = j * B + jnp.arange(B)
    size = jnp.minimum(B, n_train - j * B)
    idx = perm[jnp.minimum(pos, n_train - 1)]
    w = jnp.where(jnp.arange(B) < size, 1.0 / size.astype(jnp.float32), 0.0)
    return Batch(data.x_train[idx], data.y_train[idx], w)


# --------------------------------------------------------------------------- per-step statistics


class _StepStats:
    """The statistics a run accumulates between records (the "step" observables): which need
    what, their zero, their update after each step, and their values at a record."""

    def __init__(self, spec: RunSpec, names, user, n_layers: int, loss: Callable):
        self.spec = spec
        self.names = [n for n in names if _rec.info(n, user).kind == "step"]
        self.user = {n: user[n] for n in self.names if n in user}
        want = set(names)
        self.want = want
        self.n_layers = n_layers
        self.loss = loss
        self.track_cos = bool(want & set(ALIASES["grad_corr"]))
        self.track_update = "update_size" in want
        self.track_loss = "batch_loss" in want
        self.track_grad = "grad_norm" in want or self.track_cos
        self.track_wgrad = "grad_norm_weight" in want
        self.track_margin = bool(want & set(ALIASES["train_margins"]))
        self.track_dist = bool(want & _rec.EPOCH_ONLY)
        self.user_shapes: dict = {}  # set by make_run once the shapes are traced
        self.f = _rec.record_dtype(spec)  # accumulators' dtype: float32, or float64 runs'

    def zero(self) -> dict:
        L = self.n_layers
        acc = {"steps": jnp.zeros((), self.f)}
        if self.track_loss:
            acc["loss"] = jnp.zeros((), self.f)
        if self.track_cos:
            acc.update(
                pairs=jnp.zeros((), self.f),
                cos=jnp.zeros((L,), self.f),
                cos_g=jnp.zeros((), self.f),
                neg=jnp.zeros((L,), self.f),
                neg_g=jnp.zeros((), self.f),
            )
        if self.track_update:
            acc["upd"] = jnp.zeros((L,), self.f)
        if self.track_wgrad:
            acc["wgrad_sq"] = jnp.zeros((L,), self.f)
        if self.track_margin:
            acc.update(
                m_n=jnp.zeros((), self.f),
                m_sum=jnp.zeros((), self.f),
                m_sq=jnp.zeros((), self.f),
                m_min=jnp.full((), jnp.inf, self.f),
            )
        for n, o in self.user.items():
            acc[f"user:{n}"] = _user_zero(o, self.user_shapes[n], self.f)
        return acc

    def update(self, c: RunState, acc: dict, t, batch: Batch, info, new: RunState, hp_t, live):
        """(acc, prev_grads, grad_sq) after step t (new: the run's state after it)."""
        acc = dict(acc)
        inc = live.astype(self.f)
        acc["steps"] = acc["steps"] + inc
        if self.track_loss:
            acc["loss"] = acc["loss"] + jnp.where(live, info.loss, 0.0)
        # Per-step statistics cost a few passes over the gradient: its per-layer squared
        # norms (kept for the next step's cosine) and its inner products with the last one.
        if self.track_cos:  # every step's norms enter the cosines, with its dot with the last
            dots, grad_sq, prev = obs.adjacent_parts(c.prev_grads, info.grads)
        elif self.track_grad:  # only the record interval's last step is read
            grad_sq = jax.lax.cond(
                self._last_of_interval(t), obs.layer_sq_norms, lambda _: c.grad_sq, info.grads
            )
        else:
            grad_sq = ()
        if self.track_cos:
            per, whole = obs.cosines_from_parts(dots, c.grad_sq, grad_sq)
            pair = live & (t > 1)
            pf = pair.astype(self.f)
            acc["pairs"] = acc["pairs"] + pf
            acc["cos"] = acc["cos"] + jnp.where(pair, per, 0.0)
            acc["cos_g"] = acc["cos_g"] + jnp.where(pair, whole, 0.0)
            acc["neg"] = acc["neg"] + pf * (per < 0)
            acc["neg_g"] = acc["neg_g"] + pf * (whole < 0)
        if self.track_update:
            upd = obs.update_sizes(c.state.params, new.state.params, hp_t.lr)
            acc["upd"] = acc["upd"] + jnp.where(live, upd, 0.0)
        if self.track_wgrad:
            acc["wgrad_sq"] = jax.lax.cond(
                self._last_of_interval(t),
                _rec.weight_sq_norms,
                lambda _: acc["wgrad_sq"],
                info.grads,
            )
        if self.track_margin:
            acc = self._margins(acc, c, batch, live)
        if self.user:
            ctx = StepContext(
                t,
                _stacks.unpack(c.state.params),
                _stacks.unpack(new.state.params),
                _stacks.unpack(info.grads),
                info.loss,
                batch,
                hp_t,
                c.model_state,
            )
            first = acc["steps"] == 1  # already counts this step
            for n, o in self.user.items():
                acc[f"user:{n}"] = _user_update(o, acc[f"user:{n}"], o.fn(ctx), live, first)
        # After divergence nothing reads the gradients any more (pairs and records are
        # masked), so they are carried without a select.
        prev = prev if self.track_cos else ()
        return acc, prev, grad_sq

    def _last_of_interval(self, t):
        per = self.spec.record_every * (
            self.spec.steps_per_epoch if self.spec.epochs is not None else 1
        )
        return t % per == 0

    def _margins(self, acc, c: RunState, batch: Batch, live):
        """Normalized margins of the batch's kept examples, in train mode at the parameters
        before the step, over rho_eff with the running statistics that forward pass leaves (the
        P2 authors' collection; pooled over the record interval)."""
        model = self.spec.model
        params = jax.tree.map(jax.lax.stop_gradient, c.state.params)
        f = _models.forward(
            model, params, c.model_state, batch.x, batch.weights > 0, train=True, key=batch.key
        )
        # rho_eff after the forward pass has updated the running statistics, as the P2
        # authors read it (their batch-norm layers update running_var in that same pass)
        r = obs.rho_eff(params, f.state)
        m = obs.margins(f.y, batch.y, r)
        keep = (batch.weights > 0) & live
        kf = keep.astype(self.f)
        acc["m_n"] = acc["m_n"] + jnp.sum(kf)
        acc["m_sum"] = acc["m_sum"] + jnp.sum(jnp.where(keep, m, 0.0))
        acc["m_sq"] = acc["m_sq"] + jnp.sum(jnp.where(keep, m * m, 0.0))
        acc["m_min"] = jnp.minimum(acc["m_min"], jnp.min(jnp.where(keep, m, jnp.inf)))
        return acc

    def values(self, c: RunState, acc: dict, dist=None) -> dict:
        out = {}
        if "batch_loss" in self.want:
            out["batch_loss"] = acc["loss"] / acc["steps"]
        if "grad_norm" in self.want:
            out["grad_norm"] = jnp.where(acc["steps"] > 0, jnp.sqrt(c.grad_sq), jnp.nan)
        if self.track_wgrad:
            out["grad_norm_weight"] = jnp.where(
                acc["steps"] > 0, jnp.sqrt(acc["wgrad_sq"]), jnp.nan
            )
        if self.track_cos:
            out["grad_cos"] = acc["cos"] / acc["pairs"]
            out["grad_cos_global"] = acc["cos_g"] / acc["pairs"]
            out["grad_cos_neg_frac"] = acc["neg"] / acc["pairs"]
            out["grad_cos_neg_frac_global"] = acc["neg_g"] / acc["pairs"]
        if self.track_update:
            out["update_size"] = acc["upd"] / acc["steps"]
        if self.track_margin:
            mean = acc["m_sum"] / acc["m_n"]
            out["train_margin_mean"] = mean
            out["train_margin_std"] = jnp.sqrt(jnp.maximum(acc["m_sq"] / acc["m_n"] - mean**2, 0))
            out["train_margin_min"] = jnp.where(acc["m_n"] > 0, acc["m_min"], jnp.nan)
        if self.track_dist:
            per = dist if dist is not None else jnp.full((self.n_layers,), jnp.nan)
            out["dist_layer"] = per
            out["dist"] = jnp.mean(per)
        for n, o in self.user.items():
            out[n] = _user_value(o, acc[f"user:{n}"], acc["steps"])
        return {n: jnp.asarray(out[n], self.f) for n in self.names}


def _user_zero(o: Observable, shape, dtype) -> jax.Array:
    fill = {"min": jnp.inf, "max": -jnp.inf, "last": jnp.nan, "first": jnp.nan}.get(o.reduce, 0.0)
    return jnp.full(shape, fill, dtype)


def _user_update(o: Observable, acc, value, live, first):
    v = jnp.asarray(value, acc.dtype)
    if o.reduce in ("mean", "sum"):
        return acc + jnp.where(live, v, 0.0)
    if o.reduce == "min":
        return jnp.where(live, jnp.minimum(acc, v), acc)
    if o.reduce == "max":
        return jnp.where(live, jnp.maximum(acc, v), acc)
    if o.reduce == "first":  # the interval's first step (the gradient at its start, say)
        return jnp.where(live & first, v, acc)
    return jnp.where(live, v, acc)  # "last"


def _user_value(o: Observable, acc, steps):
    if o.reduce == "mean":
        return acc / steps
    return jnp.where(steps > 0, acc, jnp.nan)


def _relative_change(new_params, old_params) -> jax.Array:
    """||W_k(new) - W_k(old)||_F / ||W_k(old)||_F per layer (L,)."""

    def one(old, new):
        a, b = _models.layer_weight(old), _models.layer_weight(new)
        return jnp.sqrt(jnp.sum((b - a) ** 2)) / jnp.sqrt(jnp.sum(a**2))

    return _stacks.per_layer(one, old_params, new_params)


# --------------------------------------------------------------------------- the run


def _check_hparams(hp: Hparams) -> None:
    for f, v in zip(Hparams._fields, hp, strict=True):
        shape = jnp.shape(v)
        if shape != ():
            raise ValueError(
                f"hp.{f}: run(hp, key) takes one run's hyperparameters as scalars, got shape "
                f"{shape}; vmap over runs (jax.vmap(run)(hp, keys)) or pass scalars"
            )


def _check_key(key) -> None:
    shape = jnp.shape(key)
    typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
    if (typed and shape != ()) or (not typed and shape != (2,)):
        raise ValueError(
            f"key: run(hp, key) takes one PRNG key (jax.random.key(seed)), got shape {shape}; "
            "vmap over runs with one key per run"
        )


def _masked_init(model, n, key, stacked: bool, n_layers: int):
    """The params of a run cut to `n` layers of the model's stack (`make_run(stack_mask=True)`):
    every layer before the stack's n-th and after the stack drawn from the key the model with
    an n-layer stack draws it from (layer k of a model of n_k layers takes the k-th of
    split(key, n_k), the same key whatever n_k), the skipped layers zeros."""
    st = model.stack
    k = jnp.arange(n_layers)
    idx = jnp.where(k >= st.first + st.count, k - (st.count - _models.cut_count(st.count, n)), k)
    keys = jax.random.split(key, n_layers)
    keys = jax.random.wrap_key_data(jax.random.key_data(keys)[idx], impl=jax.random.key_impl(keys))
    absent = _models.stack_absent(st, n, n_layers)
    if stacked:
        params = _models.stacked_init(model).from_keys(keys)
        segs, off = [], 0
        for seg, count in params.runs():
            gone = absent[off : off + count]
            segs.append(
                jax.tree.map(
                    lambda a, g=gone: jnp.where(g.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a),
                    seg,
                )
            )
            off += count
        return _stacks.LayerList(segs, params.counts)
    params = model.init.from_keys(keys)
    return [
        jax.tree.map(lambda a, g=absent[i]: jnp.where(g, 0, a), p) for i, p in enumerate(params)
    ]


# Observables whose value at a run cut to part of its stack (`models.active_stack`) equals the
# shallower model's: functions of the network's output, per-layer values (the skipped layers'
# entries are NaN), and sums over layers to which a skipped layer (all zeros, zero gradient)
# adds nothing. Everything else (products of layer norms, margins normalized by them, pairs of
# adjacent layers, sharpness's random start vector, neural collapse) keeps one program per
# depth; a user's observable joins with `Observable(..., layerwise=True)`.
MASKABLE = frozenset(
    {
        "loss",
        "accuracy",
        "test_loss",
        "test_accuracy",
        "batch_loss",
        "layer_norm",
        "grad_norm",
        "grad_norm_weight",
        "grad_cos",
        "grad_cos_global",
        "sv",
        "rank",
        "stable_rank",
        "dist_layer",
    }
)


def _stepper_parts(stepper) -> tuple[Callable, dict]:
    f, kw = stepper, {}
    while isinstance(f, functools.partial):
        kw = {**f.keywords, **kw}
        f = f.func
    return f, kw


def masking_refusal(spec: RunSpec) -> str | None:
    """Why runs of the spec cannot be cut to part of their model's stack
    (`make_run(spec, stack_mask=True)`), or None when they can: the model has a `models.Stack`
    whose layers are drawn from keys, the gradient is autodiff's (the compiled MLP gradient
    runs every layer), the optimizer treats every weight on its own (sgd, gd, adam without
    per-layer factors), and every observable is in MASKABLE or a user's layerwise one."""
    model = spec.model
    if getattr(model, "stack", None) is None:
        return "the model has no uniform stack of layers (models.Stack)"
    if getattr(model.init, "from_keys", None) is None:
        return "the model's init does not draw its layers from keys (init.from_keys)"
    if dense_gradient(spec):
        return "the compiled MLP gradient runs every layer (gradient='autodiff' masks)"
    f, kw = _stepper_parts(spec.stepper)
    if f not in (_steps.sgd, _steps.gd, _steps.adam) or any(
        kw.get(k) is not None for k in ("decay_mask", "lr_scale")
    ):
        return "the optimizer is not sgd, gd or adam without per-layer factors"
    if spec.keep_state:
        return "final states are kept (their shapes follow the depth)"
    if spec.rank_layers is not None:
        return "rank_layers names layers by index"
    names, user = _rec.split_observables(spec.observables)
    for n in names:
        if n in user:
            if not getattr(user[n], "layerwise", False):
                return f"observable {n!r} is not marked layerwise (Observable(layerwise=True))"
        elif n not in MASKABLE:
            return f"observable {n!r} depends on every layer at once"
    return None


# Observables whose value at a run of a narrower width inside the widest's program
# (`models.active_width`) equals the narrower model's: the padded weights are zeros with zero
# gradients, so they add nothing to any norm, product of norms, inner product or distance, and
# `sv` keeps the narrower matrix's singular values (the padded matrix's extra ones, zeros, are
# NaN). Sharpness (its random start vector has the padded shape), neural collapse and the NTK
# Gram keep one program per width, as do users' observables (they may read the shapes).
WIDTH_MASKABLE = MASKABLE | frozenset(
    {
        "rho",
        "effective_lr",
        "balancedness",
        "margin_mean",
        "margin_std",
        "margin_min",
        "mean_rank",
        "update_size",
        "dist",
        "grad_cos_neg_frac",
        "grad_cos_neg_frac_global",
        "train_margin_mean",
        "train_margin_std",
        "train_margin_min",
    }
)


def width_refusal(spec: RunSpec, widths: Sequence[int] | None = None) -> str | None:
    """Why runs of the spec cannot run at the narrower `widths` of its model inside one program
    (`make_run(spec, width_mask=widths)`), or None when they can: the model has a
    `models.Width` (and is the widest of `widths`), the gradient is autodiff's (the compiled
    MLP gradient runs the whole width), the optimizer treats every weight on its own (sgd, gd,
    adam), the runs keep no final state and no data transform, and every observable is in
    WIDTH_MASKABLE."""
    model = spec.model
    w = getattr(model, "width", None)
    if w is None:
        return "the model has no width of its own (models.Width)"
    if widths is not None:
        if not widths or any(int(v) < 1 for v in widths):
            return f"widths must be positive, got {tuple(widths)}"
        if max(int(v) for v in widths) != w.value:
            return f"the model's width {w.value} is not the largest of {tuple(widths)}"
    if dense_gradient(spec):
        return "the compiled MLP gradient runs the whole width (gradient='autodiff' masks)"
    f, _ = _stepper_parts(spec.stepper)
    if f not in (_steps.sgd, _steps.gd, _steps.adam):
        return "the optimizer is not sgd, gd or adam"
    if spec.keep_state:
        return "final states are kept (their shapes follow the width)"
    if spec.data_transform is not None:
        return "a data transform may read the model's shapes"
    names, user = _rec.split_observables(spec.observables)
    for n in names:
        if n in user:
            return f"observable {n!r} is a user's (it may read the width's shapes)"
        if n not in WIDTH_MASKABLE:
            return f"observable {n!r} depends on the width's shapes"
    return None


def _width_models(model, widths) -> list:
    """The models at each of `widths` (the model's own at its width), each of the model's
    family."""
    out = []
    for w in widths:
        m = model if int(w) == model.width.value else model.width.at(int(w))
        if getattr(m, "width", None) is None or m.width.family != model.width.family:
            raise ValueError(f"width_mask: the model's family gives no model of width {w}")
        out.append(m)
    return out


def _width_init(model, models, widths, n, key, stacked: bool):
    """The params of a run at width `n` (traced; -1: the model's own) of `widths`: the width-n
    model's init from `key`, zero-padded to the model's shapes (`models.pad_params`)."""
    init = (lambda m: _models.stacked_init(m)) if stacked else (lambda m: m.init)
    like = jax.eval_shape(init(model), key)
    params = init(model)(key)
    for m, w in zip(models, widths, strict=True):
        if m is model:
            continue
        p = _models.pad_params(init(m)(key), like)
        params = jax.tree.map(lambda a, b, w=w: jnp.where(n == w, a, b), p, params)
    return params


def _sv_counts(models) -> np.ndarray:
    """(len(models), n_layers) int: how many singular values each layer of each model has."""
    rows = []
    for m in models:
        shapes = jax.eval_shape(_models.layer_weights, jax.eval_shape(m.init, jax.random.key(0)))
        rows.append([min(s.shape) for s in shapes])
    return np.asarray(rows, np.int32)


def make_run(
    spec: RunSpec,
    *,
    start: int = 0,
    stack_mask: bool = False,
    width_mask: Sequence[int] | None = None,
) -> Callable:
    """Build `run(hp, key, data=None, init=None) -> trace` for a spec.

    hp: `Hparams` of scalars (arrays or numbers; vmap `run` for a grid); key: a PRNG key, split
    into an initialization key and a data-order key, so runs that share a key share their
    initialization and batches. data: `RunData` (default: the spec's data set).
    trace: dict of float32 arrays (float64 with precision="float64") of shape (n_records,
    *dims) per observable, with
    n_records = length / record_every + 1 (the initialization included; per-step statistics
    are NaN there and costly ones NaN between their records), the other record coordinate
    ("epoch" of each step record, or "step" of each epoch record), "status" (`STATUS`: 0
    finished, 1 diverged, 2 dead, 3 invalid) and "diverged_step" (the step whose loss or update
    was non-finite, -1 if none); with spec.keep_state, "final_state", the run's final `RunState`.

    start: continue runs from their state after `start` steps (or epochs) of this same spec,
    passed as `init` (a "final_state" of a run of the same spec trained for that length): the
    trace then holds the records after `start` only and equals the corresponding records of a
    run trained from the beginning (the schedule must not depend on the total length).

    stack_mask: each run's `hp.stack_depth` (0 .. the model's `Stack.count`; -1: all) cuts the
    model's uniform stack to that many layers (`models.active_stack`; the skipped layers start
    at zero and carry h through), so one program trains runs of several depths, each equal to
    a run of the shallower model (`models.masked_stack`) to float rounding; the skipped layers'
    entries of every per-layer record are NaN. The spec must allow it (`masking_refusal`).
    Without it a run whose hp.stack_depth is not -1 is invalid (status 3).

    width_mask: the widths (the model's `Width.value` the largest) whose runs share the
    program: each run's `hp.width` (one of them; -1: the model's own) runs the model at that
    width (`models.active_width`; its params are the narrower model's init from the run's key,
    zero-padded, and stay zero), so one program trains runs of several widths, each equal to a
    run of the narrower model to float rounding; `sv` entries past a narrower layer's count
    are NaN. The spec must allow it (`width_refusal`); with stack_mask it is refused. Without
    it a run whose hp.width is not -1 is invalid (status 3).
    """
    spec.validate()
    if stack_mask and width_mask is not None:
        raise ValueError("width_mask: a program masks the depth or the width, not both")
    if stack_mask and (why := masking_refusal(spec)) is not None:
        raise ValueError(f"stack_mask: {why}")
    if width_mask is not None:
        width_mask = tuple(int(w) for w in width_mask)
        if (why := width_refusal(spec, width_mask)) is not None:
            raise ValueError(f"width_mask: {why}")
        width_models = _width_models(spec.model, width_mask)
        sv_counts = _sv_counts(width_models)
    names, user = _rec.split_observables(spec.observables)
    model = spec.model
    loss = _losses.resolve(spec.loss)
    stepper = spec.stepper(train_loss_fn(spec))
    schedule = _schedules.resolve(spec.lr_schedule)
    default_data = run_data(spec)
    B = spec.static_batch
    n_train = int(spec.data.x_train.shape[0])
    epochs_mode = spec.epochs is not None
    spe = spec.steps_per_epoch
    total = spec.total_steps
    R = spec.record_every * (spe if epochs_mode else 1)  # steps per record interval
    stateful = model.forward is not None
    stochastic = model.stochastic
    if start:
        if start % (spec.record_every * spec.slow_every) or not 0 < start < spec.n_records * (
            spec.record_every
        ):
            raise ValueError(
                f"start: must be a multiple of record_every x slow_every inside the run's length, "
                f"got {start}"
            )
        if schedule.needs_length:
            raise ValueError("start: a schedule that depends on the run's length cannot continue")

    params_shape = jax.eval_shape(model.init, jax.random.key(0))
    n_layers = len(params_shape)
    want = set(names)
    sv_pad = obs.max_singular_values(params_shape) if want & _rec.SPECTRAL else 0
    stats = _StepStats(spec, names, user, n_layers, loss)
    observe = _rec.make_state_observer(
        spec, loss, make_loss_fn(model, loss), n_layers, sv_pad, user
    )
    state_names = [n for n in names if _rec.info(n, user).kind == "state"]
    cheap_state = [n for n in state_names if not _rec.info(n, user).costly]
    costly_state = [n for n in state_names if _rec.info(n, user).costly]
    sample = _make_sampler(spec, n_train, B)

    r0 = start // spec.record_every  # records already done
    n_rec = spec.n_records - r0
    n_slow = n_rec // spec.slow_every
    # The step loop is unrolled by two when adjacent gradients are compared with XLA's
    # reductions (off the CPU, or without the compiled kernels), so that the last gradient and
    # the new one alternate between two buffers instead of being copied into the carry. The CPU
    # kernel (`observables.adjacent_parts`) writes the new gradient over the last one, and there
    # unrolling only doubles the gradients in flight: the reference grid with every observable
    # ran 0.4-4.5% slower with it (three A/B runs), its batch-128 runs 5-6%.
    unroll = 2 if stats.track_cos and not cpu_kernels() else 1
    stacked = stacked_layers(spec)
    param_dtype = _rec.record_dtype(spec)  # float32 master weights under half precision

    def initial_params(hp, k_init, stacked=False):
        if stack_mask:
            params = _masked_init(model, hp.stack_depth, k_init, stacked, n_layers)
        elif width_mask is not None:
            params = _width_init(model, width_models, width_mask, hp.width, k_init, stacked)
        else:
            params = _models.stacked_init(model)(k_init) if stacked else model.init(k_init)
        params = scale_weights(params, hp.init_scale)
        # the spec's dtype whatever the process's default (a model's init draws float64 under
        # jax_enable_x64, which a float64 sweep earlier in the process turns on)
        return _to(param_dtype, params)

    def initial_state(hp, k_init) -> RunState:
        params = initial_params(hp, k_init, stacked)
        ms = _to(param_dtype, _models.init_state(model, k_init)) if stateful else ()
        state = stepper.init_fn(params)
        prev0 = jax.tree.map(jnp.zeros_like, params) if stats.track_cos else ()
        sq0 = jnp.zeros((n_layers,), stats.f) if stats.track_grad else ()
        return RunState(state, ms, prev0, sq0, jnp.zeros((), bool), jnp.full((), -1, jnp.int32))

    def user_shapes() -> dict:
        """Shapes of the users' step observables' values (traced once, abstractly)."""
        shapes = {}
        for n, o in stats.user.items():

            def one(hp, key, o=o):
                c = initial_state(hp, key)
                b = _epoch_batch(
                    jnp.arange(n_train), jnp.zeros((), jnp.int32), B, n_train, default_data
                )
                params = _stacks.unpack(c.state.params)
                ctx = StepContext(
                    jnp.ones((), jnp.int32),
                    params,
                    params,
                    params,
                    jnp.zeros(()),
                    b,
                    hp,
                    c.model_state,
                )
                return o.fn(ctx)

            shapes[n] = jax.eval_shape(one, as_hparams(Hparams()), jax.random.key(0)).shape
        return shapes

    stats.user_shapes = user_shapes()

    def run(hp, key, data: RunData | None = None, init: RunState | None = None):
        hp = as_hparams(hp)
        _check_hparams(hp)
        _check_key(key)
        if width_mask is not None:
            n = jnp.where(hp.width < 0, model.width.value, hp.width)
            with _models.active_width(model.width, n):
                trace = run_body(hp, key, data, init)
            if "sv" in trace:
                row = jnp.asarray(sv_counts[-1])
                for w, counts in zip(width_mask, sv_counts, strict=True):
                    row = jnp.where(n == w, jnp.asarray(counts), row)
                past = jnp.arange(trace["sv"].shape[-1])[None, :] >= row[:, None]
                trace["sv"] = jnp.where(past[None], jnp.nan, trace["sv"])
            return trace
        if not stack_mask:
            return run_body(hp, key, data, init)
        with _models.active_stack(model.stack, hp.stack_depth):
            trace = run_body(hp, key, data, init)
        absent = _models.stack_absent(model.stack, hp.stack_depth, n_layers)
        for n, dims in layer_dims.items():
            k = 1 + dims.index("layer")  # after the record axis
            skip = absent.reshape((1,) * k + (-1,) + (1,) * (trace[n].ndim - k - 1))
            trace[n] = jnp.where(skip, jnp.nan, trace[n])
        return trace

    layer_dims = {n: _rec.info(n, user).dims for n in names if "layer" in _rec.info(n, user).dims}

    def run_body(hp, key, data, init):
        data = default_data if data is None else data
        if isinstance(hp.batch_size, jax.Array) and not isinstance(hp.batch_size, jax.core.Tracer):
            bs = int(hp.batch_size)
            if bs < 0 or bs > B or (epochs_mode and bs not in (0, B)):
                raise ValueError(
                    f"hp.batch_size: {bs} does not fit the spec's static batch {B} "
                    + (
                        "(with epochs, runs are grouped by batch size: give 0 or the batch)"
                        if epochs_mode
                        else "(give at most spec.batch, the largest of a sweep)"
                    )
                )
        invalid = (hp.batch_size < 0) | (hp.batch_size > B)
        if stack_mask:
            invalid = invalid | (hp.stack_depth < -1) | (hp.stack_depth > model.stack.count)
        else:
            invalid = invalid | (hp.stack_depth != -1)
        if width_mask is not None:
            known = functools.reduce(jnp.logical_or, [hp.width == w for w in (-1,) + width_mask])
            invalid = invalid | ~known
        else:
            invalid = invalid | (hp.width != -1)
        if epochs_mode:
            invalid = invalid | ((hp.batch_size != 0) & (hp.batch_size != B))
        k_init, k_data = jax.random.split(key)
        k_obs = jax.random.fold_in(key, 7)
        k_model = jax.random.fold_in(key, 11)
        k_costly = jax.random.fold_in(key, 17)
        if spec.data_transform is not None:
            data = spec.data_transform(jax.random.fold_in(key, 13), data, hp)
        if init is None:
            if start:
                raise ValueError("init: make_run(spec, start=...) continues a run: pass its state")
            c0 = initial_state(hp, k_init)
        else:
            c0 = init
            if stacked:  # the kept state holds lists of layers: in the run's layout
                c0 = _stacks.pack_tree(jax.eval_shape(initial_state, hp, k_init), c0)
        c0 = c0._replace(diverged=c0.diverged | invalid)

        def applied(hp, t):
            if schedule.constant:
                return hp
            return hp._replace(lr=hp.lr * schedule(t, spe, total))

        def train_step(c: _Carry, t, batch: Batch) -> _Carry:
            """One step t (1-based) on `batch`: the update, divergence, per-step statistics."""
            run_c = c.run
            if stateful or stochastic:
                batch = batch._replace(
                    model_state=run_c.model_state,
                    key=jax.random.fold_in(k_model, t) if stochastic else None,
                )
            hp_t = applied(hp, t)
            new_state, info = stepper.step_fn(run_c.state, batch, hp_t)
            # Divergence is read off the loss each step; the parameters are checked once per
            # record interval (see `check_params`), which pins the same step: non-finite
            # parameters give a non-finite loss at the next step. The freeze is then a select
            # the update's own loop absorbs, instead of two more passes over the parameters.
            ok = jnp.isfinite(info.loss)
            diverged = run_c.diverged | ~ok
            live = ~diverged
            state = _tree_where(diverged, run_c.state, new_state)
            ms = _tree_where(diverged, run_c.model_state, info.model_state) if stateful else ()
            new = run_c._replace(state=state, model_state=ms)
            acc, prev, grad_sq = stats.update(run_c, c.acc, t, batch, info, new, hp_t, live)
            div_step = jnp.where(run_c.diverged | ok, run_c.diverged_step, t.astype(jnp.int32))
            new = new._replace(
                prev_grads=prev, grad_sq=grad_sq, diverged=diverged, diverged_step=div_step
            )
            return _Carry(new, acc)

        def check_params(c: RunState, t0, t1) -> RunState:
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

        def steps_of(c: _Carry, t_first, n):
            """n steps from step t_first on, sampled per step (length in steps)."""

            def step(c, t):
                return train_step(c, t, sample(jax.random.fold_in(k_data, t), hp, data)), None

            ts = t_first + jnp.arange(n, dtype=jnp.int32)
            return jax.lax.scan(step, c, ts, unroll=unroll)[0]

        def epochs_of(c: _Carry, e_first, n):
            """n shuffled epochs from epoch e_first (0-based) on."""

            if spec.sampling == "full":  # one step per epoch, the whole set in order
                return steps_of(c, e_first + 1, n)

            def epoch(c, e):
                perm = jax.random.permutation(jax.random.fold_in(k_data, e), n_train)

                def step(c, j):
                    t = e * spe + j + 1
                    return train_step(c, t, _epoch_batch(perm, j, B, n_train, data)), None

                return jax.lax.scan(step, c, jnp.arange(spe, dtype=jnp.int32))[0], None

            return jax.lax.scan(epoch, c, e_first + jnp.arange(n, dtype=jnp.int32))[0]

        def interval(c: _Carry, r):
            """The steps of record interval r (1-based): steps (r-1)R+1 .. rR. Returns the carry
            and, for `dist`, the per-layer relative change over the interval's last epoch."""
            if not epochs_mode:
                return steps_of(c, (r - 1) * R + 1, R), None
            e0 = (r - 1) * spec.record_every
            if not stats.track_dist:
                return epochs_of(c, e0, spec.record_every), None
            c = epochs_of(c, e0, spec.record_every - 1) if spec.record_every > 1 else c
            before = c.run.state.params
            c = epochs_of(c, e0 + spec.record_every - 1, 1)
            return c, _relative_change(c.run.state.params, before)

        def observed(params, diverged):
            # a diverged run's records are NaN; its (possibly non-finite) parameters are not
            # handed to the observables, whose LAPACK calls would only be slowed by them
            return jax.tree.map(lambda x: jnp.where(diverged, jnp.zeros_like(x), x), params)

        def mask_nan(values: dict, diverged) -> dict:
            return {n: jnp.where(diverged, jnp.nan, v) for n, v in values.items()}

        def observe_at(c: RunState, r, which, key):
            step = jnp.asarray(r * R, jnp.int32)
            return observe(
                observed(c.state.params, c.diverged),
                observed(c.model_state, c.diverged),
                applied(hp, jnp.maximum(step, 1)),
                data,
                key,
                step,
                which,
                lambda: jax.tree.map(jax.lax.stop_gradient, initial_params(hp, k_init)),
            )

        def record(c: _Carry, r):
            """Record interval r's steps, then its cheap observables."""
            c, dist = interval(c, r)
            run_c = check_params(c.run, (r - 1) * R, r * R)
            values = stats.values(run_c, c.acc, dist)
            values.update(observe_at(run_c, r, cheap_state, jax.random.fold_in(k_obs, r)))
            return _Carry(run_c, stats.zero()), mask_nan(values, run_c.diverged)

        def slow_block(c: _Carry, s):
            rs = r0 + s * spec.slow_every + 1 + jnp.arange(spec.slow_every)
            c, cheap = jax.lax.scan(record, c, rs)
            r_last = r0 + (s + 1) * spec.slow_every
            # a stream of its own, indexed by the record: the same whatever the run's length,
            # so a continued run's costly records (sharpness's start vector) equal a longer run's
            key = jax.random.fold_in(k_costly, r_last)
            costly = observe_at(c.run, r_last, costly_state, key)
            return c, (cheap, mask_nan(costly, c.run.diverged))

        carry = _Carry(c0, stats.zero())
        carry, (cheap, costly) = jax.lax.scan(slow_block, carry, jnp.arange(n_slow))

        trace = {}
        record_names = [n for n in names]
        if not start:
            # step 0: state observables at initialization; per-step statistics are NaN (0/0).
            init_values = stats.values(c0, stats.zero())
            init_values.update(observe_at(c0, 0, state_names, jax.random.fold_in(k_obs, 0)))
            init_values = mask_nan(init_values, invalid)
        for n in record_names:
            if n in costly:
                v = costly[n]  # (n_slow, ...)
                full = jnp.full((n_slow, spec.slow_every) + v.shape[1:], jnp.nan, v.dtype)
                v = full.at[:, -1].set(v).reshape((n_rec,) + v.shape[1:])
            else:
                v = cheap[n].reshape((n_rec,) + cheap[n].shape[2:])
            if not start:
                v = jnp.concatenate([init_values[n][None].astype(v.dtype), v])
            trace[n] = v
        steps_at = spec.record_steps()[(r0 + 1 if start else 0) :]
        if epochs_mode:
            trace["step"] = jnp.asarray(steps_at, jnp.int32)
        else:
            bs = jnp.where(hp.batch_size > 0, hp.batch_size, B).astype(jnp.float32)
            trace["epoch"] = jnp.asarray(steps_at, jnp.float32) * bs / n_train
        final = carry.run
        dead = ~final.diverged & _output_is_constant(final, data)
        status = jnp.where(final.diverged, 1, jnp.where(dead, 2, 0))
        trace["status"] = jnp.where(invalid, 3, status).astype(jnp.int8)
        trace["diverged_step"] = jnp.where(invalid, -1, final.diverged_step)
        if spec.keep_state:
            trace["final_state"] = _stacks.unpack_tree(final)
        return trace

    def _output_is_constant(c: RunState, data) -> jax.Array:
        """Whether the final network gives every evaluation input the same output (a dead ReLU
        network: its function no longer depends on the input)."""
        params = jax.tree.map(jax.lax.stop_gradient, c.state.params)
        train = spec.eval_mode == "train" or not stateful
        y = _models.forward(model, params, c.model_state, data.x_eval, None, train=train).y
        y = y.reshape(y.shape[0], -1)
        return jnp.all(y == y[:1]) & (y.shape[0] > 1)

    return run
