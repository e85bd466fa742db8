"""The compiled MLP gradient (dynamics.native.dense_loss_fn): against autodiff of the same loss,
bit-exact under masking and vectorization, and where it is used (RunSpec.gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import dynamics as dyn
from dynamics import native
from dynamics.steps import Batch, Hparams
from dynamics.train import GRADIENTS, dense_gradient, make_loss_fn, make_run, train_loss_fn

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.status()['error']}"
)

RNG = np.random.default_rng(0)


def _case(widths, activation="relu", bias=False, parameterization="standard", B=8, floats=False):
    model = dyn.mlp(widths, activation=activation, bias=bias, parameterization=parameterization)
    params = model.init(jax.random.key(1))
    if bias:  # nonzero biases, so their gradients and their place in the sum are exercised
        params = [
            dict(p, b=jnp.asarray(RNG.standard_normal(p["b"].shape), jnp.float32)) for p in params
        ]
    x = jnp.asarray(RNG.standard_normal((B, widths[0])), jnp.float32)
    if floats:
        y = jnp.asarray(RNG.standard_normal((B, widths[-1])), jnp.float32)
    else:
        y = jnp.asarray(RNG.integers(0, widths[-1], B), jnp.int32)
    return model, params, x, y


def _grads(f, params, batch):
    return jax.jit(jax.value_and_grad(f))(params, batch)


def _assert_close(got, ref, rtol):
    (gl, gg), (rl, rg) = got, ref
    np.testing.assert_allclose(gl, rl, rtol=rtol, atol=1e-7)
    assert jax.tree.structure(gg) == jax.tree.structure(rg)
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(rg), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-30
        assert float(jnp.max(jnp.abs(a - b))) <= rtol * scale


CASES = [
    # widths, activation, bias, parameterization, loss, batch, float targets
    ((32, 64, 64, 64, 10), "relu", False, "standard", "square", 8, False),
    ((32, 64, 64, 64, 10), "relu", False, "standard", "cross_entropy", 128, False),
    ((3, 17, 10, 4), "tanh", True, "ntk", "square", 5, True),
    ((3, 17, 10, 4), "tanh", False, "standard", "cross_entropy", 13, False),
    ((12, 9, 1), "relu", True, "standard", "square", 37, True),
    ((20, 24, 24, 3), "linear", False, "ntk", "square", 16, False),
    ((20, 24, 24, 3), "linear", True, "standard", "cross_entropy", 9, False),
    ((64, 40, 10), "relu", True, "ntk", "cross_entropy", 64, False),
]


@pytest.mark.parametrize("widths,activation,bias,par,loss,B,floats", CASES)
def test_loss_and_gradient_match_autodiff(widths, activation, bias, par, loss, B, floats):
    model, params, x, y = _case(widths, activation, bias, par, B, floats)
    w = np.full(B, 1.0 / max(1, B - 2), np.float32)
    w[[0, -1]] = 0.0  # padding at both ends
    batch = Batch(x, y, jnp.asarray(w))
    fused = native.dense_loss_fn(model, loss)
    assert fused is not None
    ref = _grads(make_loss_fn(model, loss), params, batch)
    _assert_close(_grads(fused, params, batch), ref, rtol=2e-6)
    # without differentiation it is the plain loss; a cotangent scales the gradient
    np.testing.assert_array_equal(fused(params, batch), make_loss_fn(model, loss)(params, batch))
    g3 = jax.grad(lambda p: 3.0 * fused(p, batch))(params)
    g1 = jax.grad(fused)(params, batch)
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1), strict=True):
        np.testing.assert_array_equal(a, 3.0 * b)


def test_masked_batch_is_bit_identical_to_the_smaller_batch():
    """Weights on the first b of B examples give exactly the loss and gradient of those b
    examples alone, and a zero-weight example anywhere adds exactly nothing."""
    model, params, x, y = _case((10, 32, 32, 5), "relu", True, B=24)
    f = jax.jit(jax.value_and_grad(native.dense_loss_fn(model, "cross_entropy")))
    b = 11
    small = f(params, Batch(x[:b], y[:b], jnp.full((b,), 1.0 / b, jnp.float32)))
    w = jnp.where(jnp.arange(24) < b, 1.0 / b, 0.0).astype(jnp.float32)
    masked = f(params, Batch(x, y, w))
    for a, c in zip(jax.tree.leaves(masked), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(a, c)
    # a zero-weight example in the middle, against the batch without it
    keep = np.r_[0:4, 5:12]
    w2 = np.zeros(12, np.float32)
    w2[keep] = 1.0 / len(keep)
    with_hole = f(params, Batch(x[:12], y[:12], jnp.asarray(w2)))
    w3 = jnp.full((len(keep),), 1.0 / len(keep), jnp.float32)
    without = f(params, Batch(x[keep], y[keep], w3))
    for a, c in zip(jax.tree.leaves(with_hole), jax.tree.leaves(without), strict=True):
        np.testing.assert_array_equal(a, c)


def test_runs_are_computed_alone_under_vmap_and_shard_map():
    """A run's numbers do not depend on the other runs of the call: vmapped over 8 runs,
    sharded over 4 devices and one run at a time give the same bits."""
    model, _, x, y = _case((16, 32, 32, 4), "relu", False, B=16)
    keys = jax.random.split(jax.random.key(3), 8)
    params = jax.vmap(model.init)(keys)
    xs = jnp.stack([x + i for i in range(8)])
    ys = jnp.stack([y] * 8)
    ws = jnp.full((8, 16), 1.0 / 16, jnp.float32)
    vg = jax.value_and_grad(native.dense_loss_fn(model, "square"))

    def one(p, x, y, w):
        return vg(p, Batch(x, y, w))

    vmapped = jax.jit(jax.vmap(one))(params, xs, ys, ws)
    mesh = Mesh(np.asarray(jax.local_devices()[:4]), ("runs",))
    sharded = jax.jit(
        jax.shard_map(jax.vmap(one), mesh=mesh, in_specs=P("runs"), out_specs=P("runs"))
    )(params, xs, ys, ws)
    for i in range(8):
        alone = jax.jit(one)(jax.tree.map(lambda a, i=i: a[i], params), xs[i], ys[i], ws[i])
        for a, b, c in zip(
            jax.tree.leaves(alone), jax.tree.leaves(vmapped), jax.tree.leaves(sharded), strict=True
        ):
            np.testing.assert_array_equal(a, b[i])
            np.testing.assert_array_equal(a, c[i])


def test_non_finite_weights_give_a_non_finite_loss():
    """A NaN anywhere in the network reaches the loss (the run is then marked diverged): ReLU
    keeps a NaN, as XLA's max does."""
    model, params, x, y = _case((8, 16, 16, 3), "relu", B=8)
    params[0]["w"] = params[0]["w"].at[2, 3].set(jnp.nan)
    batch = Batch(x, y, jnp.full((8,), 1.0 / 8, jnp.float32))
    loss, _ = jax.value_and_grad(native.dense_loss_fn(model, "square"))(params, batch)
    assert not np.isfinite(float(loss))


def test_which_models_and_losses_use_it():
    assert native.dense_eligible(dyn.mlp((4, 8, 2)), "square")
    assert native.dense_eligible(dyn.mlp((4, 8, 2), activation="tanh", bias=True), "cross_entropy")
    assert native.dense_eligible(dyn.mlp((4, 8, 2)), dyn.losses.square_loss)
    assert not native.dense_eligible(dyn.mlp((4, 8, 2), norm="batch"), "square")
    assert not native.dense_eligible(dyn.mlp((4, 8, 2), activation="gelu"), "square")
    assert not native.dense_eligible(dyn.mlp((4, 8, 2), weight_param="weight"), "square")
    assert not native.dense_eligible(dyn.mlp((4, 8, 2)), lambda p, t, w=None: jnp.sum(p))
    assert not native.dense_eligible(dyn.cnn((1, 8, 8), (4,), 2), "square")
    assert native.dense_loss_fn(dyn.mlp((4, 8, 2), norm="batch"), "square") is None


def _spec(**kw):
    data = dyn.data.gaussian_mixture(seed=0, n_train=64, n_test=0, d=8, num_classes=3)
    base = dict(
        model=dyn.mlp((8, 16, 16, 3)),
        data=data,
        loss="cross_entropy",
        steps=20,
        record_every=5,
        observables=("loss", "grad_norm", "grad_corr"),
        batch=8,
    )
    return dyn.RunSpec(**{**base, **kw})


def test_runs_with_the_kernel_follow_autodiff():
    """make_run with the kernel (gradient "auto") and with autodiff: the same trajectory to float
    rounding over 20 steps; the kernel is what "auto" trains with."""
    hp = Hparams(lr=0.1, weight_decay=1e-3)
    auto = jax.jit(make_run(_spec()))(hp, jax.random.key(0))
    ref = jax.jit(make_run(_spec(gradient="autodiff")))(hp, jax.random.key(0))
    for name in ("loss", "grad_norm", "grad_cos"):
        np.testing.assert_allclose(auto[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
    jaxpr = str(
        jax.make_jaxpr(jax.grad(train_loss_fn(_spec())))(
            _spec().model.init(jax.random.key(0)),
            Batch(jnp.zeros((8, 8)), jnp.zeros((8,), jnp.int32), jnp.full((8,), 0.125)),
        )
    )
    assert native.DENSE_GRAD in jaxpr
    jaxpr = str(
        jax.make_jaxpr(jax.grad(train_loss_fn(_spec(gradient="autodiff"))))(
            _spec().model.init(jax.random.key(0)),
            Batch(jnp.zeros((8, 8)), jnp.zeros((8,), jnp.int32), jnp.full((8,), 0.125)),
        )
    )
    assert native.DENSE_GRAD not in jaxpr


def test_gradient_setting_is_checked():
    with pytest.raises(ValueError, match="gradient"):
        make_run(_spec(gradient="fast"))
    for gradient in GRADIENTS:
        _spec(gradient=gradient).validate()
    # the model describes itself whatever its activation; the kernel takes only those it knows
    assert dyn.mlp((4, 8, 2), activation="gelu").dense.activation == "gelu"
    assert dense_gradient(_spec()) and not dense_gradient(_spec(gradient="autodiff"))
    assert not dense_gradient(_spec(model=dyn.mlp((8, 16, 16, 3), activation="gelu")))


def test_labels_outside_the_classes_are_all_zero_targets():
    """Integer labels are one-hot encoded in the kernel, a label outside [0, C) as no class at
    all, as jax.nn.one_hot does for autodiff's loss."""
    model, params, x, _ = _case((6, 12, 4), "tanh", B=6)
    y = jnp.asarray([0, 3, -1, 4, 2, 9], jnp.int32)
    batch = Batch(x, y, jnp.full((6,), 1.0 / 6, jnp.float32))
    for loss in ("square", "cross_entropy"):
        ref = _grads(make_loss_fn(model, loss), params, batch)
        _assert_close(_grads(native.dense_loss_fn(model, loss), params, batch), ref, rtol=2e-6)
