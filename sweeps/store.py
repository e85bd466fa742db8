"""The result store: one xarray Dataset in a Zarr group, written chunk by chunk.

Layout (what `xarray.open_zarr(path)` sees):
  coordinates: every grid axis (static axes, seed, lr, batch_size, weight_decay, ...), step,
               layer, sv_index (the dimension of the singular values `sv`);
  variables:   every recorded observable over (grid axes..., step[, layer[, sv_index]]), float32,
               NaN where not (yet) recorded; per run `status` (int8: -1 not run, 0 finished,
               1 diverged) and `diverged_step` (int32, -1 if none);
  attributes:  the spec and its source, package versions, git commit, device kind and count,
               compile_seconds, run_seconds, the chunk layout.
The Zarr chunks of every variable are exactly the runner's chunks of runs, so each runner
chunk writes its own objects: processes writing disjoint chunks never touch the same object.
Finished chunks are marked in the subgroup `progress` (invisible to xarray); a chunk is marked
only after all its variables are written, so a kill loses at most the chunk in flight.
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

FORMAT_VERSION = 1


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


def create(
    url: str,
    coords: dict[str, np.ndarray],
    variables: dict[str, tuple[tuple[str, ...], np.dtype, Any, dict]],
    chunks: dict[str, int],
    attrs: dict,
    n_chunks: int,
) -> None:
    """Create an empty store: coordinates written, variables filled with their fill values.

    variables: name -> (dims, dtype, fill_value, attributes); chunks: dim -> chunk length
    (dims not named are whole).
    """
    zarr = _zarr()
    root = zarr.open_group(url, mode="w")
    for name, values in coords.items():
        # Strings as Zarr's variable-length UTF-8 (fixed-width unicode has no v3 specification).
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = root.create_array(
            name, shape=values.shape, dtype=dtype, chunks=values.shape, dimension_names=[name]
        )
        arr[...] = values.astype(object) if dtype is str else values
    for name, (dims, dtype, fill, vattrs) in variables.items():
        shape = tuple(len(coords[d]) for d in dims)
        chunk_shape = tuple(min(chunks.get(d, n), n) for d, n in zip(dims, shape, strict=True))
        root.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunk_shape,
            fill_value=fill,
            dimension_names=list(dims),
            attributes=vattrs,
        )
    progress = root.create_group("progress")
    progress.create_array("done", shape=(n_chunks,), dtype="i1", chunks=(1,), fill_value=0)
    root.attrs.update({**attrs, "format_version": FORMAT_VERSION, "complete": False})
    consolidate(url)


def consolidate(url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _zarr().consolidate_metadata(url)


class Writer:
    """Writes runner chunks into an existing store and marks them done."""

    def __init__(self, url: str):
        zarr = _zarr()
        self.url = url
        self.root = zarr.open_group(url, mode="r+")
        self.done = self.root["progress"]["done"]
        self.arrays = {n: self.root[n] for n in self.root.array_keys()}

    def done_chunks(self) -> np.ndarray:
        return np.asarray(self.done[:]).astype(bool)

    def write_chunk(
        self, index: int, region: tuple[slice, ...], values: dict[str, np.ndarray]
    ) -> None:
        for name, v in values.items():
            arr = self.arrays[name]
            sel = region + (slice(None),) * (arr.ndim - len(region))
            arr[sel] = v
        self.done[index] = 1

    def set_attrs(self, **attrs) -> None:
        self.root.attrs.update(attrs)
        consolidate(self.url)


def json_attr(value) -> str:
    return json.dumps(value, sort_keys=True, default=repr)
