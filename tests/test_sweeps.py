"""The sweep runner end to end: stores equal single runs, across devices, processes, kills and
resumes, and with the compiled kernels off; divergence stays local; bad input exits 2 before
anything is compiled or written, a bug in a config's code keeps its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import xarray as xr

import dynamics as dyn
from dynamics import native
from dynamics.steps import Hparams
from dynamics.train import make_run
from sweeps import cli, programs, runner
from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.py")


def run_inprocess(out, *sets, chunk=None, **kw):
    res = resolve(load_sweep(TINY), parse_overrides(sets))
    return runner.execute(res, build_specs(res), str(out), chunk_runs=chunk, progress=False, **kw)


def run_cli(out, *args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "sweeps", "run", TINY, "--out", str(out), "--quiet", *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


# Across layouts (device counts, chunk sizes, processes) a run's numbers agree to float rounding,
# not bit for bit: XLA's CPU kernels may round differently with the shapes they see (the runs per
# device of a call). Observed on an AVX-512 machine (this project's, 2026): --devices 1 vs 4 and
# chunks of 16 vs 4 runs, 20 of 80 losses differ by one float32 ulp (relative 1.7e-7), nothing
# else; the bounds leave room for such differences to grow over a few dozen steps.
LAYOUT_RTOL, LAYOUT_ATOL = 1e-5, 1e-6
# The kernels off (DYNAMICS_NATIVE=0: autodiff gradients and LAPACK spectra, the path every
# accelerator takes) against the compiled kernels: the gradients round differently at every
# step. Observed after 40 steps of the tiny sweep: relative 4.7e-5 on an adjacent-gradient cosine
# near zero (absolute 7.8e-7), 2.6e-6 on singular values, 2.6e-7 on the loss.
KERNELS_RTOL, KERNELS_ATOL = 1e-4, 1e-5
# Observables that count (ranks, fractions of negative cosines, accuracies) change by whole
# counts when a continuous quantity lies within rounding of their threshold. A rank may differ
# only where some normalized singular value lies on different sides of rank_tol in the two
# stores; a fraction or an accuracy by one count (one step of an interval, one example) in at
# most MAX_FLIPS entries.
MAX_FLIPS = 2
RANK_TOL = 1e-3  # RunSpec.rank_tol of the tiny sweep (the default)


def assert_same_store(a, b, rtol=0.0, atol=0.0):
    """Equal stores: bit-identical numbers by default (DESIGN: the same spec on the same layout
    gives the same numbers, rerun or resumed); with a tolerance, as `assert_close_stores`."""
    if rtol or atol:
        return assert_close_stores(a, b, rtol, atol)
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.data_vars) == set(db.data_vars)
    for name in da.data_vars:
        x, y = da[name].values, db[name].values
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for c in da.coords:
        np.testing.assert_array_equal(da[c].values, db[c].values)


def _count_unit(ds, name) -> float | None:
    """The value of one count of a counting observable of the tiny sweep (None: continuous)."""
    if name.startswith("grad_cos_neg_frac"):
        return 1.0 / (int(json.loads(ds.attrs["spec"])["settings"]["record_every"]) - 1)
    if name in ("accuracy", "test_accuracy"):
        return 1.0 / 32  # the tiny sweep's test set
    return None


def assert_close_stores(a, b, rtol, atol):
    """Stores that agree to a tolerance (different layouts, or the kernels off): continuous
    variables within rtol/atol with NaN in the same places, statuses exactly, counting
    observables as stated at MAX_FLIPS."""
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.data_vars) == set(db.data_vars)
    for c in da.coords:
        np.testing.assert_array_equal(da[c].values, db[c].values)
    for name in da.data_vars:
        x, y = da[name].values, db[name].values
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=name)
        if x.dtype.kind in "iub" or name == "step":
            np.testing.assert_array_equal(x, y, err_msg=name)
            continue
        if name == "rank":
            differ = np.argwhere(np.nan_to_num(x) != np.nan_to_num(y))
            sa, sb = da["sv"].values, db["sv"].values
            for idx in map(tuple, differ):
                ra = sa[idx] / np.sqrt(np.nansum(sa[idx] ** 2))
                rb = sb[idx] / np.sqrt(np.nansum(sb[idx] ** 2))
                crossing = np.nan_to_num((ra - RANK_TOL) * (rb - RANK_TOL)) < 0
                assert crossing.any(), f"rank at {idx} differs with no sv crossing rank_tol"
            continue
        unit = _count_unit(da, name)
        if unit is not None:
            d = np.abs(np.nan_to_num(x) - np.nan_to_num(y))
            assert np.all(d <= unit * (1 + 1e-4)), f"{name}: a change of more than one count"
            assert int(np.sum(d > 0)) <= MAX_FLIPS, f"{name}: {int(np.sum(d > 0))} flips"
            continue
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep run once in this process (four simulated devices)."""
    out = tmp_path_factory.mktemp("ref") / "tiny.zarr"
    summary = run_inprocess(out, chunk=4)
    return out, summary


def test_store_layout(reference):
    out, summary = reference
    ds = xr.open_zarr(out)
    assert summary.runs == 16 and summary.runs_now == 16
    assert list(ds["status"].dims) == ["seed", "lr", "batch_size", "weight_decay"]
    assert ds["sv"].dims[-3:] == ("step", "layer", "sv_index")
    assert ds["loss"].dims == ("seed", "lr", "batch_size", "weight_decay", "step")
    np.testing.assert_array_equal(ds.step.values, [0, 10, 20, 30, 40])
    assert int((ds["status"] == 0).sum()) == 16
    for key in (
        "spec_source",
        "package_versions",
        "git_commit",
        "device_kind",
        "device_count",
        "compile_seconds",
        "run_seconds",
        "fingerprint",
    ):
        assert key in ds.attrs, key
    assert ds.attrs["complete"] is True
    assert ds.attrs["device_count"] == 4
    # costly observables only every slow_every=2 records, cheap ones at every record
    assert np.isnan(ds["rank"].isel(step=1)).all() and np.isfinite(ds["rank"].isel(step=2)).all()
    assert np.isfinite(ds["rho"]).all()
    # .sel by the values a user types
    assert ds["loss"].sel(lr=0.05, batch_size=4, weight_decay=1e-3, seed=1).shape == (5,)
    # layers by name; final states kept (small), in a group xarray does not open
    assert ds["layer_name"].values.tolist() == ["input", "hidden1", "output"]
    assert "layer_name" in ds.coords and "final_state" not in ds.variables
    assert json.loads(ds.attrs["layout"])["keep_state"] is True
    import zarr

    done = zarr.open_group(str(out), mode="r")["progress"]["done"]
    assert done.shape == ds["status"].shape and (done[...] == 40).all()


def test_sweep_run_equals_run_alone(reference, tmp_path):
    """A run's numbers in the sweep equal the same run executed alone, by the CLI and by hand."""
    out, _ = reference
    point = dict(seed=1, lr=0.2, batch_size=4, weight_decay=1e-3)
    single = tmp_path / "single.zarr"
    run_inprocess(single, *[f"{k}={v}" for k, v in point.items()])
    full = xr.open_zarr(out).sel(point)
    alone = xr.open_zarr(single).isel(seed=0, lr=0, batch_size=0, weight_decay=0)
    for name in full.data_vars:
        np.testing.assert_allclose(
            full[name].values,
            alone[name].values,
            rtol=1e-6,
            atol=1e-7,
            equal_nan=True,
            err_msg=name,
        )
    # and the library alone: make_run on the same spec, no runner
    res = resolve(load_sweep(TINY))
    ((_, spec),) = build_specs(res)
    import dataclasses

    run = jax.jit(make_run(dataclasses.replace(spec, batch=4)))
    trace = run(Hparams(lr=0.2, weight_decay=1e-3, batch_size=4), jax.random.key(1))
    np.testing.assert_allclose(np.asarray(trace["loss"]), full["loss"].values, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(trace["sv"]), full["sv"].values, rtol=1e-5, equal_nan=True
    )


def test_mask_strategy_equals_bucket(reference, tmp_path):
    """Grouping runs by batch size and masking them at the largest size give the same store.
    The tiny sweep trains a plain MLP, so where the compiled gradient is available "auto"
    masks (one program) and the numbers agree bit for bit: the kernel never reads past a
    batch's last example of nonzero weight."""
    out, summary = reference
    assert summary.programs == (1 if native.available() else 2)
    bucket = tmp_path / "bucket.zarr"
    s = run_inprocess(bucket, "batch_strategy=bucket", chunk=4)
    assert s.programs == 2  # one program per batch size
    masked = tmp_path / "mask.zarr"
    s = run_inprocess(masked, "batch_strategy=mask", chunk=8)
    assert s.programs == 1
    if native.available():
        assert_same_store(bucket, masked)
        assert_same_store(out, masked)
    else:
        da, db = xr.open_zarr(bucket), xr.open_zarr(masked)
        for name in ("loss", "rho", "sv", "grad_cos", "grad_norm"):
            np.testing.assert_allclose(
                da[name].values, db[name].values, rtol=2e-5, atol=1e-6, equal_nan=True, err_msg=name
            )


def test_auto_strategy_masks_only_what_the_kernel_trains():
    """ "auto" masks a plain MLP trained by the compiled gradient, and buckets a network whose
    masked batches would cost the largest batch (batch norm) or a spec that asks for autodiff."""
    res = resolve(load_sweep(TINY))
    specs = build_specs(res)
    assert runner.choose_strategy(res, specs) == ("mask" if native.available() else "bucket")
    bn = [
        (pt, dataclasses.replace(sp, model=dyn.mlp((8, 8, 8, 3), norm="batch"))) for pt, sp in specs
    ]
    assert runner.choose_strategy(res, bn) == "bucket"
    ad = [(pt, dataclasses.replace(sp, gradient="autodiff")) for pt, sp in specs]
    assert runner.choose_strategy(res, ad) == "bucket"


def test_resume_skips_done_chunks(tmp_path):
    out = tmp_path / "r.zarr"
    first = run_inprocess(out, chunk=4)
    assert first.runs_now == 16
    again = run_inprocess(out, chunk=4)
    assert again.runs_now == 0 and again.runs_resumed == 16 and again.programs == 0


def test_different_spec_refused(reference, tmp_path, capsys):
    """A genuine change is refused naming it (more in tests/test_grow.py)."""
    out, _ = reference
    rc = cli.main(["run", TINY, "--out", str(out), "--set", "width=16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --out:") and "different sweep spec" in err
    assert "width 8 -> 16" in err and len(err.splitlines()) == 1


def test_second_writer_refused(tmp_path):
    out = tmp_path / "w.zarr"
    from sweeps.store import Lock, StoreError

    holder = Lock(str(out))
    holder.acquire()
    try:
        with pytest.raises(StoreError, match="being written"):
            run_inprocess(out)
    finally:
        holder.release()
    assert not out.exists()


def test_divergence_is_local(tmp_path):
    """A run driven to divergence is flagged with its step; its neighbours' numbers are those
    of a sweep without it."""
    wild = tmp_path / "wild.zarr"
    tame = tmp_path / "tame.zarr"
    run_inprocess(wild, "lr=0.05,1e30", chunk=16)
    run_inprocess(tame, "lr=0.05", chunk=16)
    dw, dt = xr.open_zarr(wild), xr.open_zarr(tame)
    bad = dw.sel(lr=1e30)
    assert (bad["status"] == 1).all()
    assert (bad["diverged_step"] >= 1).all()
    assert np.isnan(bad["loss"].isel(step=-1)).all()
    assert np.isfinite(bad["loss"].isel(step=0)).all()  # the record before divergence is kept
    good = dw.sel(lr=0.05)
    assert (good["status"] == 0).all()
    for name in ("loss", "rho", "sv", "grad_cos"):
        np.testing.assert_allclose(
            good[name].values,
            dt[name].sel(lr=0.05).values,
            rtol=1e-6,
            atol=1e-7,
            equal_nan=True,
            err_msg=name,
        )
    assert dw.attrs["diverged"] == 8


def test_fsspec_url(tmp_path):
    out = f"file://{tmp_path}/u.zarr"
    s = run_inprocess(out, "seed=0", "lr=0.05", chunk=8)
    assert s.runs == 4
    assert xr.open_zarr(out)["loss"].notnull().all()


# --------------------------------------------------------------------------- processes


def test_devices_and_processes_give_the_same_store(reference, tmp_path):
    """Four simulated devices in another process (the reference's layout): the same bits. One
    device, and two processes with --distributed (one device each): the same store to the
    layout tolerance (other runs per device)."""
    ref, _ = reference
    four = tmp_path / "four.zarr"
    r = run_cli(four, "--devices", "4", "--chunk", "4")
    assert r.returncode == 0, r.stderr
    assert_same_store(ref, four)
    one = tmp_path / "one.zarr"
    r = run_cli(one, "--devices", "1", "--chunk", "4")
    assert r.returncode == 0, r.stderr
    assert_close_stores(ref, one, LAYOUT_RTOL, LAYOUT_ATOL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist = tmp_path / "dist.zarr"
    args = [
        "--devices",
        "1",
        "--chunk",
        "4",
        "--distributed",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
    ]
    cmd = [sys.executable, "-m", "sweeps", "run", TINY, "--out", str(dist), "--quiet", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            cmd + ["--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e
    assert "16 runs" in outs[0][0] and outs[1][0] == ""  # process 0 reports for both
    assert xr.open_zarr(dist).attrs["process_count"] == 2
    assert_close_stores(ref, dist, LAYOUT_RTOL, LAYOUT_ATOL)
    assert_same_store(one, dist)  # one device per process: the layout of --devices 1


def test_kernels_off_give_the_same_store(reference, tmp_path):
    """The tiny sweep with DYNAMICS_NATIVE=0 (autodiff gradients, LAPACK spectra: what runs on
    accelerators) in a process of its own equals the compiled kernels' store to KERNELS_RTOL,
    counting observables as stated (assert_close_stores)."""
    ref, _ = reference
    off = tmp_path / "off.zarr"
    r = run_cli(off, "--devices", "4", "--chunk", "4", env={"DYNAMICS_NATIVE": "0"})
    assert r.returncode == 0, r.stderr
    assert_close_stores(ref, off, KERNELS_RTOL, KERNELS_ATOL)


def test_float32_sweep_after_x64_is_turned_on(reference, tmp_path):
    """A float64 sweep turns on jax_enable_x64 for its process; a float32 sweep run after it in
    the same process (as `make figures` once did) trains in float32 as before: its store equals
    the reference to the layout tolerance. Before, the models' inits drew float64 weights there
    and the gradient statistics' carry failed to trace."""
    out = tmp_path / "x64.zarr"
    code = (
        "import jax; jax.config.update('jax_enable_x64', True); import sys; "
        "from sweeps import cli; "
        f"sys.exit(cli.main(['run', {TINY!r}, '--out', {str(out)!r}, '--devices', '4', "
        "'--chunk', '4', '--quiet']))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ref, _ = reference
    ds = xr.open_zarr(out)
    assert ds["loss"].dtype == np.float32 and ds["sv"].dtype == np.float32
    assert_close_stores(ref, out, LAYOUT_RTOL, LAYOUT_ATOL)


def _done(out: Path) -> int:
    import zarr

    try:
        # per run, the length its records reach (0: not run); chunks of one run each here
        return int(np.sum(zarr.open_group(str(out), mode="r")["progress"]["done"][...] > 0))
    except Exception:
        return 0


def test_sigkill_then_resume(reference, tmp_path):
    """Kill -9 part-way, run the same command again: the store equals an uninterrupted run's,
    and the second run redoes no finished chunk."""
    ref, _ = reference
    out = tmp_path / "k.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 2000 steps per run makes each 1-run chunk take long enough to be caught in the middle.
    sets = ["--set", "steps=2000", "--set", "record_every=500", "--chunk", "1"]

    def command(path):
        return [sys.executable, "-m", "sweeps", "run", TINY, "--out", str(path), "--quiet", *sets]

    cmd = command(out)
    full = tmp_path / "full.zarr"
    done = subprocess.run(command(full), cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _done(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _done(out)
    assert 3 <= before < 16, f"kill landed outside the run ({before} chunks done)"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"({16 - before} run now, {before} already done)" in r.stdout
    assert_same_store(full, out)


# --------------------------------------------------------------------------- bad input

BAD = [
    (["run", "no_such_sweep"], "sweep"),
    (["run", TINY, "--set", "lrr=0.1"], "lrr"),
    (["run", TINY, "--set", "steps=many"], "steps"),
    (["run", TINY, "--set", "batch_size=1.5"], "batch_size"),
    (["run", TINY, "--set", "lr=0,0.1"], "lr"),
    (["run", TINY, "--set", "lr=-0.1"], "lr"),
    (["run", TINY, "--set", "weight_decay=-1e-3"], "weight_decay"),
    (["run", TINY, "--set", "batch_size=100000"], "batch_size"),
    (["run", TINY, "--set", "record_every=7"], "record_every"),
    (["run", TINY, "--set", "scale=huge"], "scale"),
    (["run", TINY, "--set", "lr"], "--set"),
    (["run", TINY, "--set", "momentum=1.5"], "momentum"),
    (["run", TINY, "--set", "seed=-1"], "seed"),
    (["run", TINY, "--set", "lr="], "lr"),
    (["run", TINY, "--chunk", "0"], "--chunk"),
    (["run", TINY, "--set", "batch_strategy=sometimes"], "batch_strategy"),
    (["run", TINY, "--set", "width=wide"], "width"),
    (["run"], "name"),
]


@pytest.mark.parametrize("argv,field", BAD, ids=[" ".join(a[2:] or a) for a, _ in BAD])
def test_bad_input_exits_2(argv, field, tmp_path, capsys, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("bad input reached compilation")

    monkeypatch.setattr(programs, "Program", no_compile)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if argv == ["run"] else _null():
        rc = cli.main(argv + ["--out", str(out)])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and field in err, err
    assert not out.exists() and not Path(str(out) + ".lock").exists()


def test_unwritable_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = cli.main(["run", TINY, "--out", str(blocker / "sub" / "x.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --out:") and len(err.splitlines()) == 1
    assert blocker.read_text() == "not a directory"


def test_cli_subprocess_exit_status(tmp_path):
    r = run_cli(tmp_path / "x", "--set", "record_every=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "record_every" in r.stderr
    assert not (tmp_path / "x").exists()


def test_show_and_list(reference, capsys):
    out, _ = reference
    assert cli.main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16 finished, 0 diverged, 0 not run" in text and "batch_size[2]" in text
    assert cli.main(["list"]) == 0
    assert "default" in capsys.readouterr().out


def test_list_a_directory(tmp_path, capsys):
    """`list DIR` adds the configs of a directory (by path, with their descriptions) to the
    built-in ones; a file that fails to load says why on its line; files without SWEEP are not
    configs."""
    (tmp_path / "mine.py").write_text(Path(TINY).read_text().replace("runner test sweep", "my own"))
    (tmp_path / "broken.py").write_text("import no_such_module_here\nSWEEP = None\n")
    (tmp_path / "helper.py").write_text("def f():\n    return 1\n")
    assert cli.main(["list", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("default ") for ln in lines)
    mine = [ln for ln in lines if ln.startswith(str(tmp_path / "mine.py"))]
    assert len(mine) == 1 and mine[0].endswith("my own")
    broken = [ln for ln in lines if ln.startswith(str(tmp_path / "broken.py"))]
    assert len(broken) == 1 and "cannot load" in broken[0] and "ModuleNotFoundError" in broken[0]
    assert not any("helper.py" in ln for ln in lines)
    rc = cli.main(["list", str(tmp_path / "nowhere")])
    assert rc == 2 and "is not a directory" in capsys.readouterr().err


def test_bug_in_build_keeps_its_traceback(tmp_path, capsys):
    """An exception from the config's own code that is not bad input (here a TypeError)
    propagates with its traceback (file and line of the config); bad input raised there (a
    ValueError, as a DataError is) stays one line with exit status 2."""
    import traceback

    text = Path(TINY).read_text()
    buggy = tmp_path / "buggy.py"
    buggy.write_text(
        text.replace("    return dyn.RunSpec(", "    model = model + 1\n    return dyn.RunSpec(")
    )
    with pytest.raises(TypeError) as info:
        cli.main(["run", str(buggy), "--out", str(tmp_path / "out")])
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.filename == str(buggy) and f.line == "model = model + 1" for f in frames)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.py"
    bad.write_text(
        text.replace(
            "    return dyn.RunSpec(",
            "    raise ValueError('width: too narrow')\n    return dyn.RunSpec(",
        )
    )
    rc = cli.main(["run", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: width: too narrow"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_exported_programs_are_reused(tmp_path, monkeypatch):
    """A second run of the same spec loads its traced programs from disk (jax.export) instead
    of tracing again, and gives the same store; a changed setting traces a new program."""
    monkeypatch.setenv("DYNAMICS_CACHE_DIR", str(tmp_path / "cache"))
    programs._COMPILED.clear()  # programs kept in memory by earlier tests would skip the export
    exports = tmp_path / "cache" / "exports"
    first = tmp_path / "a.zarr"
    run_inprocess(first, "seed=0", "batch_strategy=bucket", chunk=8)
    saved = sorted(p.name for p in exports.iterdir())
    assert len(saved) == 2  # one program per batch size

    traced = []
    programs._COMPILED.clear()  # a new process: nothing compiled in memory
    monkeypatch.setattr(
        runner.Program,
        "_export_and_compile",
        lambda self, *a: traced.append(1) or pytest.fail("traced again"),
    )
    second = tmp_path / "b.zarr"
    run_inprocess(second, "seed=0", "batch_strategy=bucket", chunk=8)
    assert not traced and sorted(p.name for p in exports.iterdir()) == saved
    assert_same_store(first, second, rtol=0, atol=0)

    monkeypatch.undo()
    monkeypatch.setenv("DYNAMICS_CACHE_DIR", str(tmp_path / "cache"))
    run_inprocess(tmp_path / "c.zarr", "seed=0", "width=16", "batch_strategy=bucket", chunk=8)
    assert len(list(exports.iterdir())) == 4


def test_slot_order_spreads_runs_over_devices():
    """A chunk's runs go round-robin to the devices (a masked batch costs what its true size
    does, so neighbouring runs of a grid can differ much in cost), and the order inverts."""
    order = runner.slot_order(12, 3)
    assert sorted(order) == list(range(12))
    for d, block in enumerate(order.reshape(3, 4)):
        assert all(r % 3 == d for r in block)
    np.testing.assert_array_equal(runner.slot_order(8, 1), np.arange(8))


def test_dry_run_checks_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("a dry run reached compilation")

    monkeypatch.setattr(runner.Program, "compile", no_compile)
    out = tmp_path / "dry.zarr"
    assert cli.main(["run", TINY, "--out", str(out), "--dry-run", "--set", "lr=0.1,0.3,0.5"]) == 0
    text = capsys.readouterr().out
    assert "24 runs in 1 program" in text or "24 runs in 2 programs" in text
    assert "dry run: nothing compiled or written" in text and not out.exists()
    assert cli.main(["run", TINY, "--out", str(out), "--dry-run", "--set", "lr=-1"]) == 2
