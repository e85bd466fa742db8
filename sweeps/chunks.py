"""Chunks of runs: the inputs of a chunk's runs placed in the slots of a sharded call, and the
call's results put back in the chunk's region of the store.

A unit of work is a chunk's runs that start from the same point: all of them from the
beginning (a fresh chunk), or those that continue from the same kept length, or the runs a
grown axis added to a chunk that already holds others (`Unit.runs`)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from sweeps.plan import Chunk, Plan


@dataclasses.dataclass(frozen=True)
class Unit:
    chunk: Chunk
    start: int = 0  # the length the runs have already trained (0: from the beginning)
    runs: tuple[int, ...] | None = None  # C-order indices into the chunk's region; None: all

    @property
    def id(self) -> int:
        return self.chunk.id

    @property
    def group(self) -> int:
        return self.chunk.group

    @property
    def region(self) -> tuple[slice, ...]:
        return self.chunk.region

    @property
    def n_runs(self) -> int:
        return math.prod(_region_shape(self.region)) if self.runs is None else len(self.runs)

    def mask(self) -> np.ndarray | None:
        """Over the region: the unit's runs (None: all of them)."""
        if self.runs is None:
            return None
        m = np.zeros(_region_shape(self.region), bool)
        m.flat[list(self.runs)] = True
        return m


def units(chunk: Chunk, done: np.ndarray, length: int) -> list[Unit]:
    """The work left in a chunk: one unit per distinct trained length below `length` among its
    runs (done: the store's per-run lengths over the grid)."""
    d = np.asarray(done[chunk.region]).reshape(-1)
    out = []
    for start in sorted(set(d[d < length].tolist())):
        idx = np.flatnonzero(d == start)
        runs = None if idx.size == d.size else tuple(int(i) for i in idx)
        out.append(Unit(chunk, int(start), runs))
    return out


def runs_per_device(chunk_runs: int, n_dev: int) -> int:
    """Runs each device computes per call: the chunk padded to a multiple of the devices, and
    never a single one. XLA drops a vmapped axis of length one and computes the lone run with
    other matmul kernels, whose rounding differs; from two runs per device up, a run's numbers
    are bit-identical however the runs are chunked or sharded (tests/test_sweeps.py)."""
    return max(2, math.ceil(chunk_runs / n_dev))


def slot_order(n_pad: int, n_dev: int) -> np.ndarray:
    """Which run (in C order over a chunk's region) each of the n_pad slots of a sharded call
    holds: device d's slots hold runs d, d + n_dev, d + 2 n_dev, ..., so runs that cost more (a
    masked batch costs what its true size does) are spread over the devices instead of
    falling to one of them in a block."""
    per = n_pad // n_dev
    s = np.arange(n_pad)
    return (s % per) * n_dev + s // per


def chunk_inputs(p: Plan, chunk: Chunk, n_pad: int, n_dev: int, runs=None):
    """Hparams and seeds of a chunk's runs (or of the runs `runs` of its region), in C order
    over its region, padded to n_pad and placed in `slot_order`."""
    import jax.numpy as jnp

    from dynamics.steps import INT_FIELDS, Hparams

    grid_axes = p.res.grid_axes
    group = p.groups[chunk.group]
    depths, widths = group.stack_depths, group.widths
    masked = depths is not None or widths is not None
    k_mask = p.axes.index(p.mask_axis) if masked else None
    ranges = [range(s.start, s.stop) for s in chunk.region]  # static axes: one point each,
    rows = []  # but the masked axis, along which each run takes its point's stack depth
    for idx in itertools.product(*ranges):
        row = {a: p.coords[a][i] for a, i in zip(p.axes, idx, strict=True) if a in grid_axes}
        if depths is not None:
            row["stack_depth"] = depths[idx[k_mask]]
        elif widths is not None:
            row["width"] = widths[idx[k_mask]]
        rows.append(row)
    if runs is not None:
        rows = [rows[i] for i in runs]
    n = len(rows)
    rows = rows + [rows[-1]] * (n_pad - n)
    rows = [rows[i] for i in slot_order(n_pad, n_dev)]
    fields = {}
    for f in Hparams._fields:
        default = getattr(Hparams(), f)
        if f == "batch_size" and f not in grid_axes:
            default = 0
        vals = [r.get(f, default) for r in rows]
        fields[f] = jnp.asarray(vals, jnp.int32 if f in INT_FIELDS else jnp.float32)
    seeds = jnp.asarray([r["seed"] for r in rows], jnp.uint32)
    return Hparams(**fields), seeds, n


def _region_shape(region: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


def to_slots(values: dict[str, np.ndarray], n_pad: int, n_dev: int) -> dict[str, np.ndarray]:
    """Per-run arrays (n, ...) padded to n_pad (the last run repeated) and put in `slot_order`,
    as `chunk_inputs` places the runs."""
    out = {}
    order = slot_order(n_pad, n_dev)
    for name, v in values.items():
        n = v.shape[0]
        v = np.concatenate([v, np.repeat(v[-1:], n_pad - n, axis=0)]) if n < n_pad else v
        out[name] = v[order]
    return out


def chunk_values(
    p: Plan, chunk: Chunk, trace: dict, n: int, n_dev: int, runs=None
) -> dict[str, np.ndarray]:
    """Device results of a chunk (in `slot_order`), reshaped to its region (with `runs`: the
    n runs as (n, ...)), their layers put in the store's slots (`Plan.layer_slots`) and padded
    to its sv_index and users' dimensions; the record axis keeps the trace's length (a
    continued run holds the records after its start). Final states, when kept, come back
    under "final_state" as {leaf: (region or n, ...)}."""
    shape = _region_shape(chunk.region) if runs is None else (n,)
    out = {}
    n_pad = int(np.shape(trace["status"])[0])
    slot_of_run = np.argsort(slot_order(n_pad, n_dev))[:n]
    slots = p.layer_slots(p.groups[chunk.group])
    for name in p.dims:
        v = np.asarray(trace[name])[slot_of_run]
        v = v.reshape(shape + v.shape[1:])
        dims = p.dims[name]
        if "layer" in dims and len(slots) != p.n_layers:
            k = len(shape) + dims.index("layer")
            full = list(v.shape)
            full[k] = p.n_layers
            placed = np.full(full, np.nan, v.dtype)
            index = [slice(None)] * v.ndim
            index[k] = slots
            placed[tuple(index)] = v
            v = placed
        want = [
            v.shape[len(shape) + j] if d == p.record_axis else p.sizes[d]
            for j, d in enumerate(dims)
        ]
        pads = [(0, 0)] * len(shape) + [
            (0, w - s) for w, s in zip(want, v.shape[len(shape) :], strict=True)
        ]
        if any(b for _, b in pads):
            v = np.pad(v, pads, constant_values=np.nan)
        out[name] = v
    if "final_state" in trace:
        out["final_state"] = {
            leaf: np.asarray(a)[slot_of_run].reshape(shape + np.shape(a)[1:])
            for leaf, a in trace["final_state"].items()
        }
    return out
