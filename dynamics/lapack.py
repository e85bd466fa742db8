"""LAPACK calls that do not deadlock when several simulated CPU devices run at once.

`one_matrix_at_a_time(fn)`: fn of one matrix (or one PRNG key, for a sampler that factorizes)
that under vmap makes one batched call, except on several CPU devices, where it loops over the
batch (see `serialize`). Used by the spectra of `dynamics.observables` and the orthogonal init
of `dynamics.models`.
"""

from __future__ import annotations

import jax


def serialize() -> bool:
    """Whether batched LAPACK calls must be split into one call per matrix.

    XLA's CPU LAPACK kernels spread a batch over the intra-op thread pool and block until it is
    done. When several CPU devices execute at once (simulated devices), every pool thread can
    end up blocked that way and the program deadlocks; one call per matrix never waits on the
    pool. Decided when a program is traced.
    """
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def one_matrix_at_a_time(fn):
    """fn(matrix) that, under vmap on several CPU devices, loops over the batch (lax.map)
    instead of making one batched LAPACK call (see `serialize`)."""
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, x):
        (batched,) = in_batched
        if not batched:
            out = f(x)
            return out, jax.tree.map(lambda _: False, out)
        out = jax.vmap(fn)(x) if not serialize() else jax.lax.map(f, x)
        return out, jax.tree.map(lambda _: True, out)

    return f
