"""Depth masking: runs of several depths of a uniform stack in one program (the deepest, each
run cut to its depth) equal each depth's own program to float rounding, per-layer records NaN
where a run has no layer; what cannot be masked is refused naming the reason; the runner masks
a static depth axis and stores what one program per depth stores."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dynamics as dyn
from dynamics import models
from dynamics.train import make_run, masking_refusal
from sweeps import plan, runner
from sweeps.spec import SpecError, build_specs, load_sweep, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
MASKED = str(ROOT / "tests" / "configs" / "tiny_masked.py")
RTOL = 1e-5  # float32 rounding of a differently fused program
OBS = ("loss", "grad_norm", "layer_norm", "grad_cos")


def _conv(depth, norm="channel", channel_form="var_unbiased", **kw):
    return dyn.linear_conv1d(
        depth,
        kernel=5,
        channels=2,
        norm=norm,
        channel_form=channel_form,
        norm_bias=True,
        head="sigmoid",
        out_channels=1,
        init="pytorch",
        **kw,
    )


def _conv_spec(depth, **kw):
    data = dyn.data.signal_fitting(dyn.data.step_signal(16), in_channels=2)
    return dyn.RunSpec(
        _conv(depth, **kw), data, steps=12, record_every=4, observables=OBS, sampling="full"
    )


def _mlp_spec(depth, **kw):
    data = dyn.data.gaussian_mixture(seed=0, n_train=32, n_test=16, d=6, num_classes=3)
    model = dyn.mlp((6,) + (8,) * (depth + 1) + (3,), **kw)
    return dyn.RunSpec(
        model,
        data,
        steps=12,
        record_every=4,
        observables=OBS,
        batch=8,
        stepper=dyn.sgd,
        gradient="autodiff",
    )


def _runs(spec, depths, stack_mask, momentum=0.9):
    n = len(depths)
    hp = dyn.hparams(
        lr=[0.05] * n, momentum=[momentum] * n, weight_decay=[1e-3] * n, stack_depth=depths
    )
    keys = jax.random.split(jax.random.key(3), n)
    return jax.jit(jax.vmap(make_run(spec, stack_mask=stack_mask)))(hp, keys)


def _check_depth(masked: dict, j: int, own: dict, n_own: int, n_deep: int):
    """Run j of the masked program against its depth's own run: every record equal to rounding,
    and per layer the own run's first n_own - 1 layers, then NaN up to the deepest's output
    layer, then the output layer (the store's slots)."""
    for name in OBS:
        a, b = np.asarray(masked[name][j]), np.asarray(own[name][0])
        if a.ndim == 2:  # (record, layer)
            assert np.isnan(a[:, n_own - 1 : n_deep - 1]).all(), name
            a = np.concatenate([a[:, : n_own - 1], a[:, -1:]], axis=1)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7, err_msg=name)
    assert int(masked["status"][j]) == 0 and int(own["status"][0]) == 0


@pytest.mark.parametrize(
    "family, stacked, depths",
    [
        ("conv", True, (1, 2, 4)),
        ("mlp", True, (1, 2, 4)),
        ("conv", False, (1, 3)),
        ("mlp", False, (0, 3)),
    ],
    ids=["conv-stacked", "mlp-stacked", "conv-list", "mlp-list"],
)
def test_masked_runs_equal_each_depths_own_program(family, stacked, depths):
    """Depth 0 of the MLP's stack: none of its hidden layers (the input and output layers
    only)."""
    make = _conv_spec if family == "conv" else _mlp_spec
    deep = dataclasses.replace(make(max(depths)), stack_layers=stacked)
    assert masking_refusal(deep) is None
    masked = _runs(deep, list(depths), True)
    n_deep = len(jax.eval_shape(deep.model.init, jax.random.key(0)))
    for j, d in enumerate(depths):
        spec = dataclasses.replace(make(d), stack_layers=stacked)
        n_own = len(jax.eval_shape(spec.model.init, jax.random.key(0)))
        key = jax.random.split(jax.random.key(3), len(depths))[j]
        hp = dyn.hparams(lr=[0.05], momentum=[0.9], weight_decay=[1e-3])
        own = jax.jit(jax.vmap(make_run(spec)))(hp, key[None])
        _check_depth(masked, j, own, n_own, n_deep)


def test_a_masked_run_at_full_depth_and_the_models_init():
    """stack_depth -1 and the stack's own count both run every layer: the deepest model's own
    run; the masked init of a shallower depth is that model's init with zero layers inserted."""
    deep = _conv_spec(3)
    masked = _runs(deep, [-1, 3], True)
    own = _runs(deep, [-1, -1], False)
    for name in OBS:
        np.testing.assert_allclose(masked[name], own[name], rtol=RTOL, atol=1e-7, err_msg=name)
    from dynamics.train import _masked_init

    key = jax.random.key(5)
    cut = _masked_init(deep.model, jnp.asarray(1), key, False, 4)
    shallow = _conv(1).init(key)
    for a, b in zip(jax.tree.leaves([cut[0], cut[3]]), jax.tree.leaves(shallow), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(cut[1:3]))


def test_what_cannot_be_masked_is_refused_by_name():
    spec = _conv_spec(3)
    assert "rho" in masking_refusal(dataclasses.replace(spec, observables=("loss", "rho")))
    user = dyn.Observable("mine", lambda ctx: ctx.loss, kind="step")
    assert "layerwise" in masking_refusal(dataclasses.replace(spec, observables=("loss", user)))
    flagged = user._replace(layerwise=True)
    assert masking_refusal(dataclasses.replace(spec, observables=("loss", flagged))) is None
    assert "per-layer" in masking_refusal(
        dataclasses.replace(spec, stepper=lambda f: dyn.sgd(f, lr_scale=[1.0] * 4))
    )
    # a skipped block's zeros would give 0/0 in the gradient of norm spread sqrt(.) + eps
    assert _conv(3, channel_form="std").stack is None
    assert dyn.linear_conv1d(3, weight_param="weight").stack is None
    assert dyn.mlp((4, 8, 6, 2)).stack is None  # hidden widths differ
    assert "no uniform stack" in masking_refusal(
        dataclasses.replace(spec, model=_conv(3, channel_form="std"))
    )
    with pytest.raises(ValueError, match="stack_mask: observable 'rho'"):
        make_run(dataclasses.replace(spec, observables=("rho",)), stack_mask=True)
    # models of one family differ in the stack's count alone
    assert models.masked_stack([_conv(1), _conv(3)]).stack.count == 3
    assert models.masked_stack([_conv(1), _conv(3, norm="bias")]) is None


def test_a_stack_depth_the_program_cannot_honour_is_an_invalid_run():
    """Without stack_mask any stack_depth but -1 would be ignored: the run is invalid (3), as is
    a depth outside 0..count with it."""
    spec = _conv_spec(3)
    plain = _runs(spec, [-1, 2], False)
    assert plain["status"].tolist() == [0, 3]
    masked = _runs(spec, [4, -2, 0], True)
    assert masked["status"].tolist() == [3, 3, 0]
    assert np.isnan(np.asarray(masked["loss"][:2])).all()


def _run(out, *sets):
    res = resolve(load_sweep(MASKED), parse_overrides(sets))
    return runner.execute(res, build_specs(res), str(out), progress=False)


def _assert_close_stores(a, b):
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.data_vars) == set(db.data_vars)
    for name in da.data_vars:
        x, y = da[name].values, db[name].values
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7, err_msg=name)
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="module")
def per_depth(tmp_path_factory):
    """The tiny masked sweep with one program per depth: the reference."""
    out = tmp_path_factory.mktemp("masking") / "programs.zarr"
    assert _run(out, "depth_strategy=program").programs == 6
    return out


def test_the_runner_masks_a_depth_axis_and_stores_what_programs_per_depth_store(
    tmp_path, per_depth
):
    res = resolve(load_sweep(MASKED), parse_overrides(()))
    specs = build_specs(res)
    # depths 2, 3, 4 of the blocks: a quarter of the stack's passes skipped
    assert plan._mask_refusal(res, specs, "depth") == (None, 0.25)
    assert (
        "differ in more than one uniform stack's depth" in plan._mask_refusal(res, specs, "norm")[0]
    )
    assert plan.choose_mask_axis(res, specs, keep=False) == "depth"
    p = plan.plan(res, specs)
    assert p.mask_axis == "depth" and len(p.groups) == 2
    assert [g.stack_depths for g in p.groups] == [(2, 3, 4), (2, 3, 4)]
    masked = _run(tmp_path / "m.zarr", "depth_strategy=auto")
    assert masked.programs == 2
    _assert_close_stores(tmp_path / "m.zarr", per_depth)
    layout = json.loads(xr.open_zarr(tmp_path / "m.zarr").attrs["layout"])
    assert layout["mask_axis"] == "depth"


def test_a_masked_depth_axis_grows_by_a_depth_computing_only_its_runs(tmp_path, per_depth):
    out = tmp_path / "g.zarr"
    first = _run(out, "depth=3,4")
    assert (first.programs, first.runs_now) == (2, 8)
    grown = _run(out, "depth=2,3,4")
    assert grown.runs_now == 4  # depth 2's runs only, in the masked layout of the first run
    assert json.loads(xr.open_zarr(out).attrs["layout"])["mask_axis"] == "depth"
    da = xr.open_zarr(out).sel(depth=[2, 3, 4])
    db = xr.open_zarr(per_depth)
    for name in db.data_vars:
        x, y = da[name].values, db[name].values
        if x.dtype.kind == "f":
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7, err_msg=name)


def test_depth_strategy_mask_that_cannot_mask_is_one_line_and_exit_2(tmp_path):
    res = resolve(
        load_sweep(MASKED), parse_overrides(["depth_strategy=mask", "observables=loss+rho"])
    )
    with pytest.raises(SpecError, match="depth_strategy: 'mask' cannot share programs.*rho"):
        plan.choose_mask_axis(res, build_specs(res), keep=False)
    # auto keeps one program per depth where masking is refused
    res = resolve(load_sweep(MASKED), parse_overrides(["observables=loss+rho"]))
    assert plan.choose_mask_axis(res, build_specs(res), keep=False) is None
    out = tmp_path / "x.zarr"
    for item in ("depth_strategy=sideways", "depth_strategy=mask"):
        r = subprocess.run(
            [sys.executable, "-m", "sweeps", "run", MASKED, "--out", str(out), "--quiet"]
            + ["--set", item, "--set", "observables=loss+rho"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "depth_strategy" in r.stderr
    assert not out.exists()
