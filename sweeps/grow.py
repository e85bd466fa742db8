"""Growing a store: what a request may add to an existing store, and the resizing that adds it.

Rules (DESIGN: Reliability), checked before anything is compiled or written:
- Same sweep: its name, its normalized code (`spec.code_parts`: docstrings, comments and
  formatting do not count), its batch strategy, and every setting but the length.
- New values of a grid axis (seed, lr, batch_size, weight_decay, ...) or of a static axis add
  runs: the store's axis becomes the union, the store's values first, then the new ones in the
  order given (never re-sorted: existing runs keep their place; `ds.sortby(axis)` sorts).
  Values the request leaves out stay in the store; every run of the store not yet done runs.
- A longer run (`steps` or `epochs`, the setting of that name passed to RunSpec unchanged)
  continues every run from its kept final state (`make_run(spec, start=S)`): only with final
  states kept (keep_params), a learning-rate schedule that does not depend on the run's length,
  and the same record_every and slow_every. The records before S are kept as stored.
- Anything else is a genuine change, refused with one line naming it: a setting (width 8 -> 16),
  the code (build), the observables, the record schedule, a shorter run, an axis added or
  removed, a new static point with more layers than the store's (its output slot would move).
Stores of an older format (format_version 1) are refused: re-run them with --fresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

from sweeps import store as _store
from sweeps.spec import Resolved, build_specs

LENGTH_KEYS = ("steps", "epochs")


@dataclasses.dataclass
class Growth:
    res: Resolved  # the union of the store and the request
    specs: list  # built specs of every static point of the union
    changes: list[str]  # what the request adds, one phrase each


def _norm(value):
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _py(value):
    """A value read back from JSON as the config would give it (sequences as tuples)."""
    if isinstance(value, list):
        return tuple(_py(v) for v in value)
    return value


def _union(old: list, new: list) -> tuple[list, list]:
    """(old values then the new ones not among them, the new ones), compared as JSON values;
    a value in both is taken from `new` (the config's own Python object)."""
    new_by = {json.dumps(_norm(v), sort_keys=True): v for v in new}
    out = [new_by.get(json.dumps(_norm(v), sort_keys=True), _py(v)) for v in old]
    seen = {json.dumps(_norm(v), sort_keys=True) for v in old}
    added = [v for v in new if json.dumps(_norm(v), sort_keys=True) not in seen]
    return out + added, added


def run_info(specs) -> dict:
    from dynamics.train import describe

    spec = specs[0][1]
    return {
        "record_axis": spec.record_axis,
        "length": int(spec.epochs if spec.epochs is not None else spec.steps),
        "record_every": int(spec.record_every),
        "slow_every": int(spec.slow_every),
        "observables": list(describe(spec)),
    }


class _Refuse:
    def __init__(self, url: str, name: str):
        self.url, self.name = url, name

    def __call__(self, what: str):
        return _store.StoreError(
            f"--out: {self.url} holds a different sweep spec ({what}); use --fresh to "
            "overwrite it or choose another --out"
        )


def check(url: str, attrs: dict, res: Resolved, specs: list) -> Growth:
    """The union of a store and a request, or a StoreError naming what differs."""
    refuse = _Refuse(url, res.sweep.name)
    if attrs.get("format_version") != _store.FORMAT_VERSION:
        raise _store.StoreError(
            f"--out: {url} was written by an older runner (store format "
            f"{attrs.get('format_version')}); use --fresh to run it again or choose another --out"
        )
    stored = json.loads(attrs["spec"])
    layout = json.loads(attrs["layout"])
    old_run = json.loads(attrs["run"])
    if stored["name"] != res.sweep.name:
        raise refuse(f"sweep {stored['name']!r}, not {res.sweep.name!r}")
    old_code, new_code = json.loads(attrs["code"]), res.code()
    changed = sorted(k for k in set(old_code) | set(new_code) if old_code.get(k) != new_code.get(k))
    if changed:
        raise refuse(f"the config's code differs in {', '.join(changed)}")
    if stored["batch_strategy"] != res.batch_strategy:
        raise refuse(f"batch_strategy {stored['batch_strategy']} -> {res.batch_strategy}")
    if stored.get("depth_strategy", "auto") != res.depth_strategy:
        raise refuse(
            f"depth_strategy {stored.get('depth_strategy', 'auto')} -> {res.depth_strategy}"
        )
    if stored.get("width_strategy", "auto") != res.width_strategy:
        raise refuse(
            f"width_strategy {stored.get('width_strategy', 'auto')} -> {res.width_strategy}"
        )
    if res.keep_params and not layout.get("keep_state", False):
        raise refuse("keep_params: the store was created without final states")

    old_static, new_static = stored["static"], _norm(res.static)
    for k in sorted(set(old_static) ^ set(new_static)):
        raise refuse(f"{k}: {'adds' if k in new_static else 'removes'} a static axis")
    old_set, new_set = stored["settings"], _norm(res.settings)
    diffs = [k for k in sorted(set(old_set) | set(new_set)) if old_set.get(k) != new_set.get(k)]
    for k in diffs:
        if k not in LENGTH_KEYS:
            raise refuse(f"{k} {old_set.get(k)} -> {new_set.get(k)}")

    new_run = run_info(specs)
    for k in ("record_axis", "record_every", "slow_every"):
        if old_run[k] != new_run[k]:
            raise refuse(f"{k} {old_run[k]} -> {new_run[k]}")
    if old_run["observables"] != new_run["observables"]:
        added = [n for n in new_run["observables"] if n not in old_run["observables"]]
        gone = [n for n in old_run["observables"] if n not in new_run["observables"]]
        what = ", ".join([f"+{n}" for n in added] + [f"-{n}" for n in gone]) or "their order"
        raise refuse(f"observables {what}")
    changes = []
    l0, l1 = old_run["length"], new_run["length"]
    unit = "epochs" if new_run["record_axis"] == "epoch" else "steps"
    if l1 < l0:
        raise refuse(f"{unit} {l0} -> {l1}: the store holds longer runs")
    if l1 == l0 and diffs:
        raise refuse(f"{diffs[0]} {old_set.get(diffs[0])} -> {new_set.get(diffs[0])}")
    if l1 > l0:
        if diffs != [unit] or int(new_set[unit]) != l1:
            raise refuse(
                f"{unit} {l0} -> {l1} through settings {', '.join(diffs) or 'none'} "
                f"(only a setting named {unit} passed to RunSpec unchanged continues runs)"
            )
        if not layout.get("keep_state", False):
            raise refuse(
                f"{unit} {l0} -> {l1}: continuing runs needs their final states, which this "
                "store does not keep (keep_params)"
            )
        from dynamics import schedules

        for _, spec in specs:
            if schedules.resolve(spec.lr_schedule).needs_length:
                raise refuse(
                    f"{unit} {l0} -> {l1}: the learning-rate schedule depends on the run's "
                    "length, so a longer run is not a continued one"
                )
        changes.append(f"{unit} {l0} -> {l1} (runs continue from their kept state)")

    old_grid = {k: v for k, v in stored["grid"].items() if v is not None}
    new_grid = {k: v for k, v in res.grid.items() if v is not None}
    for k in sorted(set(old_grid) ^ set(new_grid)):
        raise refuse(f"{k}: {'adds' if k in new_grid else 'removes'} a grid axis")
    grid, static = {}, {}
    for k in res.grid:
        grid[k], added = _union(old_grid[k], new_grid[k])
        if added:
            changes.append(f"{k} + {', '.join(map(str, added))}")
    for k in res.static:
        static[k], added = _union(old_static[k], res.static[k])
        if added:
            changes.append(f"{k} + {', '.join(map(str, added))}")
    merged = dataclasses.replace(res, grid=grid, static=static)
    if _norm(static) != new_static:
        specs = build_specs(merged)  # the store's static points the request left out
    return Growth(merged, specs, changes)


def apply(url: str, p, growth: Growth) -> None:
    """Resize the store to the plan of the union (grid axes, record axis, singular values,
    users' dimensions), write the new coordinates, add the final-state groups of new static
    points, and record the growth in the attributes. Idempotent: a growth cut off part-way is
    redone by the next run (the attributes change last)."""
    from sweeps import layout as _layout
    from sweeps import states as _states

    root = _store.open_rw(url)
    old_run = json.loads(root.attrs["run"])
    if p.layer_names != old_run["layer_names"]:
        raise _store.StoreError(
            f"--out: {url} holds networks of {len(old_run['layer_names'])} layers; a static "
            f"point of {len(p.layer_names)} would move their output layer: use --fresh or "
            "another --out"
        )
    coords, _ = _layout.coords_of(p)
    sizes = {d: len(v) for d, v in coords.items()}

    def grow(group):
        for name in group.array_keys():
            arr = group[name]
            dims = list(arr.metadata.dimension_names or ())
            if name in coords and dims == [name]:
                continue
            shape = tuple(sizes.get(d, n) for d, n in zip(dims, arr.shape, strict=True))
            if shape != arr.shape:
                if any(a < b for a, b in zip(shape, arr.shape, strict=True)):
                    raise _store.StoreError(f"--out: {url}: {name} cannot shrink")
                arr.resize(shape)

    grow(root)
    grow(root["progress"])
    if p.keep_state:
        g = root[_states.GROUP]
        for sub in g.group_keys():
            grow(g[sub])
        present = set(g.group_keys())
        new = {idx for idx in p.templates if _states.point_group(idx) not in present}
        groups = _layout.state_groups(p, new)
        groups.pop(_states.GROUP, None)
        for path, (gvars, gattrs, gsizes) in groups.items():
            sub = root.require_group(path)
            sub.attrs.update(gattrs)
            _store.create_arrays(sub, gvars, {**sizes, **gsizes}, p.block)
    for name, values in coords.items():
        _store.write_coord(root, name, values)
    history = list(root.attrs.get("history", []))
    history.append(
        {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "changes": growth.changes,
        }
    )
    root.attrs.update(
        {
            "spec": _store.json_attr(p.res.describe()),
            "spec_source": p.res.sweep.source,
            "run": _store.json_attr(_layout.run_attr(p)),
            "fingerprint": p.res.fingerprint(),
            "complete": False,
            "history": history,
        }
    )
    _store.consolidate(url)
