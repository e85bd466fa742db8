"""The compiled Threefry-2x32 hash (dynamics.native.compiled_random): every jax.random draw
lowered in the context gives the numbers of JAX's own lowering (integer draws bit for bit), under jit, vmap, shard_map and
jax.export, holds the kernel's call where the kernels are available, and leaves programs
lowered outside the context alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dynamics import native

needs_kernel = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.status()['error']}"
)


def _draws(key):
    """One of each kind of draw the library makes: splits, fold_in, bits, uniform, normal,
    integers, a permutation and a Bernoulli mask, of several shapes (scalar and empty too)."""
    a, b = jax.random.split(key)
    return {
        "split": jax.random.key_data(jax.random.split(a, 7)),
        "fold_in": jax.random.key_data(jax.random.fold_in(b, 3)),
        "bits": jax.random.bits(a, (5, 3)),
        "uniform": jax.random.uniform(b, (4, 1, 15), minval=-0.25, maxval=0.25),
        "scalar": jax.random.normal(a, ()),
        "empty": jax.random.normal(a, (0, 3)),
        "normal": jax.random.normal(b, (33,)),
        "randint": jax.random.randint(a, (17,), 0, 1000),
        "permutation": jax.random.permutation(b, 64),
        "bernoulli": jax.random.bernoulli(a, 0.3, (9, 2)),
    }


def _both(fn, *args):
    """(the lowered text and values of `fn` lowered outside the context, the same inside it),
    from two fresh jitted functions (JAX caches a function's lowering)."""
    out = []
    for on in (False, True):
        f = jax.jit(lambda *a: fn(*a))  # noqa: PLW0108 - a new function, a new lowering
        with native.compiled_random(on):
            lowered = f.lower(*args)
        out.append((lowered.as_text(), jax.tree.map(np.asarray, lowered.compile()(*args))))
    return out


def _equal(a, b):
    """Integer and boolean draws (the hash's bits, splits, indices) bit for bit; float draws
    to a few units in the last place: their conversion from the bits is compiled into other
    fusions around the kernel's call, whose rounding may differ between CPUs' vector units."""

    def check(x, y):
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(x, y)

    jax.tree.map(check, a, b)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_draws_equal_jax_lowering(make_key):
    (plain_text, plain), (text, got) = _both(_draws, make_key(2026))
    _equal(got, plain)
    assert native.THREEFRY not in plain_text
    assert (native.THREEFRY in text) == native.available()


def test_vmapped_draws_equal_jax_lowering():
    keys = jax.random.split(jax.random.key(1), 6)
    (_, plain), (text, got) = _both(jax.vmap(_draws), keys)
    _equal(got, plain)
    assert (native.THREEFRY in text) == native.available()
    # and the eager draws of each key, one at a time
    for i in range(6):
        _equal(jax.tree.map(lambda v, i=i: v[i], got), jax.tree.map(np.asarray, _draws(keys[i])))


@needs_kernel
def test_under_shard_map_and_export():
    devs = jax.local_devices()
    mesh = Mesh(np.asarray(devs), ("runs",))
    keys = jax.device_put(
        jax.random.split(jax.random.key(5), 4 * len(devs)), NamedSharding(mesh, P("runs"))
    )
    f = jax.jit(
        jax.shard_map(
            jax.vmap(lambda k: jax.random.normal(k, (3, 5))),
            mesh=mesh,
            in_specs=P("runs"),
            out_specs=P("runs"),
            check_vma=False,
        )
    )
    with native.compiled_random():
        exp = export.export(
            f, disabled_checks=[export.DisabledSafetyCheck.custom_call(native.THREEFRY)]
        )(keys)
    assert native.THREEFRY in exp.mlir_module()
    back = export.deserialize(exp.serialize())
    want = jax.vmap(lambda k: jax.random.normal(k, (3, 5)))(keys)
    _equal(np.asarray(jax.jit(back.call)(keys)), np.asarray(want))


def test_context_is_per_thread_and_restored():
    from concurrent.futures import ThreadPoolExecutor

    def lowered_text():
        return jax.jit(lambda k: jax.random.bits(k, (4,))).lower(jax.random.key(0)).as_text()

    with native.compiled_random():
        inside = lowered_text()
        with ThreadPoolExecutor(1) as pool:  # a new thread starts outside the context
            other = pool.submit(lowered_text).result()
    after = lowered_text()
    assert (native.THREEFRY in inside) == native.available()
    assert native.THREEFRY not in other
    assert native.THREEFRY not in after


@needs_kernel
def test_runner_program_uses_the_kernel(tmp_path, monkeypatch):
    """A sweep's program is lowered in the context: its export holds the kernel's call."""
    import glob

    from sweeps import runner
    from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

    monkeypatch.setenv("DYNAMICS_CACHE_DIR", str(tmp_path / "cache"))
    res = resolve(
        load_sweep("reference"), parse_overrides(["seed=0", "lr=0.01", "steps=4", "record_every=2"])
    )
    runner.execute(res, build_specs(res), str(tmp_path / "s.zarr"), progress=False)
    files = glob.glob(str(tmp_path / "cache" / "exports" / "*"))
    assert files
    exp = export.deserialize(bytearray(open(files[0], "rb").read()))
    assert native.THREEFRY in exp.mlir_module()


def test_kernel_matches_the_reference_vectors():
    """Threefry-2x32 with 20 rounds against the known-answer vectors of Salmon et al.'s
    Random123 (kat_vectors: threefry2x32_20), through the primitive both lowerings compute."""
    from jax._src.random import threefry2x32 as tf

    cases = [
        ((0x0, 0x0), (0x0, 0x0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for on in (False, True):
        for key, count, want in cases:

            def f(k1, k2, c1, c2):
                return tf.threefry2x32_p.bind(k1, k2, c1, c2)

            args = [jnp.asarray([v], jnp.uint32) for v in (*key, *count)]
            with native.compiled_random(on):
                got = jax.jit(f).lower(*args).compile()(*args)
            assert tuple(int(g[0]) for g in got) == want
