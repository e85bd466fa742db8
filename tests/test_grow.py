"""Growing stores and kept final states: new axis values compute only the new runs, a longer
run continues from its kept state and equals the longer run, edits that change no number are
not spec changes, genuine changes are refused naming them; final parameters load back and give
the stored loss; layers carry names and align across depths; epochs and float64 sweeps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import sweeps
from sweeps import cli, plan, runner, states
from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
TINY = str(CONFIGS / "tiny.py")
DEPTH = str(CONFIGS / "tiny_depth.py")
EPOCHS = str(CONFIGS / "tiny_epochs.py")


def run(config, out, *sets, chunk=4, **kw):
    res = resolve(load_sweep(config), parse_overrides(sets))
    return runner.execute(res, build_specs(res), str(out), chunk_runs=chunk, progress=False, **kw)


def assert_identical(a, b):
    """Bit-identical stores (the same layout: devices, chunking, processes): every variable and
    coordinate, and every kept final state."""
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.variables) == set(db.variables)
    for name in da.variables:
        x, y = da[name].values, db[name].values
        assert x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    sa, sb = sweeps.load_state(str(a), stacked=True), sweeps.load_state(str(b), stacked=True)
    fa, fb = states.flatten(sa), states.flatten(sb)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k], equal_nan=fa[k].dtype.kind == "f"), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep (16 runs, 40 steps) with final states kept (small: auto)."""
    out = tmp_path_factory.mktemp("grow") / "tiny.zarr"
    run(TINY, out)
    return out


# --------------------------------------------------------------------------- growing


def test_new_seeds_and_lr_compute_only_the_new_runs(reference, tmp_path):
    """A store of one seed and one lr grown to the full grid runs the 12 new runs only and
    equals the store run at once, bit for bit (same chunking); then a request naming an old and
    a new lr (README: `--set lr=0.01,0.1` after `make sweep`) appends the new value."""
    out = tmp_path / "g.zarr"
    first = run(TINY, out, "seed=0", "lr=0.05")
    assert first.runs == 4 and first.runs_now == 4
    grown = run(TINY, out)
    assert grown.runs == 16 and grown.runs_now == 12 and grown.runs_resumed == 4
    assert any(c.startswith("seed + 1") for c in grown.changes)
    assert any(c.startswith("lr + 0.2") for c in grown.changes)
    assert_identical(reference, out)
    history = xr.open_zarr(out).attrs["history"]
    assert len(history) == 1 and history[0]["changes"] == grown.changes

    more = run(TINY, out, "lr=0.2,0.01")
    assert more.runs == 24 and more.runs_now == 8
    ds = xr.open_zarr(out)
    assert ds["lr"].values.tolist() == [0.05, 0.2, 0.01]  # appended, in the order given
    assert (ds["status"] == 0).all() and ds.attrs["complete"]
    alone = tmp_path / "alone.zarr"
    run(TINY, alone, "lr=0.01")
    da = xr.open_zarr(alone)
    for name in ("loss", "sv", "grad_cos"):
        np.testing.assert_array_equal(ds[name].sel(lr=[0.01]).values, da[name].values, err_msg=name)
    # nothing left: the same request again computes nothing and compiles nothing
    again = run(TINY, out, "lr=0.2,0.01")
    assert again.runs_now == 0 and again.programs == 0 and not again.changes


def test_more_steps_continue_from_the_kept_state(reference, tmp_path):
    """20 steps, then 40: every run continues from its kept final state, and the store equals
    the 40-step store bit for bit (records, status and final states)."""
    out = tmp_path / "c.zarr"
    run(TINY, out, "steps=20")
    ds = xr.open_zarr(out)
    assert ds["step"].values.tolist() == [0, 10, 20]
    s = run(TINY, out)
    assert s.runs_now == 16 and s.runs_continued == 16
    assert s.changes == ["steps 20 -> 40 (runs continue from their kept state)"]
    assert_identical(reference, out)


def test_growth_inside_a_chunk_and_a_longer_run_at_once(tmp_path):
    """Chunks of 16 runs cut the seed axis in blocks of two: a store of seeds 0-2 and 20 steps
    grown to seeds 0-3 and 40 steps continues seeds 0-1 (a whole chunk), continues seed 2 and
    starts seed 3 in the same chunk (two units of some of its runs each, written around the
    other's). Seeds 0-1 equal a fresh store's bit for bit (the same chunk, the same slots);
    seeds 2-3 ran in other slots of a call: to the layout tolerance."""
    out = tmp_path / "m.zarr"
    run(TINY, out, "seed=0:3", "steps=20", chunk=16)
    s = run(TINY, out, "seed=0:4", chunk=16)
    assert s.runs_now == 32 and s.runs_continued == 24
    fresh = tmp_path / "f.zarr"
    run(TINY, fresh, "seed=0:4", chunk=16)
    dm, df = xr.open_zarr(out), xr.open_zarr(fresh)
    assert (dm["status"] == 0).all() and dm.attrs["complete"]
    for name in df.data_vars:
        x, y = dm[name].values, df[name].values
        assert np.array_equal(x[:2], y[:2], equal_nan=True), name
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=name)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
    a = sweeps.load_params(str(out), seed=3, lr=0.2, batch_size=4, weight_decay=0.0)[0]
    b = sweeps.load_params(str(fresh), seed=3, lr=0.2, batch_size=4, weight_decay=0.0)[0]
    for la, lb in zip(a, b, strict=True):
        np.testing.assert_allclose(la["w"], lb["w"], rtol=1e-5, atol=1e-6)


def test_edits_that_change_no_number_are_not_changes(reference, tmp_path):
    """Comments, docstrings, formatting and the description of the config: the store is the
    same sweep (nothing runs). A changed loss in build(), or a changed setting, is refused with
    one line naming it, and the store is left as it was."""
    text = Path(TINY).read_text()
    edited = tmp_path / "tiny.py"
    edited.write_text(
        text.replace('"""A sweep small', '"""Edited docstring.\n\nA sweep small')
        .replace(
            "def build(steps, record_every, width, depth, n_train):",
            "def build(steps, record_every, width, depth, n_train):  # a comment\n"
            '    """build\'s new docstring"""\n',
        )
        .replace('description="runner test sweep"', 'description="another description"')
        .replace("    return dyn.RunSpec(", "\n    # why\n    return dyn.RunSpec(  ")
    )
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    s = run(str(edited), store)
    assert s.runs_now == 0 and s.programs == 0

    changed = tmp_path / "changed.py"
    changed.write_text(text.replace('loss="cross_entropy"', 'loss="square"'))
    before = sorted(p.name for p in store.iterdir())
    for argv, what in [
        (["run", str(changed)], "code differs in build"),
        (["run", TINY, "--set", "width=16"], "width 8 -> 16"),
        (["run", TINY, "--set", "steps=20"], "steps 40 -> 20"),
        (["run", TINY, "--set", "record_every=20"], "record_every 10 -> 20"),
        (["run", TINY, "--set", "momentum=0.9"], "momentum: adds a grid axis"),
        (["run", TINY, "--set", "batch_strategy=bucket"], "batch_strategy"),
    ]:
        r = subprocess_free_cli(argv + ["--out", str(store), "--quiet"])
        assert r[0] == 2 and r[1].startswith("error: --out:") and what in r[1], (argv, r)
        assert len(r[1].splitlines()) == 1
    assert sorted(p.name for p in store.iterdir()) == before
    assert xr.open_zarr(store)["step"].values.tolist() == [0, 10, 20, 30, 40]


def subprocess_free_cli(argv):
    """(exit status, stderr) of the CLI run in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue().strip()


def test_code_parts_ignore_docstrings_comments_and_formatting():
    from sweeps.spec import code_parts

    a = '"""doc"""\nimport x\n\ndef f(a):\n    """d"""\n    return a + 1  # c\nS = Sweep(name="n", build=f, grid=dict(seed=[0]))\n'
    b = 'import x\ndef f(a):\n    return (a +\n            1)\nS = Sweep(name="m", build=f, grid=dict(seed=[0, 1]), description="x")\n'
    assert code_parts(a) == code_parts(b)
    assert code_parts(a) != code_parts(a.replace("a + 1", "a + 2"))
    assert code_parts(a)["f"] != code_parts(a.replace("a + 1", "a + 2"))["f"]
    assert code_parts(a) != code_parts(a.replace("build=f", "build=f, batch_strategy='mask'"))


# --------------------------------------------------------------------------- final states


def test_final_params_give_the_stored_loss(reference):
    """load_params for a selection returns model.init-shaped parameters whose training loss,
    recomputed in float64 numpy (no JAX), is the stored loss at the last step to float32
    rounding; stacked=True carries the unselected axes first; the coordinates say which run."""
    res = resolve(load_sweep(TINY))
    ((_, spec),) = build_specs(res)
    x, y = spec.data.x_train.astype(np.float64), np.asarray(spec.data.y_train)
    ds = xr.open_zarr(reference)
    sel = dict(seed=1, lr=0.2)
    params = sweeps.load_params(str(reference), **sel)
    coords = sweeps.selected_runs(str(reference), **sel)
    assert len(params) == len(coords) == 4
    init = spec.model.init(__import__("jax").random.key(0))
    assert [sorted(layer) for layer in params[0]] == [sorted(layer) for layer in init]
    for p, c in zip(params, coords, strict=True):
        h = x
        for k, layer in enumerate(p):
            h = h @ layer["w"].astype(np.float64).T
            h = np.maximum(h, 0) if k < len(p) - 1 else h
        logp = (
            h
            - np.log(np.exp(h - h.max(1, keepdims=True)).sum(1, keepdims=True))
            - h.max(1, keepdims=True)
        )
        loss = -np.mean(logp[np.arange(len(y)), y])
        stored = float(ds["loss"].sel(c).isel(step=-1))
        assert loss == pytest.approx(stored, rel=2e-7), c
    stacked = sweeps.load_params(str(reference), stacked=True, lr=0.2)
    assert stacked[0]["w"].shape == (2, 2, 2, 8, 8)  # seed, batch_size, weight_decay, W
    np.testing.assert_array_equal(stacked[0]["w"][1, 0, 1], params[1][0]["w"])
    state = sweeps.load_state(str(reference), seed=0, lr=0.05, batch_size=4, weight_decay=0.0)[0]
    assert type(state).__name__ == "RunState" and not bool(state.diverged)
    with pytest.raises(ValueError, match="lr: 0.3 is not a value"):
        sweeps.load_params(str(reference), lr=0.3)
    with pytest.raises(ValueError, match="depth: not an axis"):
        sweeps.load_params(str(reference), depth=2)


def test_keep_params_setting(tmp_path, monkeypatch):
    """keep_params=false keeps no states (the loader says so, a longer run is refused); auto
    turns them off past KEEP_STATE_AUTO_BYTES; true keeps them whatever their size."""
    out = tmp_path / "nokeep.zarr"
    run(TINY, out, "seed=0", "lr=0.05", "keep_params=false")
    import zarr

    assert "final_state" not in zarr.open_group(str(out), mode="r").group_keys()
    with pytest.raises(ValueError, match="keeps no final states"):
        sweeps.load_params(str(out))
    rc, err = subprocess_free_cli(
        ["run", TINY, "--out", str(out), "--set", "seed=0", "--set", "lr=0.05", "--set", "steps=80"]
    )
    assert rc == 2 and "continuing runs needs their final states" in err
    res = resolve(load_sweep(TINY))
    specs = build_specs(res)
    assert runner.plan(res, specs, 4).keep_state
    monkeypatch.setattr(states, "KEEP_STATE_AUTO_BYTES", 1000)
    assert not runner.plan(res, specs, 4).keep_state
    res = resolve(load_sweep(TINY), parse_overrides(["keep_params=true"]))
    assert runner.plan(res, build_specs(res), 4).keep_state
    with pytest.raises(ValueError, match="keep_params"):
        resolve(load_sweep(TINY), parse_overrides(["keep_params=maybe"]))


# --------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def depths(tmp_path_factory):
    d = tmp_path_factory.mktemp("depth")
    out = {}
    for name, sets in [("both", []), ("d1", ["depth=1"]), ("d2", ["depth=2"])]:
        out[name] = d / f"{name}.zarr"
        run(DEPTH, out[name], *sets)
    return out


def test_static_axis_keeps_its_dimension_and_layers_their_names(depths):
    """--set depth=2 on a sweep with a static depth keeps a depth dimension of length one; a
    store of depths 1 and 2 puts each network's output layer in the last slot, so layer k is
    the same named layer at both depths ("input", "hidden1", "output"), NaN where a network
    has no such layer; stores of different depths align by layer_name."""
    d2 = xr.open_zarr(depths["d2"])
    assert d2.sizes["depth"] == 1 and d2["status"].dims[0] == "depth"
    assert d2["layer_name"].values.tolist() == ["input", "hidden1", "output"]
    d1 = xr.open_zarr(depths["d1"])
    assert d1["layer_name"].values.tolist() == ["input", "output"]
    both = xr.open_zarr(depths["both"])
    assert both["layer_name"].values.tolist() == ["input", "hidden1", "output"]
    assert both["layer_norm"].dims[-1] == "layer" and "layer_name" in both.coords
    shallow = both["layer_norm"].sel(depth=1)
    assert np.isnan(shallow.sel(layer=1)).all() and np.isfinite(shallow.isel(layer=[0, 2])).all()
    for name in ("layer_norm", "grad_norm"):
        v = both[name].sel(depth=1).isel(step=slice(1, None))
        np.testing.assert_allclose(
            v.isel(layer=[0, 2]).values,
            d1[name].sel(depth=1).isel(step=slice(1, None)).values,
            rtol=1e-6,
            err_msg=name,
        )
    np.testing.assert_allclose(
        both["layer_norm"].sel(depth=2).values, d2["layer_norm"].sel(depth=2).values, rtol=1e-6
    )
    # separate stores of different depths line up by name
    a = d1["layer_norm"].swap_dims(layer="layer_name").drop_vars("layer")
    b = d2["layer_norm"].swap_dims(layer="layer_name").drop_vars("layer")
    joined = xr.concat([a, b], "depth", join="outer", coords="minimal", compat="override")
    assert sorted(joined["layer_name"].values.tolist()) == ["hidden1", "input", "output"]
    out = joined.sel(layer_name="output").isel(step=-1)
    assert np.isfinite(out.values).all()


def test_static_axis_grows_and_refuses_a_deeper_point(depths, tmp_path):
    """A store of depth 2 grown by depth 1 computes the new point only and equals the store of
    both; a store of depth 1 cannot take depth 2 (its output slot would move)."""
    out = tmp_path / "g.zarr"
    shutil.copytree(depths["d2"], out)
    s = run(DEPTH, out, "depth=2,1")
    assert s.runs_now == 2 and s.changes == ["depth + 1"]
    ds, both = xr.open_zarr(out), xr.open_zarr(depths["both"])
    assert ds["depth"].values.tolist() == [2, 1]
    for name in ("loss", "layer_norm", "grad_norm"):
        np.testing.assert_array_equal(ds[name].sel(depth=[1, 2]).values, both[name].values)
    shapes = [[w["w"].shape for w in p] for p in sweeps.load_params(str(out), seed=0)]
    assert shapes == [[(8, 8), (8, 8), (3, 8)], [(8, 8), (3, 8)]]
    deeper = tmp_path / "d1.zarr"
    shutil.copytree(depths["d1"], deeper)
    rc, err = subprocess_free_cli(["run", DEPTH, "--out", str(deeper), "--set", "depth=1,2"])
    assert rc == 2 and "would move their output layer" in err


def test_resolve_keeps_declared_static_axes():
    sw = load_sweep(DEPTH)
    assert resolve(sw, parse_overrides(["depth=2"])).static == {"depth": [2]}
    tiny = load_sweep(TINY)  # depth is a plain setting there: one value stays a setting
    assert resolve(tiny, parse_overrides(["depth=3"])).static == {}
    assert resolve(tiny, parse_overrides(["depth=1,3"])).static == {"depth": [1, 3]}


def test_layer_slots():
    assert plan.layer_names(1) == ["output"]
    assert plan.layer_names(4) == ["input", "hidden1", "hidden2", "output"]
    assert plan.layer_slots(2, 4).tolist() == [0, 3]
    assert plan.layer_slots(4, 4).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- epochs, float64


def test_epochs_sweep_and_its_continuation(tmp_path):
    """A sweep in epochs stores the record axis `epoch` and a `step` variable that depends on
    the batch size (5 and 3 steps per epoch on 40 examples): every batch size trains the same
    number of epochs. Two epochs then four (batch size 16: the same program as in the
    store of both) equals four at once."""
    out = tmp_path / "e.zarr"
    run(EPOCHS, out)
    ds = xr.open_zarr(out)
    assert ds["epoch"].values.tolist() == [0, 2, 4] and "step" not in ds.dims
    assert ds["step"].dims[-1] == "epoch"
    steps = ds["step"].squeeze(["seed", "lr", "weight_decay"])
    np.testing.assert_array_equal(steps.sel(batch_size=8).values, [0, 10, 20])
    np.testing.assert_array_equal(steps.sel(batch_size=16).values, [0, 6, 12])
    assert np.isfinite(ds["dist"].isel(epoch=slice(1, None))).all()
    short = tmp_path / "e2.zarr"
    run(EPOCHS, short, "epochs=2", "batch_size=16")
    assert xr.open_zarr(short)["epoch"].values.tolist() == [0, 2]
    s = run(EPOCHS, short, "batch_size=16")
    assert s.runs_continued == 1
    d2 = xr.open_zarr(short)
    for name in ("loss", "rho", "dist", "step", "status"):
        np.testing.assert_array_equal(
            d2[name].values, ds[name].sel(batch_size=[16]).values, err_msg=name
        )
    (a,) = sweeps.load_params(str(short))
    (b,) = sweeps.load_params(str(out), batch_size=16)
    for la, lb in zip(a, b, strict=True):
        np.testing.assert_array_equal(la["w"], lb["w"])


def test_float64_sweep(tmp_path):
    """precision="float64" turns on JAX's 64-bit mode before the spec is validated (in a
    process of its own: the mode holds for the process): the run trains in double (its kept
    parameters are float64), and those parameters reproduce the stored final loss in numpy to
    the precision of the stored records (float64 if the library records in double, float32
    rounding if it records in single)."""
    out = tmp_path / "f64.zarr"
    cmd = [
        sys.executable,
        "-m",
        "sweeps",
        "run",
        EPOCHS,
        "--out",
        str(out),
        "--quiet",
        "--set",
        "precision=float64",
        "--set",
        "batch_size=8",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out)
    assert json.loads(ds.attrs["spec"])["settings"]["precision"] == "float64"
    (params,) = sweeps.load_params(str(out))
    assert params[0]["w"].dtype == np.float64
    res = resolve(load_sweep(EPOCHS))
    ((_, spec),) = build_specs(res)
    x, y = spec.data.x_train.astype(np.float64), np.asarray(spec.data.y_train)
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["w"].T
        h = np.maximum(h, 0) if k < len(params) - 1 else h
    m = h.max(1, keepdims=True)
    logp = h - m - np.log(np.exp(h - m).sum(1, keepdims=True))
    loss = -np.mean(logp[np.arange(len(y)), y])
    stored = ds["loss"].isel(epoch=-1).squeeze().values
    if ds["loss"].dtype == np.float64:
        assert loss == pytest.approx(float(stored), rel=1e-12)
    else:
        assert ds["loss"].dtype == np.float32 and np.float32(loss) == stored
