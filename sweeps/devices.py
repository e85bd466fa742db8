"""The devices and processes a sweep runs on: JAX's set-up before it starts (CPU device count,
the persistent compilation cache) and JAX's multi-process runtime (`--distributed`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sweeps.spec import SpecError


def cache_dir() -> str | None:
    from dynamics.cache import cache_dir as _dir

    return _dir()


def default_cpu_devices() -> int:
    """One CPU device per core this process may use (DYNAMICS_CPU_DEVICES overrides).

    XLA runs each small batched matmul of a vmapped run on one thread, so a single CPU device
    leaves the other cores idle; one device per core runs a chunk's shards side by side
    (measured: 2.3x on 2 cores, `make bench`).
    """
    env = os.environ.get("DYNAMICS_CPU_DEVICES")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_jax(cpu_devices: int | None = None) -> None:
    """Before JAX starts: the persistent compilation cache, and the number of CPU devices
    (default: one per core; it only affects the CPU backend)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices or default_cpu_devices()))
    except RuntimeError:  # JAX already started (e.g. the runner called from a Python session)
        if cpu_devices and cpu_devices != jax.local_device_count():
            raise SpecError(
                f"--devices: JAX has already started with {jax.local_device_count()} devices"
            ) from None
    from dynamics.cache import enable_compilation_cache

    enable_compilation_cache()


@dataclasses.dataclass
class Distributed:
    """JAX's multi-process runtime: which process this is, and its key-value store."""

    index: int = 0
    count: int = 1
    client: Any = None

    @classmethod
    def initialize(cls, coordinator=None, num_processes=None, process_id=None) -> Distributed:
        import jax

        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        from jax._src import distributed as _dist

        return cls(jax.process_index(), jax.process_count(), _dist.global_state.client)

    def put(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.key_value_set(key, value)

    def get(self, key: str, timeout_s: float = 3600) -> str:
        return self.client.blocking_key_value_get(key, int(timeout_s * 1000))

    def barrier(self, name: str, timeout_s: float = 24 * 3600) -> None:
        if self.client is not None:
            self.client.wait_at_barrier(name, int(timeout_s * 1000))
