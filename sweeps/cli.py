"""python -m sweeps {list, run, show, plot, report}: the command line of the sweep runner.

Bad input ends with exit status 2 and one line naming the field and the reason, before
anything is compiled or written. An exception raised by the config's own code (its build(), a
model or observable it defines) that is not bad input is a bug there: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sweeps", description="Grids of training runs as compiled programs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="list the sweeps in sweeps/configs (and in DIR)")
    ls.add_argument(
        "dir", nargs="?", default=None, help="also list the config files (*.py) of this directory"
    )
    r = sub.add_parser(
        "run", help="run a sweep into a Zarr store (resuming or growing it if it exists)"
    )
    r.add_argument("name", help="a sweep in sweeps/configs, or a path to a config .py file")
    r.add_argument(
        "--out",
        default="results",
        help="a store path ending in .zarr (any fsspec URL) or a directory for NAME.zarr",
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V[,V...]",
        help="override a setting or grid axis (also batch_strategy, depth_strategy and "
        "width_strategy=auto|mask|program, keep_params=true|false|auto)",
    )
    r.add_argument("--fresh", action="store_true", help="discard an existing store and start over")
    r.add_argument(
        "--chunk", type=int, default=None, help="runs per chunk (default: sized to device memory)"
    )
    r.add_argument(
        "--devices", type=int, default=None, help="CPU devices to simulate (default: one per core)"
    )
    r.add_argument("--distributed", action="store_true", help="use JAX's multi-process runtime")
    r.add_argument("--coordinator", default=None, help="host:port of process 0 (--distributed)")
    r.add_argument("--num-processes", type=int, default=None)
    r.add_argument("--process-id", type=int, default=None)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and say what would run (runs, programs, chunks, store); compile "
        "and write nothing",
    )
    s = sub.add_parser("show", help="summarize a store: axes, variables, status, diverged runs")
    s.add_argument("path")
    pl = sub.add_parser(
        "plot",
        help="draw one stored variable (PNG or PDF)",
        description="Draw one variable of a store: seeds as a band (mean line, min-max), other "
        "axes on --hue/--col/--row or fixed with --sel; diverged runs are left out.",
    )
    pl.add_argument("store", help="a sweep store (.zarr path or fsspec URL)")
    pl.add_argument("var", help="a variable of the store (loss, rank, sv, ...)")
    pl.add_argument("--x", metavar="AXIS", help="horizontal axis (default: step, or epoch)")
    pl.add_argument("--hue", metavar="AXIS", help="one line per value of AXIS")
    pl.add_argument("--col", metavar="AXIS", help="one column of panels per value of AXIS")
    pl.add_argument("--row", metavar="AXIS", help="one row of panels per value of AXIS")
    pl.add_argument(
        "--at",
        metavar="STEP|last",
        help="read every run at one record (nearest recorded step; last: each run's last finite "
        "record) and plot against --x",
    )
    pl.add_argument(
        "--layer",
        metavar="K|all|mean",
        help="per-layer variables: one layer, one line per layer, or the mean (default)",
    )
    pl.add_argument(
        "--sel",
        action="append",
        default=[],
        metavar="AXIS=VALUE",
        help="fix an axis at a value (V1,V2,... keeps several)",
    )
    pl.add_argument("--log", action="store_true", help="log y axis; seeds by geometric mean")
    pl.add_argument("--out", metavar="FILE", help=".png or .pdf (default: STORE_VAR.png here)")
    rp = sub.add_parser(
        "report", help="a self-contained HTML page: the summary and one plot per variable"
    )
    rp.add_argument("store", help="a sweep store (.zarr path or fsspec URL)")
    rp.add_argument("--out", metavar="FILE.html", help="default: STORE_report.html here")
    return p


def store_url(out: str, name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0] if name.endswith(".py") else name
    if out.rstrip("/").endswith(".zarr"):
        return out.rstrip("/")
    return out.rstrip("/") + f"/{stem}.zarr"


def cmd_list(directory: str | None = None) -> int:
    """The built-in sweeps by name, then (with a directory) its config files by path, each
    with its description; a file that fails to load says why on its line."""
    from sweeps.spec import SpecError, config_files, config_names, load_sweep

    rows = [(n, load_sweep(n).description) for n in config_names()]
    if directory is not None:
        for path in config_files(directory):
            try:
                rows.append((str(path), load_sweep(str(path)).description))
            except SpecError as e:
                rows.append((str(path), f"(cannot load: {e})"))
            except Exception as e:  # a user's file: say what is wrong and list the others
                rows.append((str(path), f"(cannot load: {type(e).__name__}: {_first_line(e)})"))
    width = max((len(n) for n, _ in rows), default=0)
    for n, desc in rows:
        print(f"{n:<{width}}  {desc}")
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def cmd_run(args) -> int:
    from sweeps import runner
    from sweeps import store as _store
    from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

    if args.chunk is not None and args.chunk < 1:
        raise _BadInput(f"--chunk: must be at least 1, got {args.chunk}")
    if args.devices is not None and args.devices < 1:
        raise _BadInput(f"--devices: must be at least 1, got {args.devices}")
    sweep = load_sweep(args.name)
    res = resolve(sweep, parse_overrides(args.set))
    url = store_url(args.out, args.name)
    _store.check_writable(url)
    runner.configure_jax(args.devices)
    dist = None
    if args.distributed:
        dist = runner.Distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    specs = build_specs(res)
    if args.dry_run:
        return dry_run(res, specs, url, args.chunk)
    summary = runner.execute(
        res, specs, url, fresh=args.fresh, chunk_runs=args.chunk, dist=dist, progress=not args.quiet
    )
    if dist is None or dist.index == 0:
        print_summary(res, summary)
    return 0


def dry_run(res, specs, url, chunk) -> int:
    """What `run` would do, from the checked spec alone: no compilation, nothing written."""
    import math

    from sweeps import runner
    from sweeps import store as _store

    p = runner.plan(res, specs, chunk)
    n = math.prod(p.shape)
    groups = len(p.groups)
    exists = _store.exists(url)
    print(
        f"sweep {res.sweep.name}: {n} runs in {groups} program{'' if groups == 1 else 's'} "
        f"(batch sizes: {p.strategy}"
        + (f"; {p.mask_axis}: {p.mask_kind}s masked" if p.mask_axis is not None else "")
        + f"), {len(p.chunks)} chunks of up to {p.chunk_runs} runs"
    )
    axes = ", ".join(f"{a}[{len(p.coords[a])}]" for a in p.axes)
    print(f"axes: {axes}; {len(p.steps)} records of {', '.join(p.dims)}"[:400])
    print(
        f"store: {url} "
        + ("(exists: run would resume, grow it or refuse a different spec)" if exists else "(new)")
    )
    print("dry run: nothing compiled or written")
    return 0


def print_summary(res, s) -> None:
    rate = s.runs_now / s.run_seconds if s.run_seconds > 0 else float("nan")
    if getattr(s, "changes", None):
        print(f"store grown: {'; '.join(s.changes)}")
    resumed = f", {s.runs_resumed} already done" if s.runs_resumed else ""
    if getattr(s, "runs_continued", 0):
        resumed = f", {s.runs_continued} of them continued{resumed}"
    dead = f", {s.dead} dead (every output the same: dead ReLUs)" if s.dead else ""
    print(
        f"sweep {res.sweep.name}: {s.runs} runs ({s.runs_now} run now{resumed}), "
        f"{s.diverged} diverged{dead}"
    )
    print(
        f"compile {s.compile_seconds:.1f} s ({s.programs} program{'' if s.programs == 1 else 's'}), "
        f"run {s.run_seconds:.1f} s "
        f"({rate:.2f} runs/s) on {s.devices} x {s.device_kind}"
        + (f", {s.processes} processes" if s.processes > 1 else "")
    )
    print(f"results: {s.url}")
    print(f"open with: python -c \"import xarray as xr; print(xr.open_zarr('{s.url}'))\"")


def cmd_show(args) -> int:
    from sweeps import store as _store

    if not _store.exists(args.path):
        raise _BadInput(f"path: no store at {args.path}")
    import xarray as xr

    for line in show_lines(args.path, xr.open_zarr(args.path)):
        print(line)
    return 0


def show_lines(path: str, ds) -> list[str]:
    """The summary `show` prints (and `report` embeds): axes, variables, status, diverged runs."""
    import json

    import numpy as np

    lines = []
    attrs = ds.attrs
    status = ds["status"].values
    n = status.size
    done, div, todo = int(np.sum(status == 0)), int(np.sum(status == 1)), int(np.sum(status < 0))
    dead, bad = int(np.sum(status == 2)), int(np.sum(status == 3))
    lines.append(
        f"{path}: sweep {attrs.get('sweep')} ({attrs.get('scale', 'default')} scale), {n} runs"
    )
    lines.append(
        f"  status: {done} finished, {div} diverged, {todo} not run"
        + (f", {dead} dead (output independent of the input)" if dead else "")
        + (f", {bad} invalid hyperparameters" if bad else "")
        + ("" if attrs.get("complete") else "  [incomplete]")
    )
    axes = [d for d in ds["status"].dims]
    lines.append("  axes:   " + ", ".join(f"{a}[{ds.sizes[a]}]" for a in axes))
    for a in axes:
        vals = ds[a].values
        shown = ", ".join(str(v) for v in vals[:8]) + (", ..." if len(vals) > 8 else "")
        lines.append(f"    {a}: {shown}")
    rec = next((d for d in ("step", "epoch") if d in ds.dims), None)
    if rec is not None:
        label = f"{rec}s:".ljust(7)
        lines.append(f"  {label} {ds.sizes[rec]} records, {int(ds[rec][0])}..{int(ds[rec][-1])}")
    names = [v for v in ds.data_vars if v not in ("status", "diverged_step")]
    lines.append(
        "  variables: "
        + ", ".join(f"{v}({','.join(d for d in ds[v].dims if d not in axes)})" for v in names)
    )
    lines.append(
        f"  compile {float(attrs.get('compile_seconds', 0)):.1f} s, run {float(attrs.get('run_seconds', 0)):.1f} s"
        f" on {attrs.get('device_count')} x {attrs.get('device_kind')}; commit {attrs.get('git_commit')}"
    )
    if div:
        flat = ds["diverged_step"].where(ds["status"] == 1).stack(run=axes).dropna("run")
        lines.append(f"  diverged runs ({div}):")
        for i in range(min(div, 10)):
            r = flat.isel(run=i)
            where = ", ".join(f"{a}={r[a].item()}" for a in axes)
            lines.append(f"    {where}: step {int(r.item())}")
        if div > 10:
            lines.append(f"    ... and {div - 10} more")
    if json.loads(attrs.get("layout", "{}")).get("keep_state"):
        lines.append("  final states: kept per run (sweeps.load_params(path, **selection))")
    settings = json.loads(attrs.get("spec", "{}")).get("settings", {})
    if settings:
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return lines


class _BadInput(ValueError):
    pass


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from dynamics.data import DataError
    from sweeps.plot import PlotError
    from sweeps.spec import SpecError
    from sweeps.states import StateError
    from sweeps.store import StoreError

    try:
        if args.command == "list":
            return cmd_list(args.dir)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "plot":
            from sweeps import plot

            return plot.run_cli(args)
        if args.command == "report":
            from sweeps import report

            return report.run_cli(args)
        return cmd_show(args)
    except (SpecError, StoreError, DataError, PlotError, StateError, _BadInput) as e:
        sys.stderr.write(f"error: {str(e).strip().splitlines()[0]}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished chunks are kept; run the same command to resume\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
