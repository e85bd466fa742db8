"""Sweeps: grids of training runs as compiled, vectorized, sharded programs, with labeled,
resumable results in Zarr. See `python -m sweeps --help` and sweeps/configs/ for examples."""

from sweeps.spec import (
    Resolved,
    SpecError,
    Sweep,
    build_specs,
    load_sweep,
    parse_overrides,
    resolve,
)
from sweeps.states import load_params, load_state, selected_runs

__all__ = [
    "Resolved",
    "SpecError",
    "Sweep",
    "build_specs",
    "load_params",
    "load_state",
    "load_sweep",
    "parse_overrides",
    "resolve",
    "selected_runs",
]
