"""The store of a plan: its coordinates, variables and attributes (provenance: the spec and its
source, package versions, git commit, devices), created empty before any run."""

from __future__ import annotations

import datetime
import functools
import os
import subprocess

import numpy as np

from sweeps import states as _states
from sweeps import store as _store
from sweeps.devices import Distributed
from sweeps.plan import Plan


def _coord_array(values: list) -> np.ndarray:
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.int64)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.float64)
    return np.asarray(["none" if v is None else str(v) for v in values])


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = {}
    for name in (
        "dynamics",
        "jax",
        "jaxlib",
        "optax",
        "diffrax",
        "numpy",
        "xarray",
        "zarr",
        "flax",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def package_versions() -> dict[str, str]:
    """Versions of the project and of the libraries a program depends on (read once)."""
    return dict(_versions())


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_attr(p: Plan) -> dict:
    """What a store records about its runs beyond the sweep's settings, to compare when it
    grows: the record schedule, the length, the observables and the layers."""
    spec = p.groups[0].spec
    return {
        "record_axis": p.record_axis,
        "length": p.length,
        "record_every": int(spec.record_every),
        "slow_every": int(spec.slow_every),
        "observables": list(p.dims),
        "layer_names": list(p.layer_names),
    }


def _fill(dtype: np.dtype):
    dtype = np.dtype(dtype)
    return np.nan if dtype.kind == "f" else (False if dtype.kind == "b" else 0)


def state_groups(p: Plan, indices=None) -> dict:
    """The `final_state` subgroups (sweeps.states) of the static points `indices` (default:
    every point the plan keeps states for): path -> (variables, attributes, sizes)."""
    out = {}
    if not p.keep_state:
        return out
    traced = tuple(p.res.grid_axes)
    out[_states.GROUP] = ({}, {"traced_axes": list(traced)}, {})
    static = list(p.res.static)
    for idx, t in p.templates.items():
        if indices is not None and idx not in indices:
            continue
        variables, sizes = {}, {}
        for name, shape, dtype in zip(t.names, t.shapes, t.dtypes, strict=True):
            dims = tuple(f"{name}_{k}" for k in range(len(shape)))
            sizes.update(zip(dims, shape, strict=True))
            variables[name] = (traced + dims, dtype, _fill(dtype), {})
        point = {a: p.res.static[a][i] for a, i in zip(static, idx, strict=True)}
        attrs = {"structure": t.structure, "point": point}
        out[f"{_states.GROUP}/{_states.point_group(idx)}"] = (variables, attrs, sizes)
    return out


def variables_of(p: Plan) -> dict:
    """The store's variables: name -> (dims, dtype, fill, attributes)."""
    variables = {}
    for name, d in p.dims.items():
        if name == "status":
            dtype, fill = np.int8, -1
        elif name in ("diverged_step", "step"):
            dtype, fill = np.int32, -1
        else:
            dtype, fill = np.dtype(p.float_dtype), np.nan
        variables[name] = (tuple(p.axes) + d, dtype, fill, {"description": p.docs.get(name, "")})
    return variables


def coords_of(p: Plan) -> tuple[dict, dict]:
    """(dimension coordinates, other coordinates) of a plan's store."""
    coords = {a: _coord_array(p.coords[a]) for a in p.axes}
    coords[p.record_axis] = np.asarray(p.steps, np.int64)
    for d, n in p.sizes.items():
        if d not in coords and d not in ("layer", "sv_index"):
            coords[d] = np.arange(n)
    coords["layer"] = np.arange(p.n_layers)
    if p.n_sv:
        coords["sv_index"] = np.arange(p.n_sv)
    return coords, {"layer_name": ("layer", np.asarray(p.layer_names, object))}


def create_store(url: str, p: Plan, dist: Distributed) -> None:
    import jax

    coords, extra = coords_of(p)
    dev = jax.local_devices()[0]
    attrs = {
        "sweep": p.res.sweep.name,
        "description": p.res.sweep.description,
        "scale": p.res.scale,
        "spec": _store.json_attr(p.res.describe()),
        "spec_source": p.res.sweep.source,
        "code": _store.json_attr(p.res.code()),
        "run": _store.json_attr(run_attr(p)),
        "fingerprint": p.res.fingerprint(),
        "layout": _store.json_attr(layout_attr(p)),
        "package_versions": _store.json_attr(package_versions()),
        "git_commit": git_commit(),
        "device_kind": dev.device_kind,
        "device_platform": dev.platform,
        "device_count": len(jax.devices()),
        "process_count": dist.count,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compile_seconds": 0.0,
        "run_seconds": 0.0,
        "history": [],
    }
    _store.create(
        url, coords, variables_of(p), p.block, attrs, tuple(p.axes), extra, state_groups(p)
    )


def layout_attr(p: Plan) -> dict:
    out = {"strategy": p.strategy, "block": p.block, "keep_state": p.keep_state}
    if p.mask_axis is not None:
        out["mask_axis"] = p.mask_axis
        if p.mask_kind != "depth":
            out["mask_kind"] = p.mask_kind
    return out
