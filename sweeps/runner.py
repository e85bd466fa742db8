"""The sweep runner: a grid of runs as a few compiled, vectorized, sharded programs.

1. Groups (`sweeps.plan`): one per static point (and per batch size when runs are bucketed by
   it); each group is one program, `jit(vmap(run))`, compiled once (`sweeps.programs`).
2. Chunks (`sweeps.plan`, `sweeps.chunks`): each group's runs are cut into equal rectangular
   blocks of the grid, sized to the device memory (`sweeps.memory`); a chunk's run axis is
   sharded over every local device (one-axis mesh), padded to a multiple of the device count,
   and its results are written into its own region (and Zarr chunks) of the store
   (`sweeps.layout`, `sweeps.store`), then marked done.
3. Resume and growth (`sweeps.execute`, `sweeps.grow`): runs marked done are skipped; new values
   of an axis add runs, a longer run continues from its kept final state. Several processes
   (`--distributed`, `sweeps.devices`) take disjoint chunks (chunk i goes to process i mod P);
   process 0 creates or grows the store and finishes it.

This module re-exports the runner's names so `from sweeps import runner; runner.execute(...)`
keeps working; the code lives in the modules named above.
"""

from __future__ import annotations

from sweeps.chunks import chunk_inputs, chunk_values, runs_per_device, slot_order
from sweeps.devices import Distributed, cache_dir, configure_jax, default_cpu_devices
from sweeps.execute import Summary, execute
from sweeps.layout import create_store, git_commit, package_versions
from sweeps.memory import (
    ACCELERATOR_CHUNK_CAP,
    CPU_RUNS_PER_DEVICE,
    activation_floats,
    estimate_run_bytes,
    memory_budget,
)
from sweeps.plan import Chunk, Group, Plan, choose_strategy, plan
from sweeps.programs import Program, prepare, program_key

__all__ = [
    "ACCELERATOR_CHUNK_CAP",
    "CPU_RUNS_PER_DEVICE",
    "Chunk",
    "Distributed",
    "Group",
    "Plan",
    "Program",
    "Summary",
    "activation_floats",
    "cache_dir",
    "choose_strategy",
    "chunk_inputs",
    "chunk_values",
    "configure_jax",
    "create_store",
    "default_cpu_devices",
    "estimate_run_bytes",
    "execute",
    "git_commit",
    "memory_budget",
    "package_versions",
    "plan",
    "prepare",
    "program_key",
    "runs_per_device",
    "slot_order",
]
