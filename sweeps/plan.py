"""Planning a sweep: its groups (one compiled program each), the strategy that shares programs
between batch sizes, its chunks of runs (rectangular blocks of the grid, each written to its
own region of the store), its layers' names, and whether final states are kept.

Layers: a network of L weight layers has layers "input" (the first the input meets),
"hidden1" .. "hidden{L-2}" and "output". A store whose static points have different depths
holds the union in that order (the deepest point's names), and every point's layer k goes to
the slot of its name: its output layer to the last slot, its first L-1 layers to the first
slots; the slots a shallower point lacks are NaN. So `layer` index k is the same named layer
at every depth of a store, and `layer_name` (a coordinate over `layer`) says which.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import numpy as np

from sweeps import states as _states
from sweeps.memory import estimate_run_bytes, memory_budget
from sweeps.spec import Resolved, SpecError


@dataclasses.dataclass(frozen=True)
class Group:
    index: tuple[int, ...]  # index of the group along the group axes
    point: dict[str, Any]  # static settings of the group
    spec: Any  # RunSpec with the group's static batch (keep_state set when states are kept)
    n_layers: int = 0  # weight layers of the group's model
    n_static: int = 0  # leading entries of `index` that are static axes
    # with a masked depth axis (`Plan.mask_axis`, index -1 there): each of its points' stack
    # depth (`Hparams.stack_depth`), the group's program the deepest point's
    stack_depths: tuple[int, ...] | None = None
    # with a masked width axis (`Plan.mask_kind` "width"): each of its points' hidden width
    # (`Hparams.width`), the group's program the widest point's
    widths: tuple[int, ...] | None = None

    @property
    def static_index(self) -> tuple[int, ...]:
        return self.index[: self.n_static]


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: int
    group: int
    region: tuple[slice, ...]  # over the grid axes (static + traced)


@dataclasses.dataclass
class Plan:
    res: Resolved
    axes: list[str]  # static axes then traced axes
    coords: dict[str, list]
    strategy: str  # "bucket" or "mask"
    groups: list[Group]
    block: dict[str, int]  # chunk length along every axis
    chunks: list[Chunk]
    n_layers: int
    n_sv: int
    steps: np.ndarray  # the record coordinate: steps, or epochs when the length is in epochs
    dims: dict[str, tuple[str, ...]]  # variable -> dims beyond the grid axes
    docs: dict[str, str]
    record_axis: str = "step"
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # every non-grid dimension
    layer_names: list[str] = dataclasses.field(default_factory=list)
    keep_state: bool = False
    templates: dict[tuple, Any] = dataclasses.field(
        default_factory=dict
    )  # static index -> Template
    length: int = 0  # the runs' length: steps, or epochs when the record axis is "epoch"
    float_dtype: str = "float32"  # of the stored observables (float64 with precision float64)
    mask_axis: str | None = None  # a static axis whose points share programs (masked)
    mask_kind: str = "depth"  # what the masked axis changes: "depth" or "width"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[a]) for a in self.axes)

    @property
    def chunk_runs(self) -> int:
        return math.prod(self.block[a] for a in self.axes)

    def layer_slots(self, group: Group) -> np.ndarray:
        """The store's layer slot of each of the group's layers (see the module docstring)."""
        return layer_slots(group.n_layers, len(self.layer_names))


def layer_names(n: int) -> list[str]:
    """Names of the n weight layers of a network, from the input on."""
    if n == 1:
        return ["output"]
    return ["input"] + [f"hidden{k}" for k in range(1, n - 1)] + ["output"] if n else []


def layer_slots(n: int, n_store: int) -> np.ndarray:
    """Where a network of n layers puts them in a store of n_store slots: its first n - 1
    layers in the first slots, its output layer in the last."""
    return np.asarray(list(range(n - 1)) + [n_store - 1], np.int64) if n else np.zeros(0, int)


def choose_strategy(res: Resolved, specs) -> str:
    """How runs of different batch sizes share programs (`make bench` measures both):

    "bucket": one program per batch size, each computing only its own batch;
    "mask": one program at the largest size, each run's batch masked to its true size.

    Masking computes every run at the largest size, except where the compiled MLP gradient
    trains the model (`dynamics.native.dense_loss_fn`, on the CPU): it never reads past a batch's
    last example of nonzero weight, so a masked run costs about what its true batch size does
    (the reference grid: 4-9% more run time than bucketing) while the sweep compiles one program
    instead of one per batch size (cold compile 32.5 s -> 7.5-9.4 s there). So "auto" masks with
    one batch size, full-batch sampling or that kernel, and buckets otherwise."""
    epochs = specs[0][1].epochs is not None and specs[0][1].sampling != "full"
    if epochs and len(res.grid["batch_size"]) > 1:
        if res.batch_strategy == "mask":
            raise SpecError(
                "batch_strategy: 'mask' cannot train several batch sizes for the same number of "
                "epochs (each takes its own number of steps); use 'auto' or 'bucket'"
            )
        return "bucket"
    if res.batch_strategy != "auto":
        return res.batch_strategy
    if len(res.grid["batch_size"]) == 1 or specs[0][1].sampling == "full":
        return "mask"
    from dynamics.train import cpu_kernels, dense_gradient

    if cpu_kernels() and all(dense_gradient(spec) for _, spec in specs):
        return "mask"
    return "bucket"


# "auto" masks a static depth axis when at most this share of the stack's layer passes are
# skipped ones (the depths' mean / the deepest >= 1/2): P4's gradient sweep (depths 5, 10, 30:
# one half skipped), from nothing on 2 CPU cores (`make bench --only cold`, docs/bench.json),
# took 15.8 s masked (2 programs) against 16.7 s with a program per depth (6) at its 3000 steps,
# 6.8 s against 11.4 s at 300: compile time saved against run time lost, which grows with the
# length (set depth_strategy="program" for long runs of very different depths).
MASK_WASTE_AUTO = 0.5

# "auto" masks a static width axis when at most this share of the widest model's parameters
# are padding, averaged over the axis: a masked run costs what the widest one does, and the
# dense layers' time follows their parameters. P9's grid (orthogonal_init, 500 steps) from
# nothing on 2 CPU cores (`make bench --only width`, docs/bench.json): at widths 64, 96, 128
# (39% padding) masked 22.4 s compile + 84.7 s run against 41.7 + 52.8 s per width, at 8 ... 128
# (73%) 27.8 + 119.7 against 58.9 + 41.5: the run time grew with the padding (1.6x, 2.9x) while
# the compile time saved was 19-31 s, so masking pays below about a fifth of padding there (more
# for shorter runs; set width_strategy="mask" for them).
WIDTH_WASTE_AUTO = 0.2


def _same(a, b) -> bool:
    """Whether two settings of a run spec are the same value: arrays by content, partials by
    function and arguments, containers and dataclasses member by member, the rest by ==."""
    if a is b:
        return True
    if isinstance(a, np.ndarray | np.generic) or isinstance(b, np.ndarray | np.generic):
        return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b))
    if hasattr(a, "__jax_array__") or type(a).__name__ == "ArrayImpl":
        return np.shape(a) == np.shape(b) and bool(np.array_equal(np.asarray(a), np.asarray(b)))
    if isinstance(a, functools.partial):
        return (
            isinstance(b, functools.partial)
            and _same(a.func, b.func)
            and _same(a.args, b.args)
            and _same(a.keywords, b.keywords)
        )
    if isinstance(a, tuple) and type(a).__eq__ is not tuple.__eq__:
        return bool(a == b)  # its own equality (an Observable: what it records, not its code)
    if isinstance(a, tuple | list):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    try:
        return bool(a == b)
    except Exception:  # an object without a truth value for ==
        return False


def _lines(res: Resolved, specs, axis: str) -> list[tuple[tuple, list[int]]]:
    """The static points along `axis`: per combination of the other static axes, its index
    (-1 at `axis`) and the positions in `specs` (C order over the static axes) of its points."""
    names = res.static_axes
    static_index = list(itertools.product(*[range(len(v)) for v in res.static.values()]))
    k = names.index(axis)
    lines: dict[tuple, list[int]] = {}
    for pos, idx in enumerate(static_index):
        key = idx[:k] + (-1,) + idx[k + 1 :]
        lines.setdefault(key, []).append(pos)
    return list(lines.items())


def _mask_refusal(res: Resolved, specs, axis: str) -> tuple[str | None, float]:
    """(why the static `axis` cannot share programs by depth masking, or None; the share of
    skipped layer passes when it can)."""
    from dynamics.models import masked_stack
    from dynamics.train import masking_refusal

    if len(res.static[axis]) < 2:
        return f"{axis} has one value", 0.0
    skipped = total = 0
    for _, positions in _lines(res, specs, axis):
        line = [specs[i][1] for i in positions]
        deep = masked_stack([s.model for s in line])
        if deep is None:
            return f"the models along {axis} differ in more than one uniform stack's depth", 0.0
        for s in line:
            for f in dataclasses.fields(s):
                if f.name != "model" and not _same(getattr(s, f.name), getattr(line[0], f.name)):
                    return f"the points along {axis} differ in {f.name}", 0.0
        why = masking_refusal(dataclasses.replace(line[0], model=deep))
        if why is not None:
            return why, 0.0
        counts = [s.model.stack.count for s in line]
        skipped += sum(deep.stack.count - c for c in counts)
        total += deep.stack.count * len(counts)
    return None, skipped / max(total, 1)


def choose_mask_axis(res: Resolved, specs, keep: bool) -> str | None:
    """The static axis whose points share programs by depth masking (`Sweep.depth_strategy`):
    "program" none; "mask" the axis whose points differ only in their model's stack depth
    (`_mask_refusal`; a SpecError naming the reason if none can); "auto" that axis when masking
    skips at most MASK_WASTE_AUTO of its stack's layer passes."""
    strategy = res.depth_strategy
    if strategy == "program" or not res.static_axes:
        if strategy == "mask":
            raise SpecError("depth_strategy: 'mask' needs a static axis of model depths")
        return None
    found, reasons = [], []
    for axis in res.static_axes:
        why, waste = _mask_refusal(res, specs, axis)
        if why is None and keep:
            why = "final states are kept (their shapes follow the depth)"
        if why is None:
            found.append((waste, axis))
        else:
            reasons.append(f"{axis}: {why}")
    if strategy == "mask":
        if not found:
            raise SpecError(f"depth_strategy: 'mask' cannot share programs ({'; '.join(reasons)})")
        return min(found)[1]
    found = [(w, a) for w, a in found if w <= MASK_WASTE_AUTO]
    return min(found)[1] if found else None


def _width_refusal(res: Resolved, specs, axis: str) -> tuple[str | None, float]:
    """(why the static `axis` cannot share programs by width masking, or None; the share of
    the widest model's parameters that the runs along it leave at zero when it can)."""
    import jax

    from dynamics.models import masked_width
    from dynamics.train import width_refusal

    if len(res.static[axis]) < 2:
        return f"{axis} has one value", 0.0
    padded = total = 0
    for _, positions in _lines(res, specs, axis):
        line = [specs[i][1] for i in positions]
        wide = masked_width([s.model for s in line])
        if wide is None:
            return f"the models along {axis} differ in more than one hidden width", 0.0
        for s in line:
            for f in dataclasses.fields(s):
                if f.name != "model" and not _same(getattr(s, f.name), getattr(line[0], f.name)):
                    return f"the points along {axis} differ in {f.name}", 0.0
        widths = [s.model.width.value for s in line]
        if len(set(widths)) != len(widths):
            return f"two points along {axis} have the same width", 0.0
        why = width_refusal(dataclasses.replace(line[0], model=wide), widths)
        if why is not None:
            return why, 0.0

        def size(m):
            shapes = jax.eval_shape(m.init, jax.random.key(0))
            return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))

        full = size(wide)
        padded += sum(full - size(s.model) for s in line)
        total += full * len(line)
    return None, padded / max(total, 1)


def choose_width_axis(res: Resolved, specs, keep: bool) -> str | None:
    """The static axis whose points share programs by width masking (`Sweep.width_strategy`),
    as `choose_mask_axis` for depths: "auto" masks when at most WIDTH_WASTE_AUTO of the widest
    model's parameters are padding on average."""
    strategy = res.width_strategy
    if strategy == "program" or not res.static_axes:
        if strategy == "mask":
            raise SpecError("width_strategy: 'mask' needs a static axis of model widths")
        return None
    found, reasons = [], []
    for axis in res.static_axes:
        why, waste = _width_refusal(res, specs, axis)
        if why is None and keep:
            why = "final states are kept (their shapes follow the width)"
        if why is None:
            found.append((waste, axis))
        else:
            reasons.append(f"{axis}: {why}")
    if strategy == "mask":
        if not found:
            raise SpecError(f"width_strategy: 'mask' cannot share programs ({'; '.join(reasons)})")
        return min(found)[1]
    found = [(w, a) for w, a in found if w <= WIDTH_WASTE_AUTO]
    return min(found)[1] if found else None


def choose_masking(res: Resolved, specs, keep: bool) -> tuple[str | None, str]:
    """(the static axis whose points share programs, or None; "depth" or "width"): a program
    masks one axis, the one whose strategy is "mask", else (both "auto") the depth axis."""
    depth = choose_mask_axis(res, specs, keep)
    width = choose_width_axis(res, specs, keep)
    if depth is not None and width is not None:
        if res.depth_strategy == "mask" and res.width_strategy == "mask":
            raise SpecError(
                "width_strategy: 'mask' with depth_strategy 'mask': a program masks one axis "
                "(set one of them to 'program' or 'auto')"
            )
        if res.width_strategy == "mask":
            return width, "width"
        return depth, "depth"
    if width is not None:
        return width, "width"
    return depth, "depth"


def _block_shape(
    axes: list[str], shape: dict[str, int], fixed: set[str], target: int
) -> dict[str, int]:
    """Largest rectangular block of at most `target` runs: whole trailing axes, part of one."""
    block = {a: 1 for a in axes}
    prod = 1
    for a in reversed(axes):
        if a in fixed:
            continue
        n = shape[a]
        if prod * n <= target:
            block[a] = n
            prod *= n
        else:
            block[a] = max(1, target // prod)
            break
    return block


def plan(
    res: Resolved, specs: list, chunk_runs: int | None = None, layout: dict | None = None
) -> Plan:
    """The groups, chunks and store layout of a resolved sweep. layout: a store's stored layout
    ({"strategy", "block", "keep_state"}) to resume or grow it with the same chunks; chunk_runs:
    runs per chunk (default: sized to the device memory)."""
    from dynamics.train import describe, docs

    strategy = layout["strategy"] if layout else choose_strategy(res, specs)
    static_axes = res.static_axes
    grid_axes = res.grid_axes
    axes = static_axes + grid_axes
    coords = {**res.static, **res.grid}
    observables = specs[0][1].observables
    steps = specs[0][1].record_coords()
    record_axis = specs[0][1].record_axis
    for _, s in specs[1:]:
        same = s.record_axis == record_axis and np.array_equal(s.record_coords(), steps)
        if s.observables != observables or not same:
            raise SpecError("static: every static point must record the same observables and steps")

    groups: list[Group] = []
    bucket = strategy == "bucket"
    bs_values = res.grid["batch_size"]
    static_index = list(itertools.product(*[range(len(v)) for v in res.static.values()])) or [()]
    keep, templates = _keep_states(res, specs, static_index, layout)
    ns = len(static_axes)
    if layout:
        mask_axis, mask_kind = layout.get("mask_axis"), layout.get("mask_kind", "depth")
    else:
        mask_axis, mask_kind = choose_masking(res, specs, keep)
    masked_lines = {}  # position of a line's deepest (widest) point -> (index, its points' sizes)
    if mask_axis is not None:
        for idx, positions in _lines(res, specs, mask_axis):
            if mask_kind == "width":
                counts = tuple(specs[i][1].model.width.value for i in positions)
            else:
                counts = tuple(specs[i][1].model.stack.count for i in positions)
            deepest = positions[int(np.argmax(counts))]
            masked_lines[deepest] = (idx, counts)

    import jax

    from dynamics import observables as obs

    n_layers = n_sv = 0
    for pos, (idx, (point, spec)) in enumerate(zip(static_index, specs, strict=True)):
        shapes = jax.eval_shape(spec.model.init, jax.random.key(0))
        n, n_layers = len(shapes), max(n_layers, len(shapes))
        n_sv = max(n_sv, obs.max_singular_values(shapes))
        depths = widths = None
        if mask_axis is not None:
            if pos not in masked_lines:
                continue  # trained by the program of its line's deepest (widest) point
            idx, along = masked_lines[pos]
            depths, widths = (None, along) if mask_kind == "width" else (along, None)
        spec = dataclasses.replace(spec, keep_state=True) if keep else spec
        if bucket:
            for j, bs in enumerate(bs_values):
                spec_j = dataclasses.replace(spec, batch=int(bs))
                groups.append(Group(idx + (j,), point, spec_j, n, ns, depths, widths))
        elif spec.sampling == "full":
            groups.append(Group(idx, point, spec, n, ns, depths, widths))
        else:
            spec_b = dataclasses.replace(spec, batch=int(max(bs_values)))
            groups.append(Group(idx, point, spec_b, n, ns, depths, widths))
    dims = describe(groups[0].spec)
    sizes = {record_axis: len(steps), "layer": n_layers, "sv_index": n_sv}
    sizes.update(_user_dim_sizes(groups, dims, sizes))
    trace_floats = sum(math.prod(sizes[d] for d in dd) for dd in dims.values())
    if keep:
        trace_floats += max(t.nbytes for t in templates.values()) // 4

    shape = {a: len(coords[a]) for a in axes}
    fixed = (set(static_axes) - {mask_axis}) | ({"batch_size"} if bucket else set())
    if layout:
        block = dict(layout["block"])
    else:
        if chunk_runs is None:
            budget, cap = memory_budget()
            per_run = max(estimate_run_bytes(g.spec, trace_floats) for g in groups)
            chunk_runs = max(1, min(cap, budget // per_run))
        block = _block_shape(axes, shape, fixed, int(chunk_runs))

    chunks: list[Chunk] = []
    group_axes = static_axes + (["batch_size"] if bucket else [])
    for gi, g in enumerate(groups):
        gidx = dict(zip(group_axes, g.index, strict=True))
        ranges = []
        for a in axes:
            if a in gidx and gidx[a] >= 0:  # -1: the masked axis, the group's whole length
                ranges.append([slice(gidx[a], gidx[a] + 1)])
            else:
                n, b = shape[a], block[a]
                ranges.append([slice(i, min(i + b, n)) for i in range(0, n, b)])
        for region in itertools.product(*ranges):
            chunks.append(Chunk(len(chunks), gi, tuple(region)))
    all_docs = docs(groups[0].spec)
    first = specs[0][1]
    f64 = any(sp.precision == "float64" for _, sp in specs) and _records_float64(groups, dims)
    return Plan(
        res,
        axes,
        coords,
        strategy,
        groups,
        block,
        chunks,
        n_layers,
        n_sv,
        steps,
        dims,
        {n: all_docs.get(n, "") for n in dims},
        record_axis,
        sizes,
        layer_names(n_layers),
        keep,
        templates,
        int(first.epochs if first.epochs is not None else first.steps),
        "float64" if f64 else "float32",
        mask_axis,
        mask_kind,
    )


def _records_float64(groups, dims) -> bool:
    """Whether a run's trace holds float64 records (precision float64 and a library that records
    in double): the store then keeps them in float64."""
    import jax

    from dynamics.steps import Hparams
    from dynamics.train import as_hparams, make_run

    for g in groups:
        if g.spec.precision != "float64":
            continue
        shapes = jax.eval_shape(make_run(g.spec), as_hparams(Hparams()), jax.random.key(0))
        if any(np.dtype(shapes[n].dtype) == np.float64 for n in dims if n in shapes):
            return True
    return False


def _keep_states(res: Resolved, specs, static_index, layout) -> tuple[bool, dict]:
    """Whether the store keeps final states (a store's layout decides once it exists; else
    res.keep_params, and None keeps them if they total at most KEEP_STATE_AUTO_BYTES), and the
    state template of every static point when it does."""
    want = layout.get("keep_state", False) if layout else res.keep_params
    if want is False:
        return False, {}
    templates = {
        idx: _states.template(spec) for idx, (_, spec) in zip(static_index, specs, strict=True)
    }
    if not all(_states.storable(t) for t in templates.values()):
        if want:
            raise SpecError("keep_params: the run state holds leaves Zarr cannot store")
        return False, {}
    if want is None:
        per_point = math.prod(len(v) for v in res.grid.values())
        total = per_point * sum(t.nbytes for t in templates.values())
        if total > _states.KEEP_STATE_AUTO_BYTES:
            return False, {}
    return True, templates


def _user_dim_sizes(groups, dims, known: dict) -> dict[str, int]:
    """Lengths of the dimensions users' observables name beyond the known ones, read off the
    traced shapes of one run of every group (the largest across groups)."""
    extra = {d for dd in dims.values() for d in dd if d not in known}
    if not extra:
        return {}
    import jax

    from dynamics.steps import Hparams
    from dynamics.train import as_hparams, make_run

    out: dict[str, int] = {}
    for g in groups:
        shapes = jax.eval_shape(make_run(g.spec), as_hparams(Hparams()), jax.random.key(0))
        for name, dd in dims.items():
            for d, n in zip(dd, shapes[name].shape, strict=True):
                if d in extra:
                    out[d] = max(out.get(d, 0), int(n))
    return out
