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

__all__ = [
    "Resolved",
    "SpecError",
    "Sweep",
    "build_specs",
    "load_sweep",
    "parse_overrides",
    "resolve",
]
