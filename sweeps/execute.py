"""Executing a plan: create, resume, grow or refuse the store (`sweeps.grow`), compile the
programs a process needs, run its units of work (one in flight while the last is written) and
finish the store's attributes. With several processes (`--distributed`) each takes chunk i for
i mod P = its index; process 0 creates or grows the store before the others start."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time

import numpy as np

from sweeps import grow as _grow
from sweeps import states as _states
from sweeps import store as _store
from sweeps.chunks import chunk_values, runs_per_device, to_slots, units
from sweeps.devices import Distributed
from sweeps.layout import create_store
from sweeps.plan import Plan, plan
from sweeps.programs import _code_stamp, prepare
from sweeps.progress import _progress_bar
from sweeps.spec import Resolved


@dataclasses.dataclass
class Summary:
    url: str
    runs: int
    runs_now: int
    runs_resumed: int
    diverged: int
    compile_seconds: float
    run_seconds: float
    programs: int
    devices: int
    device_kind: str
    processes: int
    dead: int = 0
    runs_continued: int = 0  # of runs_now: continued from their kept state
    changes: list = dataclasses.field(default_factory=list)  # how the store grew


def _open_or_create(res, specs, url, fresh, chunk_runs, dist) -> tuple[Plan, list]:
    """Process 0: the plan of a new store (created here), or of an existing one resumed or
    grown (`sweeps.grow`: refused with a StoreError naming what differs)."""
    if fresh:
        _store.remove(url)
    if _store.exists(url):
        attrs = _store.read_attrs(url)
        if "fingerprint" not in attrs:
            _store.remove(url)  # a creation that was cut off: nothing was written yet
        else:
            growth = _grow.check(url, attrs, res, specs)
            p = plan(growth.res, growth.specs, chunk_runs, json.loads(attrs["layout"]))
            if growth.changes:
                _grow.apply(url, p, growth)
            return p, growth.changes
    p = plan(res, specs, chunk_runs)
    create_store(url, p, dist)
    return p, []


def execute(
    res: Resolved,
    specs: list,
    url: str,
    *,
    fresh: bool = False,
    chunk_runs: int | None = None,
    dist: Distributed | None = None,
    progress: bool = True,
) -> Summary:
    """Run a resolved sweep into the store at `url`: create it, resume it, grow it by new axis
    values or a longer length (sweeps.grow), or refuse it (StoreError naming the difference)."""
    import jax
    from jax.sharding import Mesh

    dist = dist or Distributed()
    url = _store.normalize(url)
    lock = None
    if dist.index == 0:
        lock = _store.Lock(url)
        lock.acquire()
    try:
        if dist.index == 0:
            try:
                p, changes = _open_or_create(res, specs, url, fresh, chunk_runs, dist)
                dist.put("dynamics/store", "ok")
            except Exception as e:
                dist.put("dynamics/store", f"error: {e}")
                raise
        else:
            msg = dist.get("dynamics/store")
            if msg != "ok":
                raise _store.StoreError(msg.removeprefix("error: "))
            attrs = _store.read_attrs(url)
            growth = _grow.check(url, attrs, res, specs)  # the store as process 0 left it
            p, changes = plan(growth.res, growth.specs, layout=json.loads(attrs["layout"])), []

        writer = _store.Writer(url, p.record_axis)
        done = writer.done_lengths()
        mine = [c for c in p.chunks if c.id % dist.count == dist.index]
        todo = [u for c in mine for u in units(c, done, p.length)]
        mesh = Mesh(np.asarray(jax.local_devices()), ("runs",))
        n_dev = len(mesh.devices.flat)
        n_pad = runs_per_device(p.chunk_runs, n_dev) * n_dev
        ns = len(p.res.static_axes)
        runs_now = sum(u.n_runs for u in todo)
        continued = sum(u.n_runs for u in todo if u.start)
        # Compile every program this process needs first, so compile_seconds and run_seconds
        # are separate measurements (run time is never hidden under compilation).
        t_compile = time.perf_counter()
        inputs, n_programs = prepare(p, todo, mesh, _code_stamp() if todo else None)
        compile_s = time.perf_counter() - t_compile
        bar = _progress_bar(runs_now, progress and dist.index == 0, res.sweep.name)
        diverged = 0
        t_start = time.perf_counter()
        pending = None  # (unit, trace, n): one unit in flight while the previous one is written
        for item in inputs + [None]:
            launched = None
            if item is not None:
                u, prog, hp, seeds, n = item
                if u.start:
                    group = _states.point_group(p.groups[u.group].static_index)
                    init = writer.read_states(group, u.region[ns:], u.runs)
                    launched = (u, prog(hp, seeds, to_slots(init, n_pad, n_dev)), n)
                else:
                    launched = (u, prog(hp, seeds), n)
            if pending is not None:
                pu, ptrace, pn = pending
                values = chunk_values(p, pu.chunk, ptrace, pn, n_dev, pu.runs)
                kept = values.pop("final_state", None)
                writer.write(
                    pu.region,
                    values,
                    length=p.length,
                    mask=pu.mask(),
                    states=kept,
                    state_group=_states.point_group(p.groups[pu.group].static_index),
                    n_static=ns,
                )
                diverged += int(np.sum(values["status"] == 1))
                bar.update(pn)
                bar.set_postfix(diverged=diverged, refresh=False)
            pending = launched
        bar.close()
        run_s = time.perf_counter() - t_start
        stats = f"{compile_s} {run_s} {diverged} {runs_now} {continued}"
        if dist.count > 1:
            dist.put(f"dynamics/stats/{dist.index}", stats)
            dist.barrier("dynamics/done")
        total_compile, total_run = compile_s, run_s
        dead = 0
        if dist.index == 0:
            if dist.count > 1:
                rows = [dist.get(f"dynamics/stats/{i}").split() for i in range(dist.count)]
                total_compile = sum(float(s[0]) for s in rows)
                total_run = max(float(s[1]) for s in rows)
                runs_now = sum(int(s[3]) for s in rows)
                continued = sum(int(s[4]) for s in rows)
            attrs = _store.read_attrs(url)
            statuses = _all_status(url)
            diverged = int(np.sum(statuses == 1))
            dead = int(np.sum(statuses == 2))
            complete = bool(np.all(writer.done_lengths() >= p.length))
            writer.set_attrs(
                compile_seconds=float(attrs.get("compile_seconds", 0.0)) + total_compile,
                run_seconds=float(attrs.get("run_seconds", 0.0)) + total_run,
                complete=complete,
                diverged=diverged,
                dead=dead,
                finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
        runs = math.prod(p.shape)
        return Summary(
            url,
            runs,
            runs_now,
            runs - runs_now,
            diverged,
            total_compile,
            total_run,
            n_programs,
            len(jax.devices()),
            jax.local_devices()[0].device_kind,
            dist.count,
            dead,
            continued,
            changes,
        )
    finally:
        if lock is not None:
            lock.release()


def _all_status(url: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(url, mode="r", use_consolidated=False)["status"][...])
