"""`python -m sweeps plot` and `report`: the numbers drawn are the store's (mean line, min-max
band over seeds, diverged runs left out), every layout option draws, bad arguments exit 2 with
one line before anything is drawn or written, and the report is one self-contained page."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from sweeps import cli, plot, report, runner, store
from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.py")
PNG, PDF = b"\x89PNG\r\n\x1a\n", b"%PDF"


def run_inprocess(out, *sets):
    res = resolve(load_sweep(TINY), parse_overrides(sets))
    runner.execute(res, build_specs(res), str(out), chunk_runs=4, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny sweep: seed x lr x batch_size x weight_decay = 2 x 2 x 2 x 2 runs."""
    return run_inprocess(tmp_path_factory.mktemp("plot") / "tiny.zarr")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A static axis (width: one program per value), three seeds, learning rates 20x apart
    and one that diverges."""
    out = tmp_path_factory.mktemp("plot") / "wide.zarr"
    return run_inprocess(
        out,
        "width=4,8",
        "depth=1",
        "seed=0,1,2",
        "lr=0.01,0.2,1e30",
        "batch_size=16",
        "weight_decay=0",
    )


@pytest.fixture(scope="module")
def incomplete(tiny, tmp_path_factory):
    """The tiny store with its last chunk of runs as a kill leaves it: status -1, NaN values,
    the chunk unmarked, the store not complete."""
    import zarr

    out = tmp_path_factory.mktemp("plot") / "part.zarr"
    shutil.copytree(tiny, out)
    g = zarr.open_group(str(out), mode="r+")
    axes = list(xr.open_zarr(out)["status"].dims)
    block = json.loads(g.attrs["layout"])["block"]
    shape = g["status"].shape
    region = tuple(
        slice((n - 1) // block[a] * block[a], n) for a, n in zip(axes, shape, strict=True)
    )
    for name in g.array_keys():
        arr = g[name]
        if name == "status" or name == "diverged_step":
            arr[region] = -1
        elif arr.ndim >= len(axes) and arr.dtype.kind == "f":
            arr[region + (slice(None),) * (arr.ndim - len(axes))] = np.nan
    done = g["progress"]["done"]
    done[done.shape[0] - 1] = 0
    g.attrs["complete"] = False
    store.consolidate(str(out))
    return str(out)


def mean_lines(ax):
    return [ln for ln in ax.lines if ln.get_gid() == "mean"]


def band_extent(ax, label):
    """{x: (min y, max y)} over the vertices of the seed band of hue `label` in the panel."""
    out: dict[float, list[float]] = {}
    for c in ax.collections:
        if c.get_gid() != f"band:{label or ''}":
            continue
        for path in c.get_paths():
            for xv, yv in path.vertices:
                out.setdefault(round(float(xv), 9), []).append(float(yv))
    return {k: (min(v), max(v)) for k, v in out.items()}


def check_line(ax, label, expect: xr.DataArray, x: str, lo=None, hi=None):
    """The panel's mean line `label` draws `expect` (over dim x) at its finite points, and the
    band spans lo..hi there."""
    lines = mean_lines(ax)
    if label is not None:
        lines = [ln for ln in lines if ln.get_label().split(" ")[0] == label]
    (line,) = lines
    e = np.asarray(expect.transpose(x).values, float)
    xs = np.asarray(expect[x].values, float)
    m = np.isfinite(e)
    np.testing.assert_array_equal(line.get_xdata(), xs[m])
    np.testing.assert_allclose(line.get_ydata(), e[m], rtol=1e-6)
    if lo is not None:
        ext = band_extent(ax, label)
        lo, hi = np.asarray(lo.transpose(x).values)[m], np.asarray(hi.transpose(x).values)[m]
        for xv, a, b in zip(xs[m], lo, hi, strict=True):
            np.testing.assert_allclose(ext[round(float(xv), 9)], (a, b), rtol=1e-6)
    return line


def test_scalar_variable_lines_and_bands(tiny, tmp_path, capsys):
    """loss by lr (hue) and batch size (columns): the mean line over seeds, the min-max band;
    with --log the geometric mean; PNG and PDF by the suffix."""
    ds = xr.open_zarr(tiny)
    args = ["--hue", "lr", "--col", "batch_size", "--sel", "weight_decay=1e-3"]
    for suffix, magic in ((".png", PNG), (".pdf", PDF)):
        out = tmp_path / f"loss{suffix}"
        assert cli.main(["plot", tiny, "loss", *args, "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        assert out.read_bytes().startswith(magic)

    sel = ds["loss"].sel(weight_decay=1e-3)
    for log in (False, True):
        fig = plot.plot(ds, "loss", hue="lr", col="batch_size", sel=["weight_decay=1e-3"], log=log)
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["batch_size=4", "batch_size=16"]
        for ax, b in zip(axes, (4, 16), strict=True):
            assert len(mean_lines(ax)) == 2
            for lr in (0.05, 0.2):
                v = sel.sel(batch_size=b, lr=lr)
                center = np.exp(np.log(v).mean("seed")) if log else v.mean("seed")
                check_line(ax, f"{lr:g}", center, "step", v.min("seed"), v.max("seed"))
        assert axes[0].get_yscale() == ("log" if log else "linear")
        title = fig._suptitle.get_text()
        assert "weight_decay=0.001" in title and "over 2 seeds" in title
        assert ("geometric mean" in title) == log


def test_axes_drawn_in_increasing_order(tiny):
    """A grown store appends an axis's new values (lr 0.01 after 0.05, 0.2): panels, legend
    entries and x values come in increasing order all the same, each with its own numbers."""
    ds = xr.open_zarr(tiny).load()
    grown = ds.isel(lr=[1, 0], batch_size=[1, 0])  # as a store grown by lr 0.05 and batch 4
    for hue, col in (("lr", "batch_size"), ("batch_size", "lr")):
        fig = plot.plot(grown, "loss", hue=hue, col=col, sel=["weight_decay=1e-3"])
        values = sorted(float(v) for v in ds[col].values)
        assert [ax.get_title() for ax in fig.axes] == [f"{col}={v:g}" for v in values]
        for ax, c in zip(fig.axes, values, strict=True):
            hues = sorted(float(v) for v in ds[hue].values)
            assert [ln.get_label().split(" ")[0] for ln in mean_lines(ax)] == [
                f"{h:g}" for h in hues
            ]
            for h in hues:
                v = ds["loss"].sel(weight_decay=1e-3, **{col: c, hue: h})
                check_line(ax, f"{h:g}", v.mean("seed"), "step")
    fig = plot.plot(grown, "loss", x="batch_size", hue="lr", at="last", sel=["weight_decay=1e-3"])
    for line in mean_lines(fig.axes[0]):
        xs = np.asarray(line.get_xdata(), float)
        assert (np.diff(xs) > 0).all(), xs


def test_layer_variable(tiny, tmp_path):
    """rank (recorded every other record): --layer all draws one line per layer, K picks one,
    mean (the default) averages; records where rank was not recorded are skipped."""
    ds = xr.open_zarr(tiny)
    rank = ds["rank"].sel(lr=0.2, weight_decay=0.0)
    kw = dict(col="batch_size", sel=["lr=0.2", "weight_decay=0"])
    fig = plot.plot(ds, "rank", layer="all", **kw)
    for ax, b in zip(fig.axes, (4, 16), strict=True):
        assert len(mean_lines(ax)) == ds.sizes["layer"]
        for k in range(ds.sizes["layer"]):
            v = rank.sel(batch_size=b, layer=k)
            line = check_line(ax, str(k), v.mean("seed"), "step", v.min("seed"), v.max("seed"))
            np.testing.assert_array_equal(line.get_xdata(), [0, 20, 40])
    fig = plot.plot(ds, "rank", layer="1", **kw)
    assert "layer=1" in fig._suptitle.get_text()
    v = rank.sel(batch_size=16, layer=1)
    check_line(fig.axes[1], None, v.mean("seed"), "step", v.min("seed"), v.max("seed"))
    fig = plot.plot(ds, "rank", **kw)
    assert "mean over layers" in fig._suptitle.get_text()
    v = rank.sel(batch_size=4).mean("layer")
    check_line(fig.axes[0], None, v.mean("seed"), "step", v.min("seed"), v.max("seed"))
    for suffix, magic in ((".png", PNG), (".pdf", PDF)):
        out = tmp_path / f"rank{suffix}"
        argv = ["plot", tiny, "rank", "--layer", "all", "--col", "batch_size", "--out", str(out)]
        assert cli.main(argv + ["--sel", "lr=0.2", "--sel", "weight_decay=0"]) == 0
        assert out.read_bytes().startswith(magic)


def test_spectrum(tiny, tmp_path):
    """sv is drawn against sv_index at each run's last finite record (the default) or at the
    record nearest --at among those where sv was recorded; the layer mean skips the NaN padding
    of smaller layers."""
    ds = xr.open_zarr(tiny)
    fig = plot.plot(ds, "sv", hue="lr", col="batch_size", row="weight_decay")
    assert len(fig.axes) == 4 and fig.axes[3].get_title() == "weight_decay=0.001, batch_size=16"
    assert "at the last finite record (step 40)" in fig._suptitle.get_text()
    v = ds["sv"].isel(step=-1).mean("layer").sel(weight_decay=1e-3, batch_size=16, lr=0.05)
    check_line(fig.axes[3], "0.05", v.mean("seed"), "sv_index", v.min("seed"), v.max("seed"))
    assert mean_lines(fig.axes[3])[0].get_xdata().tolist() == list(range(ds.sizes["sv_index"]))

    # step 30 is a record, but sv was not recorded there: the nearest recorded ones are 20, 40
    fig = plot.plot(ds, "sv", hue="lr", col="batch_size", row="weight_decay", at="30")
    assert "at step 20 (the record nearest 30)" in fig._suptitle.get_text()
    v = ds["sv"].sel(step=20).mean("layer").sel(weight_decay=0.0, batch_size=4, lr=0.2)
    check_line(fig.axes[0], "0.2", v.mean("seed"), "sv_index", v.min("seed"), v.max("seed"))
    for suffix, magic in ((".png", PNG), (".pdf", PDF)):
        out = tmp_path / f"sv{suffix}"
        argv = ["plot", tiny, "sv", "--hue", "lr", "--col", "batch_size", "--row", "weight_decay"]
        assert cli.main(argv + ["--at", "last", "--out", str(out)]) == 0
        assert out.read_bytes().startswith(magic)


def test_static_axis_diverged_runs_and_at_last(wide, tmp_path):
    """width, a static axis, on the columns; the diverging learning rate draws nothing and the
    title counts it; --at last against lr (20x apart: a log axis) with two of its values kept."""
    ds = xr.open_zarr(wide)
    assert list(ds["status"].dims)[0] == "width"
    kept = ds.where(ds["status"] != 1).isel(batch_size=0, weight_decay=0)  # what may be drawn
    fig = plot.plot(ds, "loss", hue="lr", col="width")
    title = fig._suptitle.get_text()
    assert "6 of 18 runs diverged (excluded)" in title and "over 3 seeds" in title
    for ax, w in zip(fig.axes, (4, 8), strict=True):
        assert ax.get_title() == f"width={w}"
        for lr in (0.01, 0.2, 1e30):
            v = kept["loss"].sel(width=w, lr=lr)
            check_line(ax, f"{lr:g}", v.mean("seed"), "step", v.min("seed"), v.max("seed"))
        (wild,) = [ln for ln in mean_lines(ax) if ln.get_label().startswith("1e+30")]
        assert len(wild.get_xdata()) == 0 and "no values" in wild.get_label()

    sel = ["lr=0.01,0.2"]
    fig = plot.plot(ds, "test_accuracy", x="lr", at="last", col="width", sel=sel)
    assert "at the last finite record (step 40)" in fig._suptitle.get_text()
    acc = kept["test_accuracy"].isel(step=-1).sel(lr=[0.01, 0.2])
    for ax, w in zip(fig.axes, (4, 8), strict=True):
        assert ax.get_xscale() == "log"
        v = acc.sel(width=w)
        check_line(ax, None, v.mean("seed"), "lr", v.min("seed"), v.max("seed"))
    with pytest.raises(plot.PlotError, match=r"^width has 2 values \(4, 8\)"):
        plot.prepare(ds, "loss", hue="lr")
    out = tmp_path / "w.pdf"
    argv = ["plot", wide, "rank", "--layer", "0", "--at", "last", "--x", "lr", "--hue", "width"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    assert out.read_bytes().startswith(PDF)


def test_last_is_per_run():
    """`last` reads each run at its own last finite record (a hand-built store: run 1 stops
    after its second record, run 2 has none)."""
    loss = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.nan], [np.nan, np.nan, np.nan]])
    ds = xr.Dataset(
        {
            "loss": (("seed", "step"), loss, {"description": "d"}),
            "status": (("seed",), np.array([0, 0, -1], np.int8)),
        },
        coords={"seed": [0, 1, 2], "step": [0, 10, 20]},
        attrs={"sweep": "hand", "complete": False},
    )
    p = plot.prepare(ds, "loss", x="seed", at="last")
    np.testing.assert_array_equal(p.center[0, 0, 0], [3.0, 5.0, np.nan])
    assert "each run's last finite record (step 10..20)" in p.title[0]
    assert "1 of 3 runs not run yet" in p.title[-1]
    # a store recorded by epoch: the record axis is found by name
    by_epoch = ds.rename(step="epoch")
    p = plot.prepare(by_epoch, "loss")
    assert p.x == "epoch" and p.x_values.tolist() == [0, 10, 20]
    np.testing.assert_array_equal(p.center[0, 0, 0], [2.5, 3.5, 3.0])  # mean of runs 0 and 1
    np.testing.assert_array_equal(p.lo[0, 0, 0], [1.0, 2.0, 3.0])
    with pytest.raises(plot.PlotError, match="^--at: epoch 30 is beyond the records"):
        plot.prepare(by_epoch, "loss", x="seed", at=30)


def test_incomplete_store(incomplete, tiny):
    """A store cut off by a kill: what is there is drawn, and the title says what is not."""
    ds, full = xr.open_zarr(incomplete), xr.open_zarr(tiny)
    missing = int((ds["status"] < 0).sum())
    assert 0 < missing < 16 and not ds.attrs["complete"]
    fig = plot.plot(ds, "loss", hue="lr", col="batch_size", row="weight_decay")
    assert f"{missing} of 16 runs not run yet" in fig._suptitle.get_text()
    kept = full["loss"].where(ds["status"] >= 0)
    for ax, (wd, b) in zip(fig.axes, [(w, b) for w in (0.0, 1e-3) for b in (4, 16)], strict=True):
        for lr in (0.05, 0.2):
            v = kept.sel(weight_decay=wd, batch_size=b, lr=lr)
            check_line(ax, f"{lr:g}", v.mean("seed"), "step", v.min("seed"), v.max("seed"))


def test_default_output_name(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["plot", tiny, "rho", "--hue", "lr", "--col", "batch_size", "--row", "weight_decay"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == "tiny_rho.png"
    assert (tmp_path / "tiny_rho.png").read_bytes().startswith(PNG)


def test_report(tiny, tmp_path, capsys, monkeypatch):
    """One page: the summary `show` prints, one embedded PNG per variable with its description,
    nothing fetched from anywhere else."""
    ds = xr.open_zarr(tiny)
    assert cli.main(["show", tiny]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown == cli.show_lines(tiny, ds)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", tiny]) == 0
    assert capsys.readouterr().out.strip() == "tiny_report.html"  # here, named after the store
    page = (tmp_path / "tiny_report.html").read_text()
    for line in shown:
        assert html.escape(line) in page, line
    names = report.variables(ds)
    assert "loss" in names and "sv" in names and "status" not in names
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [n for n, _ in imgs] == names
    assert len(re.findall(r"<img ", page)) == len(names)
    for _, data in imgs:
        assert base64.b64decode(data).startswith(PNG)
    for n in names:
        assert html.escape(ds[n].attrs["description"]) in page, n
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # self-contained


def _null_draw(*a, **k):
    raise AssertionError("bad input reached drawing")


BAD = [
    (["plot", "{tiny}", "los"], "var: no variable 'los'", "loss, rank"),
    (["plot", "{tiny}", "loss", "--hue", "depth"], "--hue: no axis 'depth'", "weight_decay"),
    (["plot", "{tiny}", "loss", "--hue", "lr", "--col", "lr"], "--col: lr is already on --hue", ""),
    (["plot", "{tiny}", "loss", "--hue", "lr", "--col", "batch_size"], "weight_decay has 2", "--sel"),
    (["plot", "{tiny}", "loss", "--x", "lr", "--hue", "batch_size", "--col", "weight_decay"],
     "step has 5 records", "--at"),
    (["plot", "{tiny}", "loss", "--sel", "weight_decay=0.01"], "--sel weight_decay=0.01",
     "nearest: 0.001"),
    (["plot", "{tiny}", "loss", "--sel", "lr=0.1"], "--sel lr=0.1", "nearest: 0.05, 0.2"),
    (["plot", "{tiny}", "loss", "--sel", "lr=fast"], "--sel lr=fast", "not a number"),
    (["plot", "{tiny}", "loss", "--sel", "depth=2"], "--sel: no axis 'depth'", ""),
    (["plot", "{tiny}", "loss", "--sel", "lr"], "--sel: expected AXIS=VALUE", ""),
    (["plot", "{tiny}", "loss", "--at", "1000", "--x", "lr"], "--at: step 1000 is beyond", "0..40"),
    (["plot", "{tiny}", "loss", "--at", "soon"], "--at: expected a step or 'last'", ""),
    (["plot", "{tiny}", "rank", "--layer", "7"], "--layer: 7 is not a layer", "0..2"),
    (["plot", "{tiny}", "loss", "--layer", "0"], "--layer: loss has no layer axis", ""),
    (["plot", "{tiny}", "loss", "--out", "{tmp}/plot.jpg"], "--out:", ".png or .pdf"),
    (["plot", "{tiny}", "loss", "--out", "{tmp}/file/x.png"], "--out:", "is not a directory"),
    (["plot", "{tmp}/nothing.zarr", "loss", "--out", "{tmp}/x.png"], "store: no store", ""),
    (["report", "{tmp}/nothing.zarr", "--out", "{tmp}/x.html"], "store: no store", ""),
    (["report", "{tiny}", "--out", "{tmp}/x.txt"], "--out:", ".html"),
]  # fmt: skip


@pytest.mark.parametrize("argv,field,detail", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_arguments_exit_2(argv, field, detail, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plot, "draw", _null_draw)
    monkeypatch.setattr(report, "build", _null_draw)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file, not a directory")
    argv = [a.format(tiny=tiny, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {field}") and detail in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
