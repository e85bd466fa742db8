"""Tests for dynamics.adapters: users' flax.linen and flax.nnx modules as Models.

One params entry per weight layer in the order the input meets it (nested modules flattened),
weightless layers carried and trained, batch norm's running statistics as masked model state,
dropout with a key per step, init_scale on every kernel, vmapped runs equal single runs. The
references are the users' modules applied by hand and numpy."""

from __future__ import annotations

import functools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import from_flax, from_nnx, losses, models, steps
from dynamics import observables as obs
from dynamics.steps import Batch, Hparams
from dynamics.train import RunSpec, make_loss_fn, make_run

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

KEY = jax.random.key(0, impl="rbg")  # compiles faster than threefry
DATA = dyn.data.digits(seed=0, normalize="standard", n_train=256)
X = jnp.asarray(DATA.x_train)
Y = jnp.asarray(DATA.y_train)


def _x(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _rel(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(jnp.sum(y**2)) for y in lb)
    return (num / den) ** 0.5


def _np_sv(kernels):
    """Singular values of each flax kernel (..., in, out), NaN-padded as the observable's."""
    pad = max(min(int(np.prod(k.shape[:-1])), k.shape[-1]) for k in kernels)
    rows = []
    for k in kernels:
        s = np.linalg.svd(np.asarray(k, np.float64).reshape(-1, k.shape[-1]), compute_uv=False)
        rows.append(np.pad(s, (0, pad - s.size), constant_values=np.nan))
    return np.stack(rows)


def _hps(**fields):
    """Hparams of a batch of runs: each field a list (one value per run)."""
    n = len(next(iter(fields.values())))
    base = {f: [getattr(Hparams(), f)] * n for f in Hparams._fields}
    base.update(fields)
    return Hparams(**{f: jnp.asarray(v, jnp.float32) for f, v in base.items()})


def _one(hp, i):
    return jax.tree.map(lambda a: a[i], hp)


# --------------------------------------------------------------------------- moved from models


def test_from_flax():
    class Net(nn.Module):
        def setup(self):
            # names that sort differently from the creation order; flax is channel-last
            self.z_conv = nn.Conv(4, (3,), padding="VALID")
            self.m_hidden = nn.Dense(5)
            self.a_out = nn.Dense(3)

        def features(self, x):
            h = nn.relu(self.z_conv(x))
            return nn.relu(self.m_hidden(h.reshape(h.shape[0], -1)))

        def __call__(self, x):
            return self.a_out(self.features(x))

    module = Net()
    x = _x((2, 6, 2), 8)  # (batch, length, channels)
    model = from_flax(module, x, features_method="features")
    params = model.init(KEY)
    assert isinstance(params, list) and len(params) == 3
    ref = module.init(KEY, x)["params"]
    for p, name in zip(params, ["z_conv", "m_hidden", "a_out"], strict=True):
        np.testing.assert_array_equal(p["kernel"], ref[name]["kernel"])
    # kernels (..., in, out) are read with the output axis first: conv (k, in, out) -> (out, k, in)
    assert models.layer_weight(params[0]).shape == (4, 3, 2)
    np.testing.assert_array_equal(
        models.layer_weight(params[0]), np.transpose(ref["z_conv"]["kernel"], (2, 0, 1))
    )
    ws = models.layer_weights(params)
    assert [w.shape for w in ws] == [(4, 6), (5, 16), (3, 5)]
    np.testing.assert_array_equal(ws[1], ref["m_hidden"]["kernel"].T)
    np.testing.assert_allclose(model.apply(params, x), module.apply({"params": ref}, x), rtol=1e-6)
    y, h = model.apply_features(params, x)
    assert h.shape == (2, 5)
    np.testing.assert_allclose(y, h @ ws[2].T + params[2]["bias"][None, :], rtol=1e-5, atol=1e-6)
    # without features_method, the features are the last weight layer's input: the same
    _, h2 = from_flax(module, x).apply_features(params, x)
    np.testing.assert_allclose(h2, h, rtol=1e-6)
    scaled = models.scale_weights(params, 2.0)
    np.testing.assert_allclose(models.layer_weights(scaled)[0], 2.0 * ws[0], rtol=1e-6)


def test_from_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.zz = nnx.Linear(6, 5, rngs=rngs)
            self.aa = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.aa(nnx.relu(self.zz(x)))

    model = from_nnx(Net)  # no example input: the order of attribute assignment
    key = jax.random.key(9, impl="rbg")
    params = model.init(key)
    assert [w.shape for w in models.layer_weights(params)] == [(5, 6), (3, 5)]
    module = Net(nnx.Rngs(key))
    np.testing.assert_array_equal(params[0]["kernel"], module.zz.kernel[...])
    # init runs under jit (as inside make_run) with the same result
    np.testing.assert_array_equal(jax.jit(model.init)(key)[1]["kernel"], module.aa.kernel[...])
    x = _x((4, 6), 10)
    np.testing.assert_allclose(model.apply(params, x), module(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), module(x), rtol=1e-5, atol=1e-6)
    # new params change the function; the adapter does not keep stale state
    other = model.init(jax.random.key(11, impl="rbg"))
    assert not np.allclose(model.apply(other, x), module(x))
    np.testing.assert_allclose(
        model.apply(other, x), Net(nnx.Rngs(jax.random.key(11, impl="rbg")))(x), rtol=1e-6
    )
    np.testing.assert_allclose(model.apply(params, x), module(x), rtol=1e-6)


# --------------------------------------------------------------------------- (a) nested layers


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(11)(x))


class _Block(nn.Module):
    """A block holding a Dense and a submodule holding another."""

    @nn.compact
    def __call__(self, x):
        return _Inner()(nn.relu(nn.Dense(12)(x)))


class _LinenNested(nn.Module):
    def setup(self):
        # defined out of the order of application, with names sorting differently again
        self.head = nn.Dense(10)
        self.layers = [nn.Dense(9), nn.Dense(8)]
        self.block = _Block()
        self.stem = nn.Dense(13)

    def __call__(self, x):
        x = self.block(nn.relu(self.stem(x)))
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x)


# the same kernels' paths in the order the input meets them
_LINEN_PATHS = [
    ("stem",),
    ("block", "Dense_0"),
    ("block", "_Inner_0", "Dense_0"),
    ("layers_0",),
    ("layers_1",),
    ("head",),
]


class _NNXBlock(nnx.Module):
    def __init__(self, d, rngs):
        self.pair = nnx.Sequential(nnx.Linear(d, 12, rngs=rngs), nnx.relu)
        self.inner = nnx.List([nnx.Linear(12, 11, rngs=rngs)])

    def __call__(self, x):
        return nnx.relu(self.inner[0](self.pair(x)))


class _NNXNested(nnx.Module):
    def __init__(self, rngs):
        self.head = nnx.Linear(8, 10, rngs=rngs)  # assigned first, applied last
        self.stem = nnx.Sequential(nnx.Linear(64, 13, rngs=rngs), nnx.relu)
        self.block = _NNXBlock(13, rngs)
        self.layers = nnx.List([nnx.Linear(11, 9, rngs=rngs), nnx.Linear(9, 8, rngs=rngs)])

    def __call__(self, x):
        x = self.block(self.stem(x))
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def _nnx_kernels(m):
    return [
        m.stem.layers[0],
        m.block.pair.layers[0],
        m.block.inner[0],
        m.layers[0],
        m.layers[1],
        m.head,
    ]


SHAPES = [(13, 64), (12, 13), (11, 12), (9, 11), (8, 9), (10, 8)]


def _check_layers(params, kernels, biases, y, y_ref):
    """One params entry per Dense, in order, equal to the module's; rho and spectra by numpy."""
    assert len(params) == 6 and all(sorted(p) == ["bias", "kernel"] for p in params)
    assert [w.shape for w in models.layer_weights(params)] == SHAPES
    for p, k, b in zip(params, kernels, biases, strict=True):
        np.testing.assert_array_equal(p["kernel"], k)
        np.testing.assert_array_equal(p["bias"], b)
    rho = np.prod([np.linalg.norm(np.asarray(k, np.float64)) for k in kernels])
    assert float(obs.rho(params)) == pytest.approx(rho, rel=1e-5)
    np.testing.assert_allclose(
        obs.singular_values(params, method="svd"), _np_sv(kernels), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_linen_nested_modules_give_one_layer_per_dense_in_order():
    module = _LinenNested()
    model = from_flax(module, X[:4])
    w = jnp.full((8,), 1 / 8)

    def ce(y):
        return losses.cross_entropy(y, Y[:8], w)

    @jax.jit
    def both(key):
        params, ref = model.init(key), module.init(key, X[:4])["params"]
        g = jax.grad(lambda p: ce(model.apply(p, X[:8])))(params)
        g_ref = jax.grad(lambda p: ce(module.apply({"params": p}, X[:8])))(ref)
        return (
            params,
            ref,
            model.apply(params, X[:8]),
            module.apply({"params": ref}, X[:8]),
            g,
            g_ref,
        )

    params, ref, y, y_ref, g, g_ref = both(KEY)

    def at(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    leaves = [at(ref, path) for path in _LINEN_PATHS]
    _check_layers(params, [d["kernel"] for d in leaves], [d["bias"] for d in leaves], y, y_ref)
    # gradient statistics per layer: the gradient of each Dense's own parameters, by hand
    by_hand = [
        np.sqrt(sum(float(jnp.sum(v**2)) for v in at(g_ref, path).values()))
        for path in _LINEN_PATHS
    ]
    np.testing.assert_allclose(obs.grad_norms(g), by_hand, rtol=1e-5)


def test_nnx_nested_modules_give_one_layer_per_linear_in_order():
    # the example: a Sequential is two layers, rho the product of both norms
    seq = from_nnx(
        lambda rngs: nnx.Sequential(
            nnx.Linear(64, 32, rngs=rngs), nnx.relu, nnx.Linear(32, 10, rngs=rngs)
        )
    )
    p = jax.jit(seq.init)(KEY)
    assert [w.shape for w in models.layer_weights(p)] == [(32, 64), (10, 32)]
    norms = [np.linalg.norm(np.asarray(q["kernel"], np.float64)) for q in p]
    assert float(obs.rho(p)) == pytest.approx(norms[0] * norms[1], rel=1e-5)
    # deeper nesting, layers assigned in another order than applied: the order of application
    model = from_nnx(_NNXNested, X[:4])

    @jax.jit
    def both(key):
        m = _NNXNested(nnx.Rngs(key))
        mods = _nnx_kernels(m)
        params = model.init(key)
        ks, bs = [l.kernel[...] for l in mods], [l.bias[...] for l in mods]
        return params, ks, bs, model.apply(params, X[:8]), m(X[:8])

    _check_layers(*both(jax.random.key(3, impl="rbg")))
    # without an example input, the order of attribute assignment (head first here)
    p = jax.eval_shape(from_nnx(_NNXNested).init, KEY)
    assert [w.shape for w in jax.eval_shape(models.layer_weights, p)] == SHAPES[-1:] + SHAPES[:-1]


# --------------------------------------------------------------------------- (b) weightless


class _LinenLN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="pre")(x)  # before any weight: carried by the first layer
        x = nn.relu(nn.LayerNorm()(nn.Dense(16)(x)))
        return nn.Dense(10)(x)


class _Shift(nnx.Module):
    """A module with a bias and no weight."""

    def __init__(self, d):
        self.b = nnx.Param(jnp.linspace(-0.1, 0.1, d))

    def __call__(self, x):
        return x + self.b[...][None, :]


class _NNXLN(nnx.Module):
    def __init__(self, rngs):
        self.pre = nnx.LayerNorm(64, rngs=rngs)
        self.l1 = nnx.Linear(64, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.shift = _Shift(16)
        self.l2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.shift(self.norm(self.l1(self.pre(x))))))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_weightless_layers_are_carried_and_trained(kind):
    if kind == "linen":
        model = from_flax(_LinenLN(), X[:4])
        carried = ["LayerNorm_0/bias", "LayerNorm_0/scale", "pre/bias", "pre/scale"]
    else:
        model = from_nnx(_NNXLN)  # attribute order is the order of application here
        carried = ["norm/bias", "norm/scale", "pre/bias", "pre/scale", "shift/b"]
    params = jax.jit(model.init)(KEY)
    assert len(params) == 2
    assert sorted(params[0]) == sorted(["bias", "kernel"] + carried)
    assert sorted(params[1]) == ["bias", "kernel"]
    # observables read the kernels only, and do not crash on the carried entries
    ks = [np.asarray(p["kernel"], np.float64) for p in params]
    assert float(obs.rho(params)) == pytest.approx(np.prod([np.linalg.norm(k) for k in ks]), 1e-5)
    np.testing.assert_allclose(
        obs.singular_values(params, method="svd"), _np_sv(ks), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        models.layer_weights(models.scale_weights(params, 3.0))[0], 3.0 * ks[0].T, rtol=1e-6
    )
    # trained: a nonzero gradient, and one SGD step moves them by -lr g
    loss_fn = make_loss_fn(model, "cross_entropy")
    stepper = steps.sgd(loss_fn)
    batch = Batch(X[:32], Y[:32], jnp.full((32,), 1 / 32))
    st, info = jax.jit(stepper.step_fn)(stepper.init_fn(params), batch, Hparams(lr=0.5))
    assert np.all(np.isfinite(obs.grad_norms(info.grads)))
    for k in carried:
        g = np.asarray(info.grads[0][k])
        assert np.abs(g).max() > 1e-5, k
        np.testing.assert_allclose(st.params[0][k], params[0][k] - 0.5 * g, rtol=1e-6, atol=1e-7)
    # the carried values are the ones the module uses: perturbing one changes the output
    moved = [dict(p) for p in params]
    moved[0][carried[-1]] = moved[0][carried[-1]] + jnp.asarray(_x(params[0][carried[-1]].shape, 4))
    apply = jax.jit(model.apply)
    assert not np.allclose(apply(moved, X[:8]), apply(params, X[:8]))


# --------------------------------------------------------------------------- (c) batch norm


class _LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(10)(nn.relu(x))


class _LinenBNFree(nn.Module):
    """The same network with a BatchNorm that leaves the mode to the adapter."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(momentum=0.8)(x)
        return nn.Dense(10)(nn.relu(x))


class _NNXBN(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, momentum=0.8, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def _bn_model(kind):
    if kind == "linen":
        return from_flax(_LinenBN(), X[:4], train_arg="train")
    return from_nnx(_NNXBN)


def _bn_by_hand(kind, params, state, x, train):
    """The user's module with the adapter's params and state, applied directly:
    (output, new running mean, new running var)."""
    p0, p1, s0 = params[0], params[1], state[0]
    if kind == "linen":
        v = {
            "params": {
                "Dense_0": {"kernel": p0["kernel"], "bias": p0["bias"]},
                "BatchNorm_0": {"scale": p0["BatchNorm_0/scale"], "bias": p0["BatchNorm_0/bias"]},
                "Dense_1": {"kernel": p1["kernel"], "bias": p1["bias"]},
            },
            "batch_stats": {
                "BatchNorm_0": {
                    "mean": s0["batch_stats/BatchNorm_0/mean"],
                    "var": s0["batch_stats/BatchNorm_0/var"],
                }
            },
        }
        y, upd = _LinenBN().apply(v, x, train=train, mutable=["batch_stats"])
        bs = upd["batch_stats"]["BatchNorm_0"]
        return y, bs["mean"], bs["var"]
    m = _NNXBN(nnx.Rngs(0))
    for layer, p in ((m.l1, p0), (m.l2, p1)):
        layer.kernel[...] = p["kernel"]
        layer.bias[...] = p["bias"]
    m.bn.scale[...], m.bn.bias[...] = p0["bn/scale"], p0["bn/bias"]
    m.bn.mean[...], m.bn.var[...] = s0["bn/mean"], s0["bn/var"]
    m.train() if train else m.eval()
    y = m(x)
    return y, m.bn.mean[...], m.bn.var[...]


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_batch_norm_masked_batch_equals_the_smaller_batch(kind):
    model = _bn_model(kind)
    params, state = jax.jit(lambda k: (model.init(k), models.init_state(model, k)))(KEY)
    # running statistics are state, not parameters
    assert not any(k.endswith(("mean", "var")) for p in params for k in p)
    assert sorted(state[0]) and all(k.endswith(("mean", "var")) for k in state[0])
    assert state[1] == {}
    loss_fn = make_loss_fn(model, "cross_entropy")
    vg = jax.jit(lambda p, b: steps.loss_and_grad(loss_fn, p, b))
    B, b = 32, 16
    x = np.asarray(X[:B]).copy()
    x[b:] = _x((B - b, 64), 5, scale=30.0)  # padding holds garbage
    w = np.where(np.arange(B) < b, 1.0 / b, 0.0).astype(np.float32)
    lf, gf, sf = vg(params, Batch(x, Y[:B], w, state))
    ls, gs, ss = vg(params, Batch(x[:b], Y[:b], jnp.full((b,), 1.0 / b), state))
    assert float(lf) == pytest.approx(float(ls), rel=1e-6)
    assert _rel(gf, gs) < 1e-5
    assert _rel(sf, ss) < 1e-6
    # and they are the user's module's own numbers on the true batch
    y, mean, var = _bn_by_hand(kind, params, state, x[:b], train=True)
    assert float(ls) == pytest.approx(float(losses.cross_entropy(y, Y[:b])), rel=1e-6)
    key = "batch_stats/BatchNorm_0/" if kind == "linen" else "bn/"
    np.testing.assert_allclose(ss[0][key + "mean"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ss[0][key + "var"], var, rtol=1e-5)
    # the mask matters: the padding in the statistics gives another loss
    y_all = model.forward(params, state, x, None, train=True).y
    assert abs(float(losses.cross_entropy(y_all, Y[:B], w)) - float(ls)) > 1e-3


def test_linen_batch_norm_follows_the_adapters_mode_without_a_train_argument():
    a, b = _bn_model("linen"), from_flax(_LinenBNFree(), X[:4])
    params, state = a.init(KEY), models.init_state(a, KEY)
    assert jax.tree.structure(b.init(KEY)) == jax.tree.structure(params)
    state = [{k: v + 0.3 for k, v in s.items()} for s in state]  # distinct running statistics
    mask = jnp.arange(16) < 10
    for train in (True, False):
        fa = a.forward(params, state, X[:16], mask, train=train)
        fb = b.forward(params, state, X[:16], mask, train=train)
        np.testing.assert_allclose(fa.y, fb.y, rtol=1e-6)
        assert _rel(fb.state, fa.state) < 1e-7


def test_batch_masks_stay_with_their_own_program_across_threads():
    """The sweep runner traces programs in parallel threads: each trace's batch norms must see
    its own mask (linen's interceptor stack and the nnx call's context variable are per
    thread). Traces of different batch sizes, run concurrently, equal the same traces run
    alone (a mask from another thread would have another shape or be a foreign tracer)."""
    bn = [_bn_model("linen"), _bn_model("nnx")]
    init = [jax.eval_shape(lambda k, m=m: (m.init(k), models.init_state(m, k)), KEY) for m in bn]

    def trace(i, b):
        def f(p, s, x, mask):
            return bn[i].forward(p, s, x, mask, train=True)

        x = jax.ShapeDtypeStruct((b, 64), jnp.float32)
        return str(jax.make_jaxpr(f)(*init[i], x, jax.ShapeDtypeStruct((b,), jnp.bool_)))

    jobs = [(i, b) for i in range(2) for b in (8, 12, 20)]
    alone = {job: trace(*job) for job in jobs}
    barrier = threading.Barrier(len(jobs))

    def worker(job):
        barrier.wait()
        return [trace(*job) for _ in range(3)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that traces interleave
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(worker, jobs))
    finally:
        sys.setswitchinterval(interval)
    for job, texts in zip(jobs, results, strict=True):
        assert all(t == alone[job] for t in texts), job
    assert len(set(alone.values())) == len(jobs)


# --------------------------------------------------------------------------- (d) dropout


class _LinenDrop(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.Dropout(0.5, deterministic=deterministic)(x)
        return nn.Dense(10)(x)


class _LinenDropFree(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.Dropout(0.5)(x)
        return nn.Dense(10)(x)


class _NNXDrop(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def _drop_model(kind):
    if kind == "linen":
        return from_flax(_LinenDrop(), X[:4], deterministic_arg="deterministic")
    return from_nnx(_NNXDrop)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_dropout_draws_a_mask_per_key_in_train_mode_only(kind):
    model = _drop_model(kind)
    assert model.stochastic and model.init_state is None
    params = jax.jit(model.init)(KEY)
    assert len(params) == 2 and all(sorted(p) == ["bias", "kernel"] for p in params)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    fwd = jax.jit(
        lambda p, k, train: model.forward(p, (), X[:16], None, train=train, key=k), static_argnums=2
    )
    y1, y1b, y2 = fwd(params, k1, True).y, fwd(params, k1, True).y, fwd(params, k2, True).y
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y1, y2)
    e1, e2 = fwd(params, k1, False).y, fwd(params, k2, False).y
    np.testing.assert_array_equal(e1, e2)
    h = jax.nn.relu(X[:16] @ params[0]["kernel"] + params[0]["bias"][None, :])
    np.testing.assert_allclose(
        e1, h @ params[1]["kernel"] + params[1]["bias"][None, :], rtol=1e-5, atol=1e-5
    )
    # train mode: half the hidden units dropped, the rest scaled by 2 (the mask is the dropout's)
    _, h1 = model.apply_features(params, X[:16])
    kept = np.asarray(h1) != 0
    assert 0.35 < kept[np.asarray(h) > 0].mean() < 0.65
    np.testing.assert_allclose(np.asarray(h1)[kept], 2 * np.asarray(h)[kept], rtol=1e-5)
    if kind == "linen":  # a Dropout left to the adapter's mode draws the same masks
        free = from_flax(_LinenDropFree(), X[:4])
        np.testing.assert_array_equal(free.forward(params, (), X[:16], key=k1).y, y1)
        np.testing.assert_array_equal(free.forward(params, (), X[:16], train=False).y, e1)


# --------------------------------------------------------------------------- (e, f) runs


class _LinenFull(nn.Module):
    """Nested Dense layers, batch norm and dropout, as a user might write them."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = _Block()(x)  # two Dense, nested
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(10)(x)


class _NNXFull(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Sequential(
            nnx.Linear(64, 12, rngs=rngs),
            nnx.relu,
            nnx.Linear(12, 11, rngs=rngs),
            nnx.BatchNorm(11, rngs=rngs),
            nnx.relu,
            nnx.Dropout(0.2, rngs=rngs),
        )
        self.head = nnx.Linear(11, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.body(x))


def _full_model(kind):
    """(model, the key prefix of its batch norm's running statistics in layer 1's state)."""
    if kind == "linen":
        return from_flax(_LinenFull(), X[:4], train_arg="train"), "batch_stats/BatchNorm_0/"
    return from_nnx(_NNXFull), "body/layers/3/"


@functools.cache
def _nnx_full_module():
    """One module for the by-hand references (its values are all assigned at each use)."""
    return _NNXFull(nnx.Rngs(0))


def _full_by_hand(kind, params, state, x, train):
    """The user's module with the adapter's params and state, applied directly:
    (output, new running mean, new running var); dropout (train mode) from key 0."""
    (p0, p1, p2), s1 = params, state[1]
    if kind == "linen":
        pre = "batch_stats/BatchNorm_0/"
        v = {
            "params": {
                "_Block_0": {
                    "Dense_0": {"kernel": p0["kernel"], "bias": p0["bias"]},
                    "_Inner_0": {"Dense_0": {"kernel": p1["kernel"], "bias": p1["bias"]}},
                },
                "BatchNorm_0": {"scale": p1["BatchNorm_0/scale"], "bias": p1["BatchNorm_0/bias"]},
                "Dense_0": {"kernel": p2["kernel"], "bias": p2["bias"]},
            },
            "batch_stats": {"BatchNorm_0": {"mean": s1[pre + "mean"], "var": s1[pre + "var"]}},
        }
        y, upd = _LinenFull().apply(
            v,
            x,
            train=train,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0, impl="rbg")},
        )
        bs = upd["batch_stats"]["BatchNorm_0"]
        return y, bs["mean"], bs["var"]
    m = _nnx_full_module()
    for layer, p in ((m.body.layers[0], p0), (m.body.layers[2], p1), (m.head, p2)):
        layer.kernel[...] = p["kernel"]
        layer.bias[...] = p["bias"]
    bn = m.body.layers[3]
    bn.scale[...], bn.bias[...] = p1["body/layers/3/scale"], p1["body/layers/3/bias"]
    bn.mean[...], bn.var[...] = s1["body/layers/3/mean"], s1["body/layers/3/var"]
    m.train() if train else m.eval()
    y = m(x)
    return y, bn.mean[...], bn.var[...]


# three runs from the same key: frozen (lr 0) at twice the initial scale, and two trained ones
# that differ only in weight decay
RUN_HP = _hps(lr=[0.0, 0.3, 0.3], weight_decay=[0.0, 0.0, 0.5], init_scale=[2.0, 1.0, 1.0])
# threefry: rbg keys do not draw the same numbers in a vmap's lanes as in single runs
RUN_KEY = jax.random.key(0)
KEYS = jnp.stack([RUN_KEY] * 3)
RUN_OBS = ("loss", "batch_loss", "layer_norm", "sv", "grad_norm")


@pytest.fixture(scope="module", params=["linen", "nnx"])
def full_run(request):
    """Full-batch runs (6 steps, a record per step) of a module with nested Dense layers, batch
    norm and dropout, vmapped over RUN_HP; the running statistics recorded by user observables."""
    kind = request.param
    model, pre = _full_model(kind)

    def stat(name):
        return dyn.Observable(
            f"bn_{name}", lambda ctx: ctx.model_state[1][pre + name], dims=("unit",)
        )

    spec = RunSpec(
        model,
        DATA,
        loss="cross_entropy",
        steps=6,
        record_every=1,
        sampling="full",
        observables=RUN_OBS + (stat("mean"), stat("var")),
        eval_size=None,
        keep_state=True,
    )
    run = make_run(spec)
    vrun = jax.jit(jax.vmap(run))
    tr = vrun(RUN_HP, KEYS)
    return SimpleNamespace(kind=kind, pre=pre, model=model, run=run, vrun=vrun, tr=tr)


def test_run_keeps_batch_norm_statistics_as_state(full_run):
    """The running statistics are updated by each step's batch, are not parameters and are not
    decayed; the records evaluate the module with them (use_running_average=True by hand)."""
    kind, pre, tr = full_run.kind, full_run.pre, full_run.tr
    assert np.all(tr["status"] == 0)
    final = tr["final_state"]
    # run 0 never moves (lr 0): its parameters are its initial ones, kernels twice the others'
    params0 = [
        {k: v[0] / 2 if k == "kernel" else v[0] for k, v in p.items()} for p in final.state.params
    ]
    state0 = [
        {k: (jnp.ones_like if k.endswith("var") else jnp.zeros_like)(v[0]) for k, v in s.items()}
        for s in final.model_state
    ]  # batch norm starts at mean 0, variance 1
    assert not any(k.endswith(("mean", "var")) for p in params0 for k in p)
    # after step 1: the module's own update from the initial parameters on the whole set; the
    # same at weight decay 0 and 0.5
    _, mean, var = _full_by_hand(kind, params0, state0, X, train=True)
    for r in (1, 2):
        np.testing.assert_allclose(tr["bn_mean"][r, 1], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tr["bn_var"][r, 1], var, rtol=1e-5)
    np.testing.assert_array_equal(tr["bn_var"][:, 0], 1.0)  # initial running variance
    assert not np.allclose(tr["bn_var"][1, 2], tr["bn_var"][1, 1])  # updated at every step
    for r in (1, 2):
        p, s = _one(final.state.params, r), _one(final.model_state, r)
        np.testing.assert_array_equal(s[1][pre + "mean"], tr["bn_mean"][r, -1])
        y_eval, _, _ = _full_by_hand(kind, p, s, X, train=False)
        assert float(tr["loss"][r, -1]) == pytest.approx(
            float(losses.cross_entropy(y_eval, Y)), rel=1e-5
        )
        # (train mode, batch statistics, would be another number)
        y_train, _, _ = _full_by_hand(kind, p, s, X, train=True)
        assert abs(float(losses.cross_entropy(y_train, Y)) - float(tr["loss"][r, -1])) > 1e-4
    # weight decay acts on the parameters (the check can fail): they differ between the runs
    k1, k2 = (final.state.params[0]["kernel"][r] for r in (1, 2))
    assert _rel(k2, k1) > 1e-3


def test_run_draws_a_dropout_mask_per_step_from_its_key(full_run):
    """At lr 0 the parameters never move and the batch is the whole set, so the train-mode
    batch losses of successive steps differ only through their dropout masks; trained, the loss
    falls; the same key gives the same run, another key another one."""
    tr = full_run.tr
    np.testing.assert_allclose(
        tr["layer_norm"][0], np.broadcast_to(tr["layer_norm"][0, 0], (7, 3)), rtol=1e-6
    )
    frozen = np.asarray(tr["batch_loss"][0, 1:])
    assert len(np.unique(frozen)) == frozen.size
    loss = np.asarray(tr["loss"][1])
    assert loss[-1] < 0.9 * loss[0]
    again = full_run.vrun(RUN_HP, KEYS)
    for n in ("loss", "batch_loss", "bn_var"):
        np.testing.assert_array_equal(again[n], tr[n])
    other = full_run.vrun(RUN_HP, jnp.stack([RUN_KEY, jax.random.key(5), RUN_KEY]))
    assert not np.allclose(other["batch_loss"][1, 1:], tr["batch_loss"][1, 1:])
    np.testing.assert_array_equal(other["batch_loss"][2], tr["batch_loss"][2])


def test_run_init_scale_multiplies_every_kernel(full_run):
    """hp.init_scale = 2 doubles each of the three kernels' norms and singular values."""
    tr = full_run.tr
    assert tr["layer_norm"].shape == (3, 7, 3)  # three Dense layers
    init = np.asarray(tr["layer_norm"][:, 0], np.float64)
    np.testing.assert_allclose(init[0], 2 * init[1], rtol=1e-6)
    np.testing.assert_allclose(tr["sv"][0, 0], 2 * tr["sv"][1, 0], rtol=1e-5)


def test_run_vmapped_equals_single_runs(full_run):
    single = jax.jit(full_run.run)
    for i in range(3):
        one = single(_one(RUN_HP, i), RUN_KEY)
        for n in RUN_OBS + ("bn_mean", "bn_var"):
            np.testing.assert_allclose(
                full_run.tr[n][i], one[n], rtol=2e-5, atol=1e-6, err_msg=f"{n} run {i}"
            )


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_rho_eff_reads_adapted_batch_norms(kind):
    """rho_eff of an adapted module with BatchNorm: the kernels' norms, over each BatchNorm's
    ||sqrt(var)||, times its ||scale||, as for the library's own batch norm."""
    if kind == "linen":

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train=True):
                x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
                return nn.Dense(3)(x)

        model = from_flax(Net(), jnp.zeros((4, 5)), train_arg="train")
    else:

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.a = nnx.Linear(5, 16, rngs=rngs)
                self.bn = nnx.BatchNorm(16, rngs=rngs)
                self.b = nnx.Linear(16, 3, rngs=rngs)

            def __call__(self, x):
                return self.b(nnx.relu(self.bn(self.a(x))))

        model = from_nnx(Net, jnp.zeros((4, 5)))
    params = model.init(jax.random.key(0))
    state = models.init_state(model)
    x = jnp.asarray(_x((12, 5), 3, scale=3.0))
    state = models.forward(model, params, state, x, train=True).state
    ws = models.layer_weights(params)
    var = [v for s in state for k, v in s.items() if k.endswith("var")]
    gain = [v for p in params for k, v in p.items() if k.endswith("scale")]
    assert len(var) == len(gain) == 1
    gain = gain[0] * 1.7
    params = [{**p, **{k: gain for k in p if k.endswith("scale")}} for p in params]
    want = np.prod([np.linalg.norm(w) for w in ws]) * np.linalg.norm(gain)
    want /= np.linalg.norm(np.sqrt(np.asarray(var[0])))
    np.testing.assert_allclose(float(dyn.rho_eff(params, state)), want, rtol=1e-5)
