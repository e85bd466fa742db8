"""The result store: one xarray Dataset in a Zarr group, written chunk by chunk.

Layout (what `xarray.open_zarr(path)` sees):
  coordinates: every grid axis (static axes, of any length, then seed, lr, batch_size,
               weight_decay, ...), the record axis (`step`, or `epoch` for lengths in epochs),
               layer with `layer_name` over it ("input", "hidden1", ..., "output"; see
               sweeps.plan), sv_index (the dimension of the singular values `sv`), and the
               dimensions users' observables name;
  variables:   every recorded observable over (grid axes..., step[, layer[, sv_index]]), float32
               (float64 for precision float64), NaN where not (yet) recorded; per run `status`
               (int8: -1 not run, 0 finished, 1 diverged, 2 dead, 3 invalid) and
               `diverged_step` (int32, -1 if none);
  attributes:  the spec and its source, package versions, git commit, device kind and count,
               compile_seconds, run_seconds, the chunk layout, the history of its growth.
Axis values are in the order they were first given: a store grown by new values has them
appended (`ds.sortby("lr")` sorts), never re-sorted, so existing runs never move.
The Zarr chunks of every variable are exactly the runner's chunks of runs, so each runner
chunk writes its own objects: processes writing disjoint chunks never touch the same object.
Progress is the array `progress/done` (invisible to xarray): per run, the length (steps or
epochs) its stored records reach, 0 if not run; a run is marked only after all its variables
are written, so a kill loses at most the chunk in flight. Final states (when kept) live in
the group `final_state` (see sweeps.states).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # 2: per-run progress (lengths), final states, layer_name


class StoreError(RuntimeError):
    """A store that cannot be used: a different spec, a second writer, an unwritable path."""


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def normalize(url: str) -> str:
    """file:// URLs become plain paths (Zarr's local store creates directories as it goes)."""
    return str(local_path(url)) if url.startswith("file://") else url


def local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def check_writable(url: str) -> None:
    """Fail (StoreError) if the store could not be created or written; creates nothing."""
    if not is_local(url):
        return
    path = local_path(url).absolute()
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out: {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"--out: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"--out: {probe} is not writable")


def _zarr():
    import zarr

    return zarr


def exists(url: str) -> bool:
    zarr = _zarr()
    try:
        zarr.open_group(url, mode="r")
    except Exception:
        return False
    return True


def read_attrs(url: str) -> dict:
    return dict(_zarr().open_group(url, mode="r").attrs)


class Lock:
    """One writer per store. Local stores: an flock on `<store>.lock`, released by the kernel if
    the process dies (a killed run never leaves a stale lock). Other URLs: a `writer` marker
    object inside the store, removed on release (a killed run leaves it: `--fresh` or deleting
    it clears it)."""

    def __init__(self, url: str):
        self.url = url
        self.fd: int | None = None
        self.marker = False

    def acquire(self) -> None:
        if is_local(self.url):
            import fcntl

            path = Path(str(local_path(self.url).absolute()) + ".lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = Path(path).read_text().strip() or "another process"
                os.close(fd)
                raise StoreError(f"--out: {self.url} is being written by {holder}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            self.fd = fd
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.url)
            marker = root.rstrip("/") + "/writer"
            if fs.exists(marker):
                raise StoreError(f"--out: {self.url} is being written by {fs.cat(marker).decode()}")
            fs.pipe(marker, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            self.marker = True

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            path = Path(str(local_path(self.url).absolute()) + ".lock")
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self.marker:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(root.rstrip("/") + "/writer")
            self.marker = False


def remove(url: str) -> None:
    if is_local(url):
        import shutil

        path = local_path(url)
        if path.exists():
            shutil.rmtree(path)
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def write_coord(group, name: str, values: np.ndarray, dim: str | None = None) -> None:
    """Create or replace (resize and rewrite) a 1-D coordinate array over `dim` (default:
    its own name)."""
    # Strings as Zarr's variable-length UTF-8 (fixed-width unicode has no v3 specification).
    dtype = str if values.dtype.kind in "UO" else values.dtype
    data = values.astype(object) if dtype is str else values
    if name in group.array_keys():
        arr = group[name]
        if arr.shape != values.shape:
            arr.resize(values.shape)
    else:
        arr = group.create_array(
            name,
            shape=values.shape,
            dtype=dtype,
            chunks=values.shape or (1,),
            dimension_names=[dim or name],
        )
    arr[...] = data


def create_arrays(
    group,
    variables: dict[str, tuple[tuple[str, ...], np.dtype, Any, dict]],
    sizes: dict[str, int],
    chunks: dict[str, int],
) -> None:
    """Create variables (name -> (dims, dtype, fill_value, attributes)) in a group, chunked by
    `chunks` (dim -> length; dims not named are whole)."""
    for name, (dims, dtype, fill, vattrs) in variables.items():
        shape = tuple(sizes[d] for d in dims)
        chunk_shape = tuple(
            max(1, min(chunks.get(d, n), n)) for d, n in zip(dims, shape, strict=True)
        )
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunk_shape,
            fill_value=fill,
            dimension_names=list(dims),
            attributes=vattrs,
        )


def create(
    url: str,
    coords: dict[str, np.ndarray],
    variables: dict[str, tuple[tuple[str, ...], np.dtype, Any, dict]],
    chunks: dict[str, int],
    attrs: dict,
    run_dims: tuple[str, ...],
    extra_coords: dict[str, tuple[str, np.ndarray]] | None = None,
    groups: dict[str, tuple[dict, dict, dict]] | None = None,
) -> None:
    """Create an empty store: coordinates written, variables filled with their fill values.

        variables: name -> (dims, dtype, fill_value, attributes); chunks: dim -> chunk length
        (dims not named are whole); run_dims: the grid axes (the per-run progress array's dims);
        extra_coords: name -> (dim, values), coordinates over a dimension they do not name
        (`layer_name` over `layer`), listed in the "coordinates" attribute of the variables over
        that dimension as xarray reads it; groups: subgroup path -> (variables, attributes, sizes of
    the dimensions its variables add).
    """
    zarr = _zarr()
    root = zarr.open_group(url, mode="w")
    extra_coords = extra_coords or {}
    for name, values in coords.items():
        write_coord(root, name, values)
    for name, (dim, values) in extra_coords.items():
        write_coord(root, name, values, dim)

    sizes = {d: len(v) for d, v in coords.items()}
    create_arrays(root, variables, sizes, chunks)
    progress = root.create_group("progress")
    create_arrays(progress, {"done": (tuple(run_dims), np.int32, 0, {})}, sizes, chunks)
    for path, (gvars, gattrs, gsizes) in (groups or {}).items():
        g = root.require_group(path)
        g.attrs.update(gattrs)
        create_arrays(g, gvars, {**sizes, **gsizes}, chunks)
    if extra_coords:
        attrs = {**attrs, "coordinates": " ".join(extra_coords)}
    root.attrs.update({**attrs, "format_version": FORMAT_VERSION, "complete": False})
    consolidate(url)


def consolidate(url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _zarr().consolidate_metadata(url)


def open_rw(url: str):
    """The root group for writing, its metadata read from the arrays themselves (consolidated
    metadata would give the shapes from before a resize)."""
    return _zarr().open_group(url, mode="r+", use_consolidated=False)


class Writer:
    """Writes units of runs (a runner chunk's region, or some of its runs) into an existing
    store, with their final states, and marks them done."""

    def __init__(self, url: str, record_axis: str = "step"):
        self.url = url
        self.root = open_rw(url)
        self.record_axis = record_axis
        self.done = self.root["progress"]["done"]
        self.arrays = {n: self.root[n] for n in self.root.array_keys()}
        self.states: dict[str, dict] = {}
        if "final_state" in self.root.group_keys():
            g = self.root["final_state"]
            for name in g.group_keys():
                self.states[name] = {n: g[name][n] for n in g[name].array_keys()}

    def done_lengths(self) -> np.ndarray:
        """Per run: the length its stored records reach (0: not run)."""
        return np.asarray(self.done[...])

    @staticmethod
    def _put(arr, sel, v, mask):
        """Write v into arr[sel]; with mask (over the region's leading dims), only the runs it
        marks (v holds those runs, in C order), the others read back and kept."""
        if mask is None:
            arr[sel] = v.reshape(_sel_shape(sel, arr.shape))
            return
        cur = np.asarray(arr[sel])
        cur[mask] = v
        arr[sel] = cur

    def write(
        self,
        region: tuple[slice, ...],
        values: dict[str, np.ndarray],
        *,
        length: int,
        mask: np.ndarray | None = None,
        states: dict[str, np.ndarray] | None = None,
        state_group: str | None = None,
        n_static: int = 0,
    ) -> None:
        """Write a unit: values (name -> array over the unit's runs, region-shaped without a
        mask, (n, ...) with one) whose record axis holds the last records of the store's (a
        continued run writes those after its start); its final states into `state_group`;
        then the runs' progress (`length`)."""
        for name, v in values.items():
            arr = self.arrays[name]
            dims = list(arr.metadata.dimension_names or ())
            sel = list(region) + [slice(None)] * (arr.ndim - len(region))
            if self.record_axis in dims:
                k = dims.index(self.record_axis)
                n_rec = v.shape[k if mask is None else k - len(region) + 1]
                sel[k] = slice(arr.shape[k] - n_rec, arr.shape[k])
            self._put(arr, tuple(sel), v, mask)
        if states:
            traced = region[n_static:]
            tmask = None if mask is None else mask.reshape(mask.shape[n_static:])
            for name, v in states.items():
                arr = self.states[state_group][name]
                sel = tuple(traced) + (slice(None),) * (arr.ndim - len(traced))
                self._put(arr, sel, v, tmask)
        done = np.full(_sel_shape(region, self.done.shape), length, np.int32)
        if mask is not None:
            cur = np.asarray(self.done[region])
            cur[mask] = length
            done = cur
        self.done[region] = done

    def read_states(
        self, state_group: str, traced: tuple[slice, ...], runs: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """The kept final states of a region's runs (traced axes only), as (n, ...) arrays."""
        out = {}
        for name, arr in self.states[state_group].items():
            sel = tuple(traced) + (slice(None),) * (arr.ndim - len(traced))
            v = np.asarray(arr[sel])
            v = v.reshape((-1,) + v.shape[len(traced) :])
            out[name] = v if runs is None else v[list(runs)]
        return out

    def set_attrs(self, **attrs) -> None:
        self.root.attrs.update(attrs)
        consolidate(self.url)


def _sel_shape(sel: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s, n in zip(tuple(sel) + (slice(None),) * (len(shape) - len(sel)), shape, strict=True):
        start, stop, _ = s.indices(n)
        out.append(stop - start)
    return tuple(out)


def json_attr(value) -> str:
    return json.dumps(value, sort_keys=True, default=repr)
