"""JAX's persistent compilation cache for programs built with this library.

`dynamics.enable_compilation_cache()` once at the start of a script makes every later
`jax.jit` compilation land on disk, so running the same program again (the same shapes, the
same code, the same jax version) loads it instead of compiling it: a vmapped `make_run`
program of a few seconds' compile then starts in a fraction of a second. The sweep runner
turns it on itself.
"""

from __future__ import annotations

import os


def cache_dir() -> str | None:
    """Where compiled programs are kept: $DYNAMICS_CACHE_DIR, else $XDG_CACHE_HOME/dynamics/jax
    (~/.cache/dynamics/jax); None when $DYNAMICS_NO_CACHE is set."""
    if os.environ.get("DYNAMICS_NO_CACHE"):
        return None
    return os.environ.get("DYNAMICS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dynamics", "jax"
    )


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keep every compiled program in JAX's persistent cache at `path` (default `cache_dir()`),
    whatever its compile time or size. Returns the directory used (None: caching is off,
    DYNAMICS_NO_CACHE). Safe to call more than once and after JAX has started."""
    import jax

    path = path or cache_dir()
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
