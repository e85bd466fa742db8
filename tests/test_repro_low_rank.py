"""P1 (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794): SGD with weight decay lowers the rank
of the weight matrices of a BN-MLP, more so for smaller batches, larger learning rates and
larger weight decay; without weight decay the rank stays near full; with weight decay "dist"
plateaus, without it decays.

Runs the `low_rank` sweep (the figure's code path) on a reduced grid: digits, BN-MLP 4x64,
B in {4, 32}, lr in {0.1, 0.5}, wd in {0, 1e-3, 5e-3}, 2 seeds, 3200 steps. Ranks are counted
by figures.low_rank.rank_at (mean over the hidden 64x64 matrices). Thresholds sit well inside
the margins measured on the full sweep (3 seeds), quoted next to each assertion.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from figures.low_rank import at_equal_epochs, epochs_cut, rank_at
from sweeps import runner
from sweeps.spec import build_specs, load_sweep, resolve

OVERRIDES = [
    ("seed", "0,1"),
    ("lr", "0.1,0.5"),
    ("batch_size", "4,32"),
    ("weight_decay", "0,1e-3,5e-3"),
    ("steps", "3200"),
    ("record_every", "400"),
    ("batch_strategy", "mask"),  # one program: a masked batch of 4 is exactly a batch of 4
]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    res = resolve(load_sweep("low_rank"), OVERRIDES)
    out = str(tmp_path_factory.mktemp("low_rank") / "low_rank.zarr")
    runner.execute(res, build_specs(res), out, progress=False)
    d = xr.open_zarr(out).load()
    assert int((d["status"] == 0).sum()) == d["status"].size  # nothing diverged
    return d


def mean_rank(ds, tol, **sel):
    return float(rank_at(ds, tol).sel(**sel).mean("seed"))


def test_no_weight_decay_keeps_full_rank(ds):
    # full sweep: 63.0-64.0 of 64 at tol 1e-3 for every lr, B and record
    r = rank_at(ds, 1e-3).sel(weight_decay=0.0)
    assert float(r.min()) >= 60.0, float(r.min())
    init = float(r.isel(step=0).mean())
    assert abs(float(r.isel(step=-1).mean()) - init) < 1.5


def test_rank_falls_as_batch_size_decreases(ds):
    _, at = epochs_cut(ds)
    assert at == {4: 3200, 32: 400}
    r = at_equal_epochs(rank_at(ds, 0.04), at).mean("seed")

    def gap(wd, lr):  # rank of B=32 minus rank of B=4, at equal epochs
        x = r.sel(weight_decay=wd, lr=lr)
        return float(x.sel(batch_size=32) - x.sel(batch_size=4))

    # equal epochs (the authors' protocol), tol 0.04. Full sweep, lr 0.1: B=4 39.1, B=32 50.6
    # with wd 5e-3; 47.7 vs 50.4 with wd 0. lr 0.5: 19.0 vs 48.1 with wd 5e-3.
    assert gap(5e-3, 0.1) > 6.0
    assert gap(5e-3, 0.1) > gap(0.0, 0.1) + 4.0  # the batch effect comes with weight decay
    assert gap(5e-3, 0.5) > 15.0
    # equal steps, lr 0.1, wd 5e-3: smaller batches lower the rank faster per step too
    # (full sweep after 3200 steps: B=4 39.1, B=32 47.7)
    end = dict(lr=0.1, weight_decay=5e-3, step=3200)
    assert mean_rank(ds, 0.04, batch_size=4, **end) < mean_rank(ds, 0.04, batch_size=32, **end) - 4


def test_rank_falls_as_weight_decay_and_lr_increase(ds):
    # B=32, lr 0.5, tol 0.04, after 3200 steps. Full sweep: 49.4 (wd 0), 40.6 (1e-3), 20.4 (5e-3)
    end = dict(batch_size=32, step=3200)
    by_wd = [mean_rank(ds, 0.04, lr=0.5, weight_decay=wd, **end) for wd in (0.0, 1e-3, 5e-3)]
    assert by_wd[0] - by_wd[1] > 3.0 and by_wd[1] - by_wd[2] > 8.0, by_wd
    # larger lr: full sweep, wd 5e-3: 47.7 (lr 0.1) vs 20.4 (lr 0.5); wd 0: 50.4 vs 49.4
    hi, lo = (mean_rank(ds, 0.04, lr=lr, weight_decay=5e-3, **end) for lr in (0.5, 0.1))
    assert hi < lo - 10.0, (hi, lo)


def test_dist_plateaus_only_with_weight_decay(ds):
    dist = ds["update_size"].mean("layer").sel(batch_size=32).mean("seed")
    for lr in (0.1, 0.5):
        d0 = dist.sel(lr=lr, weight_decay=0.0).values[1:]  # records at steps 400, ..., 3200
        d5 = dist.sel(lr=lr, weight_decay=5e-3).values[1:]
        # full sweep, B=32: wd 0 falls from 0.57 (lr 0.5) / 0.75 (lr 0.1) to 0.06 / 0.09 ...
        assert d0[-1] < 0.3 * d0[0], d0
        # ... while wd 5e-3 holds at 0.45 / 0.3-0.4
        assert d5[-1] > 3.0 * d0[-1], (d5, d0)
        assert d5[-1] > 0.6 * d5[len(d5) // 2], d5
        assert np.all(np.isfinite(d5)) and np.all(d5 > 0)
