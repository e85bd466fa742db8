"""Final run states in the store, and the loader that gives them back.

A run's final `dynamics.train.RunState` (the stepper's state: parameters and optimizer state;
the model's state: batch-norm running statistics; the last gradient and its per-layer squared
norms; the divergence flag and step) is kept per run, so any quantity can be recomputed from
the trained network and a longer run can continue from it (`make_run(spec, start=S)`).

Layout: the Zarr group `final_state/` (invisible to `xarray.open_zarr(store)`, which reads the
root group only) holds one subgroup per static point, named `p` + its index along each static
axis joined by "-" (`p` alone without static axes; `p0-1`: first value of the first static axis,
second of the second), since points of different depths or widths have states of different
shapes. A subgroup holds one array per leaf of the state, named by its path ("state.params.0.w"
is the weight of layer 0; "state.opt_state...." the optimizer's; "model_state...."), over the
traced grid axes then the leaf's own axes (`NAME_0`, `NAME_1`, ...), chunked like the runs; its
attribute "structure" describes the pytree (named tuples by class, dicts, lists, tuples), so
the loader rebuilds the state without the config. Each subgroup also opens as a Dataset:
`xarray.open_zarr(store, group="final_state/p")`.

Whether a sweep keeps them: `Sweep(keep_params=...)` or `--set keep_params=true|false|auto`;
auto (the default) keeps them when the store's states total at most KEEP_STATE_AUTO_BYTES. The
choice is made when the store is created and holds for its life: a grown store keeps states
if and only if it did (asking keep_params=true of a store without them is refused).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
from typing import Any

import numpy as np

# Auto keeps the final states of a store up to this size in total: the default sweep's 108 runs
# of a 64-wide MLP keep about 15 MB; a sweep of large networks would multiply its store by the
# parameters of every run, so it asks for it (keep_params=true).
KEEP_STATE_AUTO_BYTES = 64 << 20
GROUP = "final_state"
STORABLE_KINDS = "biuf"  # bool, int, uint, float: what a Zarr array stores exactly


class StateError(ValueError):
    """A selection of runs whose states cannot be loaded (one line naming the field)."""


@dataclasses.dataclass(frozen=True)
class Template:
    """The leaves of a spec's final RunState: names in flattening order, shapes, dtypes, the
    treedef to rebuild it, and the JSON structure the store keeps."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    treedef: Any
    structure: dict

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True))

    def unflatten(self, leaves: dict):
        return self.treedef.unflatten([leaves[n] for n in self.names])


def _key_str(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_name(path) -> str:
    return ".".join(_key_str(k) for k in path) or "value"


def flatten(tree) -> dict:
    """{leaf name: leaf} of a pytree, in flattening order."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_name(p): v for p, v in flat}


def template(spec) -> Template:
    """The final-state template of a spec (traced abstractly, nothing is computed)."""
    import jax

    from dynamics.steps import Hparams
    from dynamics.train import as_hparams, make_run

    spec = dataclasses.replace(spec, keep_state=True)
    out = jax.eval_shape(make_run(spec), as_hparams(Hparams()), jax.random.key(0))
    fs = out["final_state"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(fs)
    names = tuple(leaf_name(p) for p, _ in flat)
    if len(set(names)) != len(names):
        raise ValueError("keep_params: the run state has two leaves of the same name")
    return Template(
        names,
        tuple(tuple(v.shape) for _, v in flat),
        tuple(np.dtype(v.dtype) for _, v in flat),
        treedef,
        _describe(fs, ()),
    )


def storable(t: Template) -> bool:
    return all(d.kind in STORABLE_KINDS for d in t.dtypes)


def point_group(static_index: tuple[int, ...]) -> str:
    return "p" + "-".join(str(i) for i in static_index)


def _describe(node, path: tuple[str, ...]) -> dict:
    if node is None:
        return {"none": True}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {
            "namedtuple": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f: _describe(getattr(node, f), path + (f,)) for f in node._fields},
        }
    if isinstance(node, dict):
        return {"dict": {str(k): _describe(v, path + (str(k),)) for k, v in node.items()}}
    if isinstance(node, list | tuple):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [_describe(v, path + (str(i),)) for i, v in enumerate(node)]}
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return {"leaf": ".".join(path) or "value"}
    import jax

    flat = jax.tree_util.tree_flatten_with_path(node)[0]
    prefix = ".".join(path)
    return {
        "opaque": type(node).__name__,
        "leaves": [".".join(x for x in (prefix, leaf_name(p)) if x) for p, _ in flat],
    }


def _named_tuple(spec: str, fields: list[str]):
    module, _, qual = spec.partition(":")
    try:
        cls = importlib.import_module(module)
        for part in qual.split("."):
            cls = getattr(cls, part)
        if tuple(getattr(cls, "_fields", ())) == tuple(fields):
            return cls
    except (ImportError, AttributeError):
        pass
    return collections.namedtuple(qual.rsplit(".", 1)[-1] or "State", fields)


def rebuild(desc: dict, get) -> Any:
    """The pytree a structure describes, its leaves read by name with `get`."""
    if "leaf" in desc:
        return get(desc["leaf"])
    if "none" in desc:
        return None
    if "list" in desc:
        return [rebuild(d, get) for d in desc["list"]]
    if "tuple" in desc:
        return tuple(rebuild(d, get) for d in desc["tuple"])
    if "dict" in desc:
        return {k: rebuild(d, get) for k, d in desc["dict"].items()}
    if "namedtuple" in desc:
        fields = list(desc["fields"])
        cls = _named_tuple(desc["namedtuple"], fields)
        return cls(*[rebuild(desc["fields"][f], get) for f in fields])
    return {n: get(n) for n in desc["leaves"]}


# --------------------------------------------------------------------------- the loader


def _open(store: str):
    import xarray as xr
    import zarr

    from sweeps import store as _store

    url = _store.normalize(str(store))
    if not _store.exists(url):
        raise StateError(f"store: no store at {store}")
    root = zarr.open_group(url, mode="r")
    if GROUP not in root.group_keys():
        raise StateError(
            f"store: {store} keeps no final states (it was run with keep_params=false, or by "
            "a runner before they were kept); run it with --set keep_params=true --fresh"
        )
    ds = xr.open_zarr(url)
    return root, ds


def _indices(ds, axis: str, value) -> tuple[list[int], bool]:
    """Indices of `value` (one value or a list) along a grid axis, and whether it was one."""
    coord = ds[axis].values
    scalar = not isinstance(value, list | tuple | np.ndarray)
    out = []
    for v in [value] if scalar else list(value):
        if coord.dtype.kind in "iuf" and not isinstance(v, str | bool):
            hit = np.flatnonzero(np.isclose(coord.astype(float), float(v), rtol=1e-12, atol=0))
        else:
            hit = np.flatnonzero(coord.astype(str) == str(v))
        if hit.size == 0:
            shown = ", ".join(str(c) for c in coord[:10])
            raise StateError(f"{axis}: {v!r} is not a value of the store ({shown})")
        out.append(int(hit[0]))
    return out, scalar


def _selection(ds, selection: dict):
    axes = list(ds["status"].dims)
    for k in selection:
        if k not in axes:
            raise StateError(f"{k}: not an axis of the store (axes: {', '.join(axes)})")
    picks, kept = [], []
    for a in axes:
        if a in selection:
            idx, scalar = _indices(ds, a, selection[a])
        else:
            idx, scalar = list(range(ds.sizes[a])), False
        picks.append(idx)
        if not scalar:
            kept.append(a)
    return axes, picks, kept


def selected_runs(store: str, **selection) -> list[dict]:
    """The grid coordinates of the runs a selection names, in the order `load_params` returns
    them (C order over the store's axes: static axes, then seed, lr, batch_size, ...)."""
    import itertools

    import xarray as xr

    from sweeps import store as _store

    ds = xr.open_zarr(_store.normalize(str(store)))
    axes, picks, _ = _selection(ds, selection)
    return [
        {a: ds[a].values[i].item() for a, i in zip(axes, idx, strict=True)}
        for idx in itertools.product(*picks)
    ]


def load_state(store: str, *, stacked: bool = False, **selection) -> list | Any:
    """The final `RunState` of every run a selection names (kept by the runner, see the
    module docstring): `load_state("results/default.zarr", seed=0, lr=0.1)`.

    selection: axis=value or axis=[values] for any grid axis of the store (static axes, seed,
    lr, batch_size, weight_decay, ...), matched as `Dataset.sel` matches; axes not named: all
    values. Returns a list with one state per selected run, in C order over the store's axes
    (`selected_runs` gives their coordinates), leaves as numpy arrays; with stacked=True one
    state whose leaves carry the selection's axes first (axes given one value dropped), as
    `ds.sel(...)` would: the runs must then share their shapes (one depth, one width).
    Raises StateError (a ValueError) naming the field for an unknown axis or value, a store
    without states, or a run not run yet.
    """
    import itertools

    root, ds = _open(store)
    axes, picks, kept = _selection(ds, selection)
    n_static = len(axes) - len(_traced_axes(root))
    done = np.asarray(root["progress"]["done"][...])
    traced_picks = picks[n_static:]
    points: dict[str, tuple[dict, dict]] = {}  # subgroup -> (structure, {leaf: selected values})
    runs = []
    for idx in itertools.product(*picks):
        if done[idx] <= 0:
            where = ", ".join(
                f"{a}={ds[a].values[i].item()}" for a, i in zip(axes, idx, strict=True)
            )
            raise StateError(f"selection: the run {where} has not run yet")
        name = point_group(idx[:n_static])
        if name not in points:
            # read a point's leaves once, at the selected traced indices only
            sub = root[GROUP][name]
            sel = np.ix_(*traced_picks) if traced_picks else ()
            leaves = {k: np.asarray(sub[k][...])[sel] for k in sub.array_keys()}
            points[name] = (sub.attrs["structure"], leaves)
        structure, leaves = points[name]
        pos = tuple(p.index(i) for p, i in zip(traced_picks, idx[n_static:], strict=True))
        runs.append(rebuild(structure, lambda n, pos=pos, lv=leaves: lv[n][pos]))
    if not stacked:
        return runs
    return _stack(runs, [len(picks[axes.index(a)]) for a in kept])


def _traced_axes(root) -> list[str]:
    return list(root[GROUP].attrs["traced_axes"])


def _stack(runs: list, shape: list[int]):
    import jax

    first = jax.tree.structure(runs[0])
    for r in runs[1:]:
        if jax.tree.structure(r) != first or any(
            a.shape != b.shape
            for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(runs[0]), strict=True)
        ):
            raise StateError(
                "stacked: the selected runs' states differ in structure or shape (several "
                "depths or widths); select one static point or use stacked=False"
            )
    return jax.tree.map(lambda *xs: np.stack(xs).reshape(tuple(shape) + xs[0].shape), *runs)


def load_params(store: str, *, stacked: bool = False, **selection) -> list | Any:
    """The final parameters of every run a selection names, as `model.init` gives them (a list
    with one entry per layer), e.g. `load_params("results/default.zarr", seed=0, lr=0.1)`.

    Selection, order and stacking as `load_state`; this is `load_state(...)[k].state.params`.
    Evaluating them reproduces the stored records of the last step (tests/test_grow.py).
    """
    states = load_state(store, stacked=stacked, **selection)
    if stacked:
        return states.state.params
    return [s.state.params for s in states]
