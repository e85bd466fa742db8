"""Users' Flax modules (`flax.linen` and `flax.nnx`) as `Model`s that keep the models' contract.

Layers. params is a list with one dict per weight layer, in the order the input meets them:
a weight layer is a module owning a parameter named "kernel" (Dense, Conv, nnx.Linear, ...),
wherever it sits (nnx.Sequential, nnx.List, a linen block of several Dense, submodules of
submodules). The order is the order in which one traced forward pass first reads each
module's variables (the equations of its jaxpr), so it does not depend on attribute names or
on how the module tree is nested. A layer dict holds its module's own parameters under their
names ("kernel", "bias"; `models.layer_weight` reads "kernel" moved to (out, ...)) and carries
the parameters of modules without a kernel (LayerNorm's scale and bias, a bias-only module)
that run after it, under their path in the module tree joined by "/" (e.g. "LayerNorm_0/scale",
"blocks/1/bias"; a root module's own parameter "c" as "/c"); those that run before the first
weight layer go into the first layer's dict. Every parameter is trained; observables that read
a layer's weight (rho, spectra, grad_norm_weight) read its kernel; grad_norm counts all of the
layer's entries; `models.scale_weights` (hp.init_scale) scales every kernel.

State. Variables that are not trained (linen's "batch_stats" and other collections except
"params" and "intermediates"; nnx's BatchStat and every Variable that is neither a Param nor
RNG state) are the model's state: `init_state(key)` gives a list with one dict per layer
(keys: the variable's path joined by "/", with the linen collection first, e.g.
"batch_stats/BatchNorm_0/mean"; {} for a layer without state), no gradient reaches them and
weight decay never touches them. `forward(params, state, x, mask, train=..., key=...)` updates
them in train mode and reads them in eval mode.

Train and eval mode, as PyTorch's model.train() / model.eval():
  linen: `train_arg="train"` passes train=True / False to the module's call,
         `deterministic_arg="deterministic"` passes deterministic=False / True; a BatchNorm
         whose `use_running_average` and a Dropout whose `deterministic` are given neither in
         the constructor nor in the call follow the mode too (batch statistics and dropout in
         train mode, running averages and no dropout in eval mode).
  nnx:   the module's `.train()` / `.eval()` (every `deterministic` and `use_running_average`
         attribute), plus the same optional `train_arg` / `deterministic_arg`.
Batch norm only pools the examples the batch mask keeps: in train mode every `BatchNorm` call
(linen and nnx, and their subclasses) receives `mask` (broadcast over the input's non-batch
axes, combined with a mask the user passes), so a masked batch gives the loss, gradient and
running statistics of the smaller batch.

Randomness. A module that draws random numbers in train mode (dropout) gives a `stochastic`
Model: the run passes a fresh key per step; linen gets `rngs={stream: fold_in(key, i)}` for the
streams `rng_streams` (default ("dropout",)); nnx's RNG state (RngKey, RngCount) is neither a
parameter nor carried: each stream key is replaced by fold_in(key, j) (count 0) at every call.
The same key gives the same output; eval mode draws nothing. In train mode without a key
(`Model.apply`, records with eval_mode="train") the draws come from key 0.

Features. `apply_features` / `Forward.h` is the input of the last weight layer (flattened per
example), the penultimate features; linen's `features_method` names a method returning them
instead.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as _jcore

from dynamics.models import Forward, Model

WEIGHT_NAME = "kernel"
_NOT_STATE = ("params", "intermediates")


# --------------------------------------------------------------------------- layout


class _Leaf(NamedTuple):
    module: tuple  # path of the module owning the leaf
    name: Any  # the leaf's name inside its module
    path: tuple  # the full path (linen state: the collection first)


def _joined(path: tuple) -> str:
    s = "/".join(str(p) for p in path)
    return s if len(path) > 1 else "/" + s


class _Layout:
    """Which layer dict, under which key, each flat leaf of the framework's tree goes to.

    params, state: the leaves in the framework's flat order; rank: one sortable key per leaf
    (params then state), the order the forward pass reads them. Modules are ordered by their
    first-read leaf; each module with a "kernel" parameter opens a layer."""

    def __init__(self, params: list[_Leaf], state: list[_Leaf], rank: list, what: str):
        n = len(params)
        first: dict[tuple, Any] = {}
        p_of: dict[tuple, list[int]] = {}
        s_of: dict[tuple, list[int]] = {}
        for i, leaf in enumerate(params + state):
            m = leaf.module
            p_of.setdefault(m, [])
            s_of.setdefault(m, [])
            (p_of[m] if i < n else s_of[m]).append(i if i < n else i - n)
            first[m] = min(first.get(m, rank[i]), rank[i])
        order = sorted(first, key=lambda m: first[m])
        self.param_slots: list[list[tuple[str, int]]] = []
        self.state_slots: list[list[tuple[str, int]]] = []
        self.weight_modules: list[tuple] = []
        pending_p: list[tuple[str, int]] = []
        pending_s: list[tuple[str, int]] = []
        for m in order:
            ps, ss = p_of[m], s_of[m]
            state_keys = [(_joined(state[i].path), i) for i in ss]
            if any(params[i].name == WEIGHT_NAME for i in ps):
                own = [(str(params[i].name), i) for i in ps]
                self.param_slots.append(pending_p + own)
                self.state_slots.append(pending_s + state_keys)
                self.weight_modules.append(m)
                pending_p, pending_s = [], []
                continue
            carried = [(_joined(params[i].path), i) for i in ps]
            if self.param_slots:
                self.param_slots[-1].extend(carried)
                self.state_slots[-1].extend(state_keys)
            else:
                pending_p.extend(carried)
                pending_s.extend(state_keys)
        if not self.param_slots:
            raise ValueError(
                f"{what}: the module has no weight layer (no parameter named {WEIGHT_NAME!r}); "
                "adapted modules need at least one Dense/Linear/Conv layer"
            )
        self.n_params = len(params)
        self.n_state = len(state)

    def layers(self, leaves: Sequence) -> list[dict]:
        return [{k: leaves[i] for k, i in slots} for slots in self.param_slots]

    def leaves(self, layers) -> list:
        if not isinstance(layers, list | tuple) or len(layers) != len(self.param_slots):
            n = len(layers) if isinstance(layers, list | tuple) else type(layers).__name__
            raise ValueError(
                f"params: expected the adapter's list of {len(self.param_slots)} layer dicts, "
                f"got {n}"
            )
        out: list = [None] * self.n_params
        for p, slots in zip(layers, self.param_slots, strict=True):
            for k, i in slots:
                out[i] = p[k]
        return out

    def state_layers(self, leaves: Sequence) -> list[dict]:
        return [{k: leaves[i] for k, i in slots} for slots in self.state_slots]

    def state_leaves(self, layers) -> list:
        if not isinstance(layers, list | tuple) or len(layers) != len(self.state_slots):
            raise ValueError(
                f"state: expected the adapter's list of {len(self.state_slots)} per-layer dicts "
                "(Model.init_state)"
            )
        out: list = [None] * self.n_state
        for s, slots in zip(layers, self.state_slots, strict=True):
            for k, i in slots:
                out[i] = s[k]
        return out


def _first_reads(fn: Callable, *args) -> list:
    """For each leaf of args (flattened, in order): the index of the first equation of fn's
    jaxpr that reads it (math.inf if none does). Equations are in the order the Python code ran,
    so this is the order the forward pass meets the variables."""
    closed = jax.make_jaxpr(fn)(*args)
    invars = closed.jaxpr.invars
    where = {v: i for i, v in enumerate(invars)}
    first = [math.inf] * len(invars)
    for k, eqn in enumerate(closed.jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, _jcore.Literal):
                continue
            i = where.get(v)
            if i is not None and first[i] == math.inf:
                first[i] = k
    return first


# --------------------------------------------------------------------------- shared helpers


def _batch_mask(mask, x):
    """The batch mask broadcast over a batch norm input's non-batch axes."""
    mask = jnp.asarray(mask, bool)
    if x.ndim == 0 or x.shape[0] != mask.shape[0]:
        raise ValueError(
            f"mask: a batch norm input of shape {tuple(x.shape)} does not lead with the batch "
            f"axis of {mask.shape[0]} examples, so the batch mask cannot be applied to it"
        )
    return mask.reshape((mask.shape[0],) + (1,) * (x.ndim - 1))


def _with_mask(kwargs: dict, mask, x) -> dict:
    m = _batch_mask(mask, x)
    user = kwargs.get("mask")
    kwargs = dict(kwargs)
    if user is None:
        kwargs["mask"] = m
    else:
        kwargs["mask"] = jnp.logical_and(jnp.asarray(user, bool), m)
    return kwargs


def _features(h):
    if h is None:
        return None
    return h if h.ndim == 2 else h.reshape(h.shape[0], -1)


def _default_key():
    """The key of calls that get none (train mode without a key, untracked state's initial
    values): threefry's key 0, whose draws are the same in every lane of a vmap."""
    return jax.random.key(0)


def _as_typed_key(key):
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _mode_kwargs(train: bool, train_arg: str | None, deterministic_arg: str | None) -> dict:
    kw = {}
    if train_arg is not None:
        kw[train_arg] = train
    if deterministic_arg is not None:
        kw[deterministic_arg] = not train
    return kw


def _model(init_fn, fwd, init_state_fn, stochastic) -> Model:
    def apply(params, x, mask=None):
        return fwd(params, None, x, mask, train=True).y

    def apply_features(params, x, mask=None):
        f = fwd(params, None, x, mask, train=True)
        return f.y, f.h

    return Model(init_fn, apply, apply_features, None, init_state_fn, fwd, stochastic)


# --------------------------------------------------------------------------- linen


def _walk(tree, prefix=()):
    """(path, leaf) of a nested mapping in insertion order (flax's creation order)."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _nest(pairs) -> dict:
    out: dict = {}
    for path, v in pairs:
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def from_flax(
    module,
    example_x,
    *,
    features_method: str | None = None,
    train_arg: str | None = None,
    deterministic_arg: str | None = None,
    rng_streams: Sequence[str] = ("dropout",),
) -> Model:
    """Turn a `flax.linen` module into a `Model` (layout, state and modes: the module docstring).

    params = [layer_1, ..., layer_L], one dict per module with a "kernel" in the order the
    input meets them; state = per-layer dicts of the non-trained collections (batch_stats).
    forward(params, state, x, mask, train, key):
        train: module.apply(vars, x, mutable=state collections, rngs=streams from key,
               train_arg=True / deterministic_arg=False), every BatchNorm called with
               mask=mask (padding examples never enter the batch statistics);
        eval:  module.apply(vars, x, train_arg=False / deterministic_arg=True), state read only.
    example_x: one batch of inputs (batch axis first), used to trace shapes and the layer order
    once. features_method: a method returning the penultimate features (default: the input of
    the last weight layer). rng_streams: the rng names the module draws from in train mode.
    Raises ValueError if eval mode would update the state or draw random numbers (give
    train_arg / deterministic_arg), or if a state collection changes its structure in a call.
    """
    import flax.errors
    import flax.linen as nn

    rng_streams = tuple(rng_streams)

    class _Call:
        """What the interceptor needs during one apply (a new one per call: thread-safe)."""

        def __init__(self, train, mask, capture_path):
            self.train, self.mask, self.capture_path, self.h = train, mask, capture_path, None

        def __call__(self, next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__":
                if isinstance(mod, nn.BatchNorm):
                    if self.mask is not None and args:
                        kwargs = _with_mask(kwargs, self.mask, args[0])
                    if (
                        mod.use_running_average is None
                        and kwargs.get("use_running_average") is None
                        and len(args) < 2
                    ):
                        kwargs = {**kwargs, "use_running_average": not self.train}
                elif isinstance(mod, nn.Dropout):
                    if (
                        mod.deterministic is None
                        and kwargs.get("deterministic") is None
                        and (len(args) < 2)
                    ):
                        kwargs = {**kwargs, "deterministic": not self.train}
                if self.capture_path is not None and mod.path == self.capture_path:
                    self.h = args[0] if args else next(iter(kwargs.values()), None)
            return next_fun(*args, **kwargs)

    def call(variables, x, *, train, mask, key, mutable, capture_path=None, method=None):
        rngs = None
        if key is not None:
            key = _as_typed_key(key)
            rngs = {s: jax.random.fold_in(key, i) for i, s in enumerate(rng_streams)}
        ctx = _Call(train, mask, capture_path)
        kw = _mode_kwargs(train, train_arg, deterministic_arg)
        with nn.intercept_methods(ctx):
            out = module.apply(variables, x, rngs=rngs, mutable=mutable, method=method, **kw)
        return out, ctx.h

    def init_variables(key):
        key = _as_typed_key(key)
        rngs = {"params": key}
        rngs.update({s: jax.random.fold_in(key, i + 1) for i, s in enumerate(rng_streams)})
        ctx = _Call(False, None, None)
        with nn.intercept_methods(ctx):
            return module.init(rngs, example_x, **_mode_kwargs(False, train_arg, deterministic_arg))

    # flax keeps variables in creation order, but eval_shape returns dicts with sorted keys;
    # the creation order (the tie-break of the layer order) is read inside the trace.
    created: list = []

    def _init(k):
        v = init_variables(k)
        created.append([(c,) + p for c in v for p, _ in _walk(v[c])])
        return v

    shapes = jax.eval_shape(_init, jax.random.key(0))
    state_cols = [c for c in shapes if c not in _NOT_STATE]
    paths = created[0]
    p_paths = [p[1:] for p in paths if p[0] == "params"]
    s_paths = [p for p in paths if p[0] in state_cols]

    def variables_of(p_leaves, s_leaves):
        pairs = [(("params",) + p, v) for p, v in zip(p_paths, p_leaves, strict=True)]
        pairs += list(zip(s_paths, s_leaves, strict=True))
        return _nest(pairs)

    p_shapes = [_get(shapes["params"], p) for p in p_paths]
    s_shapes = [_get(shapes, p) for p in s_paths]
    mutable = state_cols if state_cols else False

    def train_out(variables, key):
        return call(variables, example_x, train=True, mask=None, key=key, mutable=mutable)[0]

    # Randomness in train mode: applying without rngs raises InvalidRngError.
    stochastic = False
    try:
        out = jax.eval_shape(lambda v: train_out(v, None), shapes)
    except flax.errors.InvalidRngError:
        stochastic = True
        try:
            out = jax.eval_shape(lambda v: train_out(v, jax.random.key(0)), shapes)
        except flax.errors.InvalidRngError as e:
            raise ValueError(
                f"rng_streams: the module draws from an rng stream other than {rng_streams} "
                f"in train mode ({str(e).splitlines()[0]})"
            ) from None
    if state_cols:
        new = out[1]
        for c in state_cols:
            if jax.tree.structure(new.get(c, {})) != jax.tree.structure(shapes[c]):
                raise ValueError(
                    f"from_flax: the collection {c!r} changes its structure in a call (sow?); "
                    "only collections of fixed shape (batch_stats) can be model state"
                )
    try:
        jax.eval_shape(
            lambda v: call(v, example_x, train=False, mask=None, key=None, mutable=False), shapes
        )
    except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as e:
        raise ValueError(
            "from_flax: in eval mode the module updates its state or draws random numbers "
            f"({type(e).__name__}); give train_arg= or deterministic_arg= (the call argument "
            "that switches BatchNorm to running averages and Dropout off)"
        ) from None

    key0 = _default_key()

    def read_order(p_leaves, s_leaves, x):
        k = key0 if stochastic else None
        out, _ = call(
            variables_of(p_leaves, s_leaves), x, train=True, mask=None, key=k, mutable=mutable
        )
        return out

    first = _first_reads(read_order, p_shapes, s_shapes, example_x)
    rank = [(f, i) for i, f in enumerate(first[: len(p_paths) + len(s_paths)])]
    layout = _Layout(
        [_Leaf(p[:-1], p[-1], p) for p in p_paths],
        [_Leaf(p[1:-1], p[-1], p) for p in s_paths],
        rank,
        "from_flax",
    )
    last = layout.weight_modules[-1]

    def init_fn(key):
        v = init_variables(key)
        return layout.layers([_get(v["params"], p) for p in p_paths])

    def init_state_fn(key):
        v = init_variables(key)
        return layout.state_layers([_get(v, p) for p in s_paths])

    def fwd(params, state, x, mask=None, *, train=True, key=None):
        p_leaves = layout.leaves(params)
        if not s_paths:
            s_leaves = []
        elif state is None:  # not tracked: the initial state, not updated
            s_leaves = layout.state_leaves(init_state_fn(key0))
        else:
            s_leaves = layout.state_leaves(state)
        variables = variables_of(p_leaves, s_leaves)
        k = (key0 if key is None else key) if train and stochastic else None
        mut = mutable if train else False
        out, h = call(variables, x, train=train, mask=mask, key=k, mutable=mut, capture_path=last)
        y, updates = out if mut else (out, None)
        if features_method is not None:
            fout, _ = call(
                variables, x, train=train, mask=mask, key=k, mutable=mut, method=features_method
            )
            h = fout[0] if mut else fout
        if state is None:
            new_state = None
        elif updates is None:
            new_state = state
        else:
            new_state = layout.state_layers([_get(updates, p) for p in s_paths])
        return Forward(y, _features(h), new_state)

    return _model(init_fn, fwd, init_state_fn if s_paths else None, stochastic)


# --------------------------------------------------------------------------- nnx


class _NNXCall:
    """What the hooked nnx modules read during one call (a new one per call)."""

    def __init__(self, mask, capture_id):
        self.mask, self.capture_id, self.h = mask, capture_id, None


_NNX_CALL: contextvars.ContextVar[_NNXCall | None] = contextvars.ContextVar(
    "dynamics_nnx_call", default=None
)
_HOOKED: dict[type, type] = {}
_HOOKED_LOCK = threading.Lock()


def _hooked_class(cls: type, batch_norm: type) -> type:
    """A subclass of cls whose __call__ passes the batch mask to batch norm and records the
    input of the captured module, reading the current call from a context variable (per thread:
    programs traced in parallel threads do not see each other's masks). Swapped onto the
    instances of one freshly merged module for the duration of one call only."""
    with _HOOKED_LOCK:
        if cls in _HOOKED:
            return _HOOKED[cls]

        def __call__(self, *args, **kwargs):
            c = _NNX_CALL.get()
            if c is not None and args:
                if c.mask is not None and isinstance(self, batch_norm):
                    kwargs = _with_mask(kwargs, c.mask, args[0])
                if id(self) == c.capture_id:
                    c.h = args[0]
            return cls.__call__(self, *args, **kwargs)

        sub = type(cls)(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        _HOOKED[cls] = sub
        return sub


def _attribute_rank(module, path: tuple) -> tuple:
    """The order of a variable by attribute assignment (used without an example input): the
    position of each path element among its parent's attributes, in the order they were set."""
    node, out = module, []
    for p in path:
        if isinstance(node, list | tuple):
            out.append(int(p))
            node = node[int(p)]
            continue
        d = node if isinstance(node, Mapping) else vars(node)
        names = [n for n in d if not str(n).startswith("_pytree__")]
        key = p if p in d else str(p)
        out.append(names.index(key) if key in names else len(names))
        node = d[key]
    return tuple(out)


def from_nnx(
    make_module: Callable[[Any], Any],
    example_x=None,
    *,
    train_arg: str | None = None,
    deterministic_arg: str | None = None,
) -> Model:
    """Turn a `flax.nnx` module into a `Model` through split/merge (layout, state, modes: the
    module docstring).

    make_module(rngs) builds the module from an `nnx.Rngs`. The module is split into
    nnx.Param (params: one dict per module with a "kernel", in the order the input meets
    them), RNG state (reseeded from the step's key at every call, never trained) and the rest
    (model state: BatchStat, per-layer dicts). forward(params, state, x, mask, train, key)
    merges them with the graph of the module after `.train()` (or `.eval()`), calls it (every
    nnx.BatchNorm with mask=mask in train mode) and splits the state back out.
    example_x: one batch of inputs (batch axis first) to trace the order in which the layers
    are met; without it the layers follow the order of attribute assignment in the module's
    __init__ (nnx.Sequential and nnx.List in index order).
    """
    from flax import nnx

    # The module is built abstractly (no arrays: only its graph, shapes and dtypes are needed);
    # the order of attribute assignment is read from the live module inside that trace.
    attr_rank: dict = {}

    def build_module():
        m = make_module(nnx.Rngs(0))
        for path, _ in nnx.to_flat_state(nnx.state(m)):
            attr_rank[tuple(path)] = _attribute_rank(m, tuple(path))
        return m

    module = nnx.eval_shape(build_module)
    module.train()
    gd_train, p_st, r_st, s_st = nnx.split(module, nnx.Param, nnx.RngState, ...)
    module.eval()
    gd_eval = nnx.split(module, nnx.Param, nnx.RngState, ...)[0]
    p_flat = list(nnx.to_flat_state(p_st))
    r_flat = list(nnx.to_flat_state(r_st))
    s_flat = list(nnx.to_flat_state(s_st))
    p_paths = [tuple(p) for p, _ in p_flat]
    s_paths = [tuple(p) for p, _ in s_flat]
    stochastic = any(isinstance(v, nnx.RngKey) for _, v in r_flat)
    r_shapes = [v.get_value() for _, v in r_flat]

    def build(flat, values):
        return nnx.from_flat_state(
            [(p, v.replace(x)) for (p, v), x in zip(flat, values, strict=True)]
        )

    def reseeded(key):
        """Stream j's key: fold_in(key, j) (count 0); without a key, the constant key(j)."""
        out = []
        for j, ((_, v), old) in enumerate(zip(r_flat, r_shapes, strict=True)):
            if isinstance(v, nnx.RngKey):
                k = jax.random.key(j) if key is None else jax.random.fold_in(key, j)
                out.append(k if old.shape == () else jax.random.split(k, old.shape))
            else:
                out.append(jnp.zeros(old.shape, old.dtype))
        return out

    key0 = _default_key()
    capture: list = [None]  # the last weight layer's path, set once the layout is known

    def call(p_leaves, s_leaves, x, *, train, mask, key):
        rng = reseeded(None if key is None else _as_typed_key(key))
        m = nnx.merge(
            gd_train if train else gd_eval,
            build(p_flat, p_leaves),
            build(r_flat, rng),
            build(s_flat, s_leaves),
        )
        swapped = []
        capture_id = None
        for path, node in nnx.iter_graph(m):
            if not isinstance(node, nnx.Module):
                continue
            hook_bn = mask is not None and isinstance(node, nnx.BatchNorm)
            hook_h = capture[0] is not None and tuple(path) == capture[0]
            if hook_bn or hook_h:
                cls = type(node)
                object.__setattr__(node, "__class__", _hooked_class(cls, nnx.BatchNorm))
                swapped.append((node, cls))
                if hook_h:
                    capture_id = id(node)
        c = _NNXCall(mask, capture_id)
        token = _NNX_CALL.set(c)
        try:
            y = m(x, **_mode_kwargs(train, train_arg, deterministic_arg))
        finally:
            _NNX_CALL.reset(token)
            for node, cls in swapped:
                object.__setattr__(node, "__class__", cls)
        flat = dict(nnx.to_flat_state(nnx.state(m)))
        new_s = [flat[p].get_value() for p in s_paths]
        return y, c.h, new_s

    if example_x is not None:
        first = _first_reads(
            lambda pl, sl, x: call(
                pl, sl, x, train=True, mask=None, key=key0 if stochastic else None
            )[0],
            [v.get_value() for _, v in p_flat],
            [v.get_value() for _, v in s_flat],
            example_x,
        )
        rank = [(f, i) for i, f in enumerate(first[: len(p_paths) + len(s_paths)])]
    else:
        rank = [attr_rank[p] for p in p_paths + s_paths]
    layout = _Layout(
        [_Leaf(p[:-1], p[-1], p) for p in p_paths],
        [_Leaf(p[:-1], p[-1], p) for p in s_paths],
        rank,
        "from_nnx",
    )
    capture[0] = layout.weight_modules[-1]

    def split_new(key):
        _, p, _, s = nnx.split(
            make_module(nnx.Rngs(_as_typed_key(key))), nnx.Param, nnx.RngState, ...
        )
        pf = dict(nnx.to_flat_state(p))
        sf = dict(nnx.to_flat_state(s))
        if set(pf) != set(p_paths) or set(sf) != set(s_paths):
            raise ValueError(
                "make_module: builds modules of different structure for different keys"
            )
        return [pf[q].get_value() for q in p_paths], [sf[q].get_value() for q in s_paths]

    def init_fn(key):
        return layout.layers(split_new(key)[0])

    def init_state_fn(key):
        return layout.state_layers(split_new(key)[1])

    def fwd(params, state, x, mask=None, *, train=True, key=None):
        p_leaves = layout.leaves(params)
        if not s_paths:
            s_leaves = []
        elif state is None:  # not tracked: the initial state, not updated
            s_leaves = split_new(key0)[1]
        else:
            s_leaves = layout.state_leaves(state)
        k = (key0 if key is None else key) if train and stochastic else None
        y, h, new_s = call(p_leaves, s_leaves, x, train=train, mask=mask, key=k)
        if state is None:
            new_state = None
        elif not train or not s_paths:
            new_state = state
        else:
            new_state = layout.state_layers(new_s)
        return Forward(y, _features(h), new_state)

    return _model(init_fn, fwd, init_state_fn if s_paths else None, stochastic)
