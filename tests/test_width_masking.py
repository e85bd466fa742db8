"""Width masking: runs of several hidden widths in one program (the widest, each run's params
the narrower model's own, zero-padded) equal each width's own program to float rounding;
what cannot be masked is refused naming the reason; the runner masks a static width axis and
stores what one program per width stores."""

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
from dynamics import orthogonal as orth
from dynamics.train import WIDTH_MASKABLE, make_run, width_refusal
from sweeps import plan, runner
from sweeps.spec import SpecError, build_specs, load_sweep, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
WIDE = str(ROOT / "tests" / "configs" / "tiny_width.py")
RTOL = 2e-5  # float32 rounding of a differently shaped program
OBS = (
    "loss",
    "accuracy",
    "test_loss",
    "grad_norm",
    "layer_norm",
    "grad_cos",
    "sv",
    "rank",
    "stable_rank",
    "rho",
    "balancedness",
    "effective_lr",
    "update_size",
)
KEYS = jax.random.split(jax.random.key(3), 4)


def _mlp_spec(width, stepper=dyn.sgd, stacked=True, **kw):
    data = dyn.data.gaussian_mixture(seed=0, n_train=32, n_test=16, d=6, num_classes=3)
    return dyn.RunSpec(
        dyn.mlp((6, width, width, width, width, 3), **kw),
        data,
        steps=12,
        record_every=4,
        observables=OBS,
        batch=8,
        stepper=stepper,
        gradient="autodiff",
        stack_layers=stacked,
    )


def _hu_spec(width, init):
    data = orth.hu_data(8, 6, 2, seed=0)
    return dyn.RunSpec(
        model=orth.hu_linear(8, width, 6, 2, init=init),
        data=data,
        loss=orth.hu_loss,
        stepper=dyn.sgd,
        steps=40,
        record_every=10,
        sampling="full",
        lr_schedule=orth.LrFactor(orth.hu_lr(data.x_train, 6, 2)),
        observables=("loss", "layer_norm", "grad_norm", "sv"),
        eval_size=None,
    )


def _hp(n, **kw):
    return dyn.hparams(lr=[0.05] * n, momentum=[0.9] * n, weight_decay=[1e-3] * n, **kw)


def _check(masked, j, own, names):
    """Run j of the masked program against its width's own run: every record equal to
    rounding; `sv` the own run's values, then NaN up to the widest's count."""
    for name in names:
        a, b = np.asarray(masked[name][j]), np.asarray(own[name][0])
        if name == "sv":
            assert np.isnan(a[..., b.shape[-1] :]).all()
            a = a[..., : b.shape[-1]]
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=2e-6, err_msg=name)
    assert int(masked["status"][j]) == int(own["status"][0]) == 0


@pytest.mark.parametrize(
    "kw, widths",
    [
        (dict(), (6, 12)),  # width 6 = d_in: the narrow model's stacked layout differs
        (
            dict(
                parameterization="ntk",
                bias=True,
                activation="tanh",
                init="pytorch",
                stepper=dyn.adam,
                stacked=False,
            ),
            (4, 12),
        ),
    ],
    ids=["relu-sgd-stacked", "ntk-tanh-adam-list"],
)
def test_masked_mlp_runs_equal_each_widths_own_program(kw, widths):
    """Hu et al.'s deep linear network (its 1/sqrt(m) the run's own width's) is checked
    through the runner below."""
    wide = _mlp_spec(max(widths), **kw)
    assert width_refusal(wide, widths) is None
    n = len(widths)
    masked = jax.jit(jax.vmap(make_run(wide, width_mask=widths)))(
        _hp(n, width=list(widths)), KEYS[:n]
    )
    for j, w in enumerate(widths):
        own = jax.jit(jax.vmap(make_run(_mlp_spec(w, **kw))))(_hp(1), KEYS[j : j + 1])
        _check(masked, j, own, OBS)


def test_the_padded_init_is_the_narrow_models_init():
    """pad_params puts the narrow model's params in the corner of the wide shapes, zeros
    elsewhere, and in the wide model's stacked layout."""
    key = jax.random.key(5)
    wide, narrow = dyn.mlp((6, 12, 12, 12, 3)), dyn.mlp((6, 6, 6, 6, 3))
    like = jax.eval_shape(models.stacked_init(wide), key)
    padded = models.pad_params(models.stacked_init(narrow)(key), like)
    assert padded.counts == like.counts != models.stacked_init(narrow)(key).counts
    for a, b in zip(list(padded), narrow.init(key), strict=True):
        w, v = np.asarray(a["w"]), np.asarray(b["w"])
        np.testing.assert_array_equal(w[: v.shape[0], : v.shape[1]], v)
        assert not w[v.shape[0] :].any() and not w[:, v.shape[1] :].any()
    with pytest.raises(ValueError, match="does not fit"):
        models.pad_params(wide.init(key), jax.eval_shape(narrow.init, key))


def test_a_width_the_program_cannot_honour_is_an_invalid_run():
    spec = dataclasses.replace(_mlp_spec(12), observables=("loss",))
    plain = jax.jit(jax.vmap(make_run(spec)))(_hp(2, width=[-1, 6]), KEYS[:2])
    assert plain["status"].tolist() == [0, 3]
    masked = jax.jit(jax.vmap(make_run(spec, width_mask=(6, 12))))(
        _hp(4, width=[7, 0, -1, 12]), KEYS[jnp.asarray([0, 1, 2, 2])]
    )
    assert masked["status"].tolist() == [3, 3, 0, 0]
    np.testing.assert_allclose(masked["loss"][2], masked["loss"][3], rtol=1e-6)


def test_what_cannot_be_masked_is_refused_by_name():
    spec = _mlp_spec(12)
    assert "sharpness" in width_refusal(
        dataclasses.replace(spec, observables=("loss", "sharpness"))
    )
    user = dyn.Observable("mine", lambda ctx: ctx.loss, kind="step", layerwise=True)
    assert "user's" in width_refusal(dataclasses.replace(spec, observables=("loss", user)))
    assert "not the largest" in width_refusal(spec, (6, 16))
    assert "positive" in width_refusal(spec, (0, 12))
    assert "optimizer" in width_refusal(dataclasses.replace(spec, stepper=dyn.steps.normalized_gd))
    assert "final states" in width_refusal(dataclasses.replace(spec, keep_state=True))
    auto = dataclasses.replace(spec, gradient="auto")
    if dyn.train.dense_gradient(auto):  # the compiled MLP gradient (kernels on)
        assert "compiled MLP gradient" in width_refusal(auto)
    # batch norm, weight norm, unequal hidden widths: no Width
    assert dyn.mlp((6, 8, 8, 3), norm="batch").width is None
    assert dyn.mlp((6, 8, 8, 3), weight_param="weight").width is None
    assert dyn.mlp((6, 8, 4, 3)).width is None
    assert orth.hu_linear(8, 4, 1, 2).width is None  # depth 1: no hidden width
    assert "no width" in width_refusal(dataclasses.replace(spec, model=dyn.mlp((6, 8, 4, 3))))
    with pytest.raises(ValueError, match="width_mask: observable 'sharpness'"):
        make_run(dataclasses.replace(spec, observables=("sharpness",)), width_mask=(6, 12))
    with pytest.raises(ValueError, match="depth or the width, not both"):
        make_run(spec, stack_mask=True, width_mask=(6, 12))
    # models of one family differ in the width alone
    assert models.masked_width([dyn.mlp((6, 4, 4, 3)), dyn.mlp((6, 9, 9, 3))]).width.value == 9
    assert models.masked_width([dyn.mlp((6, 4, 4, 3)), dyn.mlp((6, 9, 9, 9, 3))]) is None
    assert set(WIDTH_MASKABLE) >= set(OBS)


def _run(out, *sets):
    res = resolve(load_sweep(WIDE), parse_overrides(sets))
    return runner.execute(res, build_specs(res), str(out), progress=False)


def _assert_close_stores(a, b, sel=None):
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    if sel:
        da = da.sel(sel)
    for name in db.data_vars:
        x, y = da[name].values, db[name].values
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=2e-6, err_msg=name)
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="module")
def per_width(tmp_path_factory):
    """The tiny width sweep with one program per width: the reference."""
    out = tmp_path_factory.mktemp("width") / "programs.zarr"
    assert _run(out, "width_strategy=program").programs == 6
    return out


def test_the_runner_masks_a_width_axis_and_stores_what_programs_per_width_store(
    tmp_path, per_width
):
    res = resolve(load_sweep(WIDE), parse_overrides(()))
    specs = build_specs(res)
    why, waste = plan._width_refusal(res, specs, "width")
    assert why is None and 0.1 < waste < plan.WIDTH_WASTE_AUTO  # widths 8, 9 against 10
    assert "more than one hidden width" in plan._width_refusal(res, specs, "activation")[0]
    assert plan.choose_masking(res, specs, keep=False) == ("width", "width")
    p = plan.plan(res, specs)
    assert (p.mask_axis, p.mask_kind, len(p.groups)) == ("width", "width", 2)
    assert [g.widths for g in p.groups] == [(8, 9, 10), (8, 9, 10)]
    masked = _run(tmp_path / "m.zarr")
    assert masked.programs == 2
    _assert_close_stores(tmp_path / "m.zarr", per_width)
    layout = json.loads(xr.open_zarr(tmp_path / "m.zarr").attrs["layout"])
    assert (layout["mask_axis"], layout["mask_kind"]) == ("width", "width")


def test_a_masked_width_axis_grows_by_a_narrower_width_computing_only_its_runs(tmp_path, per_width):
    out = tmp_path / "g.zarr"
    first = _run(out, "width=9,10")
    assert (first.programs, first.runs_now) == (2, 8)
    grown = _run(out, "width=8,9,10")
    assert grown.runs_now == 4  # width 8's runs only, in the masked layout of the first run
    assert json.loads(xr.open_zarr(out).attrs["layout"])["mask_kind"] == "width"
    _assert_close_stores(out, per_width, sel={"width": [8, 9, 10]})


def test_the_deep_linear_widths_share_one_program_per_init(tmp_path):
    sets = (
        "family=hu",
        "width=4,10",
        "activation=orthogonal,gaussian",
        "observables=loss+layer_norm+sv",
    )
    masked = _run(tmp_path / "hu.zarr", "width_strategy=mask", *sets)
    assert masked.programs == 2
    own = _run(tmp_path / "own.zarr", "width_strategy=program", *sets)
    assert own.programs == 4
    _assert_close_stores(tmp_path / "hu.zarr", tmp_path / "own.zarr")
    loss = xr.open_zarr(tmp_path / "own.zarr")["loss"].values
    assert (loss[..., -1] < 0.97 * loss[..., 0]).all()  # every run trains (20 steps)


def test_width_strategy_that_cannot_mask_is_one_line_and_exit_2(tmp_path):
    res = resolve(
        load_sweep(WIDE), parse_overrides(["width_strategy=mask", "observables=loss+sharpness"])
    )
    with pytest.raises(SpecError, match="width_strategy: 'mask' cannot share programs.*sharpness"):
        plan.choose_width_axis(res, build_specs(res), keep=False)
    res = resolve(load_sweep(WIDE), parse_overrides(["observables=loss+sharpness"]))
    assert plan.choose_masking(res, build_specs(res), keep=False) == (None, "depth")
    out = tmp_path / "x.zarr"
    for item in ("width_strategy=sideways", "width_strategy=mask"):
        r = subprocess.run(
            [sys.executable, "-m", "sweeps", "run", WIDE, "--out", str(out), "--quiet"]
            + ["--set", item, "--set", "observables=loss+sharpness"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "width_strategy" in r.stderr
    assert not out.exists()
