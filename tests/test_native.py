"""The compiled singular-value kernel (dynamics.native) against a float64 reference and closed
forms, under jit, vmap and shard_map over several CPU devices, through jax.export, and the
fallback to LAPACK when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dynamics import native
from dynamics import observables as obs

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.status()['error']}"
)

RNG = np.random.default_rng(0)


def _ref(a):
    return np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)


def _check(a, atol_rel=3e-7):
    """Kernel against float64 LAPACK on the same float32 matrices: every value within
    atol_rel * s_max (a few units in the last place of the largest), in descending order."""
    got = np.asarray(native.svdvals(jnp.asarray(a)))
    ref = _ref(a)
    assert got.shape == ref.shape and got.dtype == np.float32
    scale = np.maximum(ref[..., :1], np.finfo(np.float32).tiny)
    assert np.all(np.abs(got - ref) <= atol_rel * scale), np.max(np.abs(got - ref) / scale)
    assert np.all(np.diff(got, axis=-1) <= 0)
    return got, ref


@pytest.mark.parametrize(
    "shape",
    [
        *[(64, 64), (64, 32), (32, 64), (10, 64), (64, 10), (100, 37), (1, 5), (5, 1), (3, 3)],
        *[(9, 200), (7, 131), (2, 2), (130, 128)],  # rows not whole vectors; a padded stride
    ],
)
def test_random_matrices_match_float64_lapack(shape):
    _check(RNG.standard_normal((7,) + shape).astype(np.float32))


def test_batch_dimensions_and_a_single_matrix():
    a = RNG.standard_normal((2, 3, 6, 4)).astype(np.float32)
    got, _ = _check(a)
    one = np.asarray(native.svdvals(jnp.asarray(a[1, 2])))
    np.testing.assert_array_equal(one, got[1, 2])


def test_closed_forms():
    # diagonal (signs and order do not matter), with a repeated value and an exact zero
    d = np.diag(np.array([3.0, -1.0, 2.0, 2.0, 0.0], np.float32))
    np.testing.assert_allclose(native.svdvals(d), [3.0, 2.0, 2.0, 1.0, 0.0], atol=3e-7)
    # orthogonal: every singular value 1
    q, _ = np.linalg.qr(RNG.standard_normal((48, 48)))
    np.testing.assert_allclose(native.svdvals(q.astype(np.float32)), np.ones(48), atol=1e-6)
    # Q1 diag(s) Q2^T with a graded spectrum from 1 to 1e-6: values above 1e-4 to about
    # float precision relative to themselves (the float32 rounding of the product aside)
    q1, _ = np.linalg.qr(RNG.standard_normal((64, 64)))
    q2, _ = np.linalg.qr(RNG.standard_normal((64, 64)))
    s = np.logspace(0, -6, 64)
    a = ((q1 * s) @ q2.T).astype(np.float32)
    got, ref = _check(a[None])
    big = ref[0] > 1e-4
    assert np.max(np.abs(got[0] - ref[0])[big] / ref[0][big]) < 2e-5
    # rank 5: five values, then zeros to float precision
    low = (RNG.standard_normal((64, 5)) @ RNG.standard_normal((5, 40))).astype(np.float32)
    got, ref = _check(low[None])
    assert np.all(got[0, 5:] <= 3e-7 * got[0, 0]) and np.all(got[0, :5] > 0.1 * got[0, 0])
    # the zero matrix
    np.testing.assert_array_equal(native.svdvals(jnp.zeros((2, 4, 3))), np.zeros((2, 3)))


@pytest.mark.parametrize("exponent", [-100, 100])
def test_extreme_scales_are_exact_in_relative_terms(exponent):
    # A power of two scales every entry exactly, so the kernel, which rescales by a power of two
    # itself, must give the same values times the scale, bit for bit; and they stay within a
    # few units in the last place of the float64 reference. (Scaling by 1e-30 would round every
    # entry, which moves the smallest singular values by more than float precision.)
    a = RNG.standard_normal((3, 32, 32)).astype(np.float32)
    scale = np.float32(2.0**exponent)
    got = np.asarray(native.svdvals(a * scale))
    np.testing.assert_array_equal(got, np.asarray(native.svdvals(a)) * scale)
    _check(a * scale)


def test_non_finite_matrices_give_nan_alone():
    a = RNG.standard_normal((3, 5, 4)).astype(np.float32)
    a[1, 2, 3] = np.nan
    a[2, 0, 0] = np.inf
    got = np.asarray(native.svdvals(a))
    assert np.isnan(got[1:]).all() and np.isfinite(got[0]).all()


def test_jit_vmap_and_shard_map_over_devices():
    a = jnp.asarray(RNG.standard_normal((8, 16, 12)).astype(np.float32))
    direct = np.asarray(native.svdvals(a))
    np.testing.assert_array_equal(jax.jit(jax.vmap(native.svdvals))(a), direct)
    devs = np.asarray(jax.local_devices()[:4])
    mesh = Mesh(devs, ("runs",))
    sharded = jax.jit(
        jax.shard_map(jax.vmap(native.svdvals), mesh=mesh, in_specs=P("runs"), out_specs=P("runs"))
    )
    np.testing.assert_array_equal(sharded(a), direct)
    # through the observable, whose platform switch needs the kernel's results typed like
    # autodiff's inside shard_map (varying over the mesh axis)
    spectra = jax.jit(
        jax.shard_map(
            jax.vmap(lambda w: obs.singular_values([{"w": w}], method="native")[0]),
            mesh=mesh,
            in_specs=P("runs"),
            out_specs=P("runs"),
        )
    )
    np.testing.assert_array_equal(spectra(a), direct)


def test_singular_values_methods_agree():
    params = [
        {"w": jnp.asarray(RNG.standard_normal((64, 32)), jnp.float32)},
        {"w": jnp.asarray(RNG.standard_normal((10, 64)), jnp.float32)},
    ]
    auto = obs.singular_values(params)
    nat = obs.singular_values(params, method="native")
    lap = obs.singular_values(params, method="svd")
    np.testing.assert_array_equal(auto, nat)
    np.testing.assert_allclose(nat, lap, rtol=2e-5, atol=1e-5)
    assert obs.spectrum_method_for((64, 32)) == "native"
    assert obs.spectrum_method_for((4096, 4096)) == "svd"  # LAPACK's blocked routines above


def test_export_round_trip():
    from jax import export

    f = jax.jit(jax.vmap(native.svdvals))
    a = jnp.asarray(RNG.standard_normal((4, 6, 5)).astype(np.float32))
    exp = export.export(f, disabled_checks=[export.DisabledSafetyCheck.custom_call(native.TARGET)])(
        a
    )
    again = export.deserialize(exp.serialize())
    np.testing.assert_array_equal(again.call(a), f(a))


def test_falls_back_to_lapack_when_the_kernel_cannot_be_built(tmp_path):
    code = (
        "import warnings, jax.numpy as jnp\n"
        "from dynamics import native, observables as obs\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    st = native.status()\n"
        "assert not st['available'] and 'failed' in st['error'], st\n"
        "assert any('using LAPACK' in str(x.message) for x in w)\n"
        "assert obs.spectrum_method_for((8, 8)) == 'svd'\n"
        "s = obs.singular_values([{'w': jnp.eye(3) * 2.0}])\n"
        "assert abs(float(s[0, 0]) - 2.0) < 1e-6\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CXX": "false", "DYNAMICS_NATIVE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    env = {**os.environ, "DYNAMICS_NATIVE": "0"}
    code = "from dynamics import native; s = native.status(); assert s['disabled'] and not s['available']"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_grad_pairs_against_xla_reductions():
    shapes = [(6, 5), (5,), (3, 6), (1, 1), (7, 33)]
    g = [jnp.asarray(RNG.standard_normal(s), jnp.float32) for s in shapes]
    p = [jnp.asarray(RNG.standard_normal(s), jnp.float32) for s in shapes]
    dots, sq, new = native.grad_pairs(g, p)
    np.testing.assert_allclose(
        dots,
        [np.vdot(np.asarray(a, np.float64), b) for a, b in zip(g, p, strict=True)],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(sq, [np.sum(np.asarray(a, np.float64) ** 2) for a in g], rtol=1e-5)
    for a, b in zip(new, g, strict=True):
        np.testing.assert_array_equal(a, b)
    # vmapped over runs, in a jitted scan that carries the previous gradient (aliased buffers)
    runs = 3
    gs = [jnp.asarray(RNG.standard_normal((5, runs) + s), jnp.float32) for s in shapes]

    def scan_fn(prev, g):
        d, s2, nxt = native.grad_pairs(g, prev)
        return nxt, (d, s2)

    f = jax.jit(
        jax.vmap(lambda seq: jax.lax.scan(scan_fn, [x[0] * 0 for x in seq], seq)[1], in_axes=1)
    )
    d, s2 = f(gs)  # (runs, 5, L)
    for r in range(runs):
        for t in range(5):
            for k in range(len(shapes)):
                cur = np.asarray(gs[k][t, r], np.float64)
                last = np.asarray(gs[k][t - 1, r], np.float64) if t else 0 * cur
                assert d[r, t, k] == pytest.approx(np.vdot(cur, last), rel=1e-5, abs=1e-6)
                assert s2[r, t, k] == pytest.approx(np.vdot(cur, cur), rel=1e-5)


def test_adjacent_parts_kernel_equals_xla(monkeypatch):
    params = [{"w": jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32), "b": jnp.ones((8,))}]
    params.append({"w": jnp.asarray(RNG.standard_normal((3, 8)), jnp.float32)})
    prev = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
    a = obs.adjacent_parts(prev, params)
    monkeypatch.setenv("DYNAMICS_NATIVE", "0")
    b = obs.adjacent_parts(prev, params)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    assert a[0].shape == (2,)
    jax.tree.map(np.testing.assert_array_equal, a[2], b[2])
