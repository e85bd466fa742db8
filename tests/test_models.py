"""Tests for dynamics.models: shapes of every factory, initialization statistics, the NTK
parameterization, circular convolutions against a numpy reference, weight forms (the Flax
adapters: tests/test_adapters.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import models

KEY = jax.random.key(0, impl="rbg")


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _shapes(model, x_shape):
    """(layer weight shapes, output shape) by tracing only."""
    params = jax.eval_shape(model.init, KEY)
    y = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct(x_shape, jnp.float32))
    ws = jax.eval_shape(lambda p: [models.layer_weight(q) for q in p], params)
    return [w.shape for w in ws], y.shape


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name,model,x_shape,weights,y_shape",
    [
        ("mlp", models.mlp((6, 5, 4, 3)), (2, 6), [(5, 6), (4, 5), (3, 4)], (2, 3)),
        ("mlp_flatten", models.mlp((6, 4, 3), bias=True), (2, 2, 3), [(4, 6), (3, 4)], (2, 3)),
        (
            "mlp_bn",
            models.mlp((6, 4, 3), norm="batch", affine=True),
            (5, 6),
            [(4, 6), (3, 4)],
            (5, 3),
        ),
        ("deep_linear", models.deep_linear((4, 4, 4, 2)), (3, 4), [(4, 4), (4, 4), (2, 4)], (3, 2)),
        (
            "linear_conv1d",
            models.linear_conv1d(3, kernel=5, channels=2),
            (2, 2, 16),
            [(2, 2, 5)] * 3,
            (2, 2, 16),
        ),
        (
            "linear_conv1d_zero",
            models.linear_conv1d(2, kernel=4, channels=1, padding="zero", norm="channel"),
            (2, 1, 12),
            [(1, 1, 4)] * 2,
            (2, 1, 12),
        ),
        (
            "deep_decoder_1d",
            models.deep_decoder(4, 3, in_channels=2, out_channels=1, upsample=2),
            (1, 2, 8),
            [(4, 2, 1), (4, 4, 1), (4, 4, 1), (1, 4, 1)],
            (1, 1, 64),
        ),
        (
            "deep_decoder_2d",
            models.deep_decoder(4, 2, in_channels=3, out_channels=3, kernel=3, dim=2, upsample=2),
            (1, 3, 4, 4),
            [(4, 3, 3, 3), (4, 4, 3, 3), (3, 4, 1, 1)],
            (1, 3, 16, 16),
        ),
        (
            "deep_decoder_batch",
            models.deep_decoder(3, 2, norm="batch", output="linear", padding="zero", kernel=3),
            (2, 3, 8),
            [(3, 3, 3), (3, 3, 3), (1, 3, 1)],
            (2, 1, 8),
        ),
        # cnn 1-D: zero padding keeps L=16, stride 2 halves (ceil), valid loses k-1.
        (
            "cnn1d_zero",
            models.cnn((2, 16), (4, 5), 3),
            (2, 2, 16),
            [(4, 2, 3), (5, 4, 3), (3, 80)],
            (2, 3),
        ),
        (
            "cnn1d_stride",
            models.cnn((2, 16), (4, 5), 3, stride=2),
            (2, 2, 16),
            [(4, 2, 3), (5, 4, 3), (3, 20)],
            (2, 3),
        ),
        (
            "cnn1d_valid",
            models.cnn((2, 16), (4, 5), 3, padding="valid"),
            (2, 2, 16),
            [(4, 2, 3), (5, 4, 3), (3, 60)],
            (2, 3),
        ),
        (
            "cnn1d_circular_stride",
            models.cnn((1, 15), (3,), 2, kernel=5, stride=2, padding="circular"),
            (2, 1, 15),
            [(3, 1, 5), (2, 24)],
            (2, 2),
        ),
        (
            "cnn2d",
            models.cnn((1, 8, 8), (4, 6), 10, stride=2, norm="batch"),
            (3, 1, 8, 8),
            [(4, 1, 3, 3), (6, 4, 3, 3), (10, 24)],
            (3, 10),
        ),
        (
            "cnn2d_valid_pool",
            models.cnn((3, 8, 8), (4, 6), 10, padding="valid", pool="avg", norm="channel"),
            (3, 3, 8, 8),
            [(4, 3, 3, 3), (6, 4, 3, 3), (10, 6)],
            (3, 10),
        ),
        (
            "cnn2d_flat_input",
            models.cnn((1, 6, 6), (2,), 4, padding="circular", bias=True),
            (2, 36),
            [(2, 1, 3, 3), (4, 72)],
            (2, 4),
        ),
        (
            "resnet_one_neuron",
            models.resnet_one_neuron(5, 3, 2),
            (4, 5),
            [(1, 5), (1, 5), (1, 5), (2, 5)],
            (4, 2),
        ),
    ],
)
def test_factory_shapes(name, model, x_shape, weights, y_shape):
    ws, y = _shapes(model, x_shape)
    assert ws == weights, name
    assert y == y_shape, name
    flat = jax.eval_shape(models.layer_weights, jax.eval_shape(model.init, KEY))
    assert [w.shape for w in flat] == [(w[0], math.prod(w[1:])) for w in weights]


def test_resnet_one_neuron_blocks():
    model = models.resnet_one_neuron(4, 2, 3)
    params = model.init(KEY)
    assert params[0]["w2"].shape == (4, 1) and params[0]["b"].shape == (1,)
    params[0]["b"] = jnp.array([0.7])  # biases start at zero: make them matter
    params[1]["b"] = jnp.array([-0.3])
    x = _x((5, 4), 1)
    h = np.asarray(x, np.float64)
    for p in params[:-1]:
        u, b, v = (np.asarray(p[k], np.float64) for k in ("w", "b", "w2"))
        h = h + np.maximum(h @ u.T + b[None, :], 0.0) @ v.T
    want = h @ np.asarray(params[-1]["w"], np.float64).T
    np.testing.assert_allclose(model.apply(params, x), want, rtol=1e-5, atol=1e-6)


def test_mlp_matches_numpy_forward():
    model = models.mlp((5, 7, 3), bias=True, activation="tanh")
    params = model.init(KEY)
    params[0]["b"] = jnp.arange(7.0) / 10
    x = _x((4, 5), 2)
    w0, w1 = (np.asarray(p["w"], np.float64) for p in params)
    h = np.tanh(np.asarray(x, np.float64) @ w0.T + np.arange(7.0)[None, :] / 10)
    y, feats = model.apply_features(params, x)
    np.testing.assert_allclose(feats, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, h @ w1.T, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- initialization


@pytest.mark.parametrize(
    "init,activation,gain", [("gaussian", "relu", 2**0.5), ("uniform", "linear", 1)]
)
def test_init_variance(init, activation, gain):
    # two layers: fan_in 400 and 300; entries of variance gain^2 / fan_in
    params = jax.jit(models.mlp((400, 300, 200), init=init, activation=activation).init)(KEY)
    for p, fan_in in zip(params, (400, 300), strict=True):
        w = np.asarray(p["w"], np.float64)
        assert abs(w.mean()) < 3e-3 * gain
        assert w.var() == pytest.approx(gain**2 / fan_in, rel=0.03)
        if init == "uniform":
            a = gain * math.sqrt(3.0 / fan_in)
            assert 0.99 * a < np.abs(w).max() <= a


def test_init_variance_conv_and_explicit_gain():
    # conv fan_in = in * k * k: 8 * 3 * 3 = 72
    w = models.cnn((8, 6, 6), (200,), 2, init="gaussian", gain=0.5).init(KEY)[0]["w"]
    assert w.shape == (200, 8, 3, 3)
    assert float(jnp.var(w)) == pytest.approx(0.25 / 72, rel=0.03)


@pytest.mark.parametrize("shape", [(3, 20), (20, 3)])
def test_orthogonal_init(shape):
    gain = 1.7
    w = models.mlp((shape[1], shape[0]), init="orthogonal", gain=gain).init(KEY)[0]["w"]
    w = np.asarray(w, np.float64)
    small = w @ w.T if shape[0] <= shape[1] else w.T @ w
    np.testing.assert_allclose(small, gain**2 * np.eye(min(shape)), atol=1e-5)


def test_orthogonal_conv_rows():
    w = models.cnn((2, 8), (4,), 2, kernel=3, init="orthogonal", gain=1.0).init(KEY)[0]["w"]
    m = np.asarray(w, np.float64).reshape(4, -1)  # (out, in * k) = (4, 6): rows orthonormal
    np.testing.assert_allclose(m @ m.T, np.eye(4), atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 2.5])
def test_frobenius_init(scale):
    for model in (
        models.mlp((6, 9, 5, 2), init="frobenius", scale=scale),
        models.cnn((1, 8), (3, 3), 2, init="frobenius", scale=scale),
    ):
        norms = [float(jnp.linalg.norm(w)) for w in models.layer_weights(model.init(KEY))]
        np.testing.assert_allclose(norms, scale, rtol=1e-5)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "frobenius"])
def test_ntk_same_function_at_init(init):
    kw = dict(init=init, bias=False)
    std = models.mlp((6, 8, 8, 3), **kw)
    ntk = models.mlp((6, 8, 8, 3), parameterization="ntk", **kw)
    ps, pn = std.init(KEY), ntk.init(KEY)
    x = _x((5, 6), 3)
    np.testing.assert_allclose(ntk.apply(pn, x), std.apply(ps, x), rtol=1e-5, atol=1e-6)
    # stored weights differ by the multiplier gain / sqrt(fan_in), gain = sqrt 2 after ReLU
    c = math.sqrt(2.0) / math.sqrt(6)
    np.testing.assert_allclose(pn[0]["w"] * c, ps[0]["w"], rtol=1e-5, atol=1e-7)
    if init == "gaussian":  # stored NTK weights are standard normal
        assert float(jnp.std(ntk.init(KEY)[1]["w"])) == pytest.approx(1.0, rel=0.25)


def test_ntk_conv_same_function_at_init():
    std = models.cnn((2, 10), (4,), 3, stride=2)
    ntk = models.cnn((2, 10), (4,), 3, stride=2, parameterization="ntk")
    x = _x((3, 2, 10), 4)
    np.testing.assert_allclose(
        ntk.apply(ntk.init(KEY), x), std.apply(std.init(KEY), x), rtol=1e-5, atol=1e-6
    )


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="init"):
        models.mlp((2, 2), init="xavier")
    with pytest.raises(ValueError, match="norm"):
        models.mlp((2, 2), norm="layer")
    with pytest.raises(ValueError, match="parameterization"):
        models.mlp((2, 2), parameterization="mup")
    with pytest.raises(ValueError, match="in_shape"):
        models.cnn((2,), (3,), 2)


# --------------------------------------------------------------------------- convolutions


def _circular_conv_np(x, w):
    """y[b, o, n] = sum_{i, j} w[o, i, j] x[b, i, (n + j - (k-1)//2) mod L] (cross-correlation)."""
    B, _, L = x.shape
    O, _, K = w.shape
    y = np.zeros((B, O, L))
    for n in range(L):
        for j in range(K):
            y[:, :, n] += x[:, :, (n + j - (K - 1) // 2) % L] @ w[:, :, j].T
    return y


@pytest.mark.parametrize("kernel", [4, 5])
def test_linear_conv1d_matches_numpy(kernel):
    model = models.linear_conv1d(2, kernel=kernel, channels=2)
    params = model.init(KEY)
    x = _x((3, 2, 11), 5).astype(np.float64)
    w0, w1 = (np.asarray(p["w"], np.float64) for p in params)
    want = _circular_conv_np(_circular_conv_np(x, w0), w1)
    np.testing.assert_allclose(
        model.apply(params, jnp.asarray(x, jnp.float32)), want, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("norm", [None, "channel"])
def test_circular_padding_translation_equivariant(norm):
    model = models.linear_conv1d(3, kernel=5, channels=2, norm=norm)
    params = model.init(KEY)
    x = _x((2, 2, 16), 6)
    y = model.apply(params, x)
    for shift in (1, 3, 7):
        np.testing.assert_allclose(
            model.apply(params, jnp.roll(x, shift, axis=-1)),
            jnp.roll(y, shift, axis=-1),
            rtol=1e-5,
            atol=1e-5,
        )
    # zero padding is not equivariant at the boundary
    zero = models.linear_conv1d(3, kernel=5, channels=2, padding="zero")
    yz = zero.apply(params, x)
    assert not np.allclose(zero.apply(params, jnp.roll(x, 3, axis=-1)), jnp.roll(yz, 3, axis=-1))


# --------------------------------------------------------------------------- weight forms


def test_layer_weight_forms():
    v = jnp.asarray(_x((3, 4, 2)))
    g = jnp.array([0.5, 2.0, -1.0])
    w = models.layer_weight({"v": v, "g": g})
    vn = np.asarray(v, np.float64)
    want = (
        np.asarray(g)[:, None, None] * vn / np.linalg.norm(vn.reshape(3, -1), axis=1)[:, None, None]
    )
    np.testing.assert_allclose(w, want, rtol=1e-5)
    np.testing.assert_allclose(models.layer_weight({"v": v, "rho": 2.5}), 2.5 * vn, rtol=1e-6)
    np.testing.assert_array_equal(models.layer_weight({"w": v, "b": g}), v)
    np.testing.assert_array_equal(models.layer_weight({"kernel": v}), jnp.moveaxis(v, -1, 0))
    with pytest.raises(KeyError):
        models.layer_weight({"b": g})


@pytest.mark.parametrize("weight_param", ["weight", "lagrange"])
def test_weight_param_same_function(weight_param):
    plain = models.mlp((5, 6, 2))
    other = models.mlp((5, 6, 2), weight_param=weight_param)
    pp, po = plain.init(KEY), other.init(KEY)
    for a, b in zip(models.layer_weights(pp), models.layer_weights(po), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    if weight_param == "lagrange":
        for p in po:
            assert float(jnp.linalg.norm(p["v"])) == pytest.approx(1.0, abs=1e-6)
    x = _x((3, 5), 7)
    np.testing.assert_allclose(other.apply(po, x), plain.apply(pp, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_param", ["plain", "weight", "lagrange"])
def test_scale_weights(weight_param):
    model = models.mlp((4, 5, 3), weight_param=weight_param)
    params = model.init(KEY)
    scaled = models.scale_weights(params, -1.5)
    for a, b in zip(models.layer_weights(params), models.layer_weights(scaled), strict=True):
        np.testing.assert_allclose(b, -1.5 * a, rtol=1e-5, atol=1e-7)


def test_orthogonal_init_is_jaxs_and_vmaps_to_the_same_draws():
    """The orthogonal sampler is jax's (`jax.nn.initializers.orthogonal`) key by key, and a vmap
    over keys gives each key's own draw (one QR per key on several CPU devices, a batched one
    elsewhere: `dynamics.lapack`)."""
    sample = models._orthogonal((16, 12))
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(sample)(keys)
    for i, k in enumerate(keys):
        ref = jax.nn.initializers.orthogonal()(k, (16, 12))
        np.testing.assert_allclose(sample(k), ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(batched[i], ref, rtol=1e-5, atol=1e-6)
    model = models.mlp((12, 16, 4), init="orthogonal", gain=1.0)
    params = jax.vmap(model.init)(keys)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(params[1]["w"][i], model.init(k)[1]["w"], rtol=1e-5, atol=1e-6)


_HANG_SCRIPT = """
from sweeps import runner
runner.configure_jax(2)
import jax
import dynamics as dyn
from sweeps import Sweep
from sweeps.spec import build_specs, resolve

def build(width):
    return dyn.RunSpec(model=dyn.mlp((64, width, width, 10), init="orthogonal"),
                       data=dyn.data.digits(seed=0, normalize="standard"), loss="cross_entropy",
                       steps=4, record_every=2, batch=32, observables=("loss",))

sweep = Sweep(name="orth", description="orthogonal init on several devices", build=build,
              settings=dict(width=128), grid=dict(seed=list(range(8)), lr=[0.1]), static={})
res = resolve(sweep, [])
runner.execute(res, build_specs(res), OUT, progress=False)
print("devices", jax.local_device_count())
"""


def test_orthogonal_init_does_not_hang_a_sweep_on_several_cpu_devices(tmp_path):
    """8 seeds of 128 x 128 orthogonal layers on two simulated CPU devices: a batched QR there
    deadlocked the program (the runner never returned); in a subprocess with a time limit."""
    import subprocess
    import sys

    script = _HANG_SCRIPT.replace("OUT", repr(str(tmp_path / "orth.zarr")))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "devices 2" in r.stdout
