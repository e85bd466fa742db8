"""dynamics.representations and dynamics.geometry against float64 NumPy references, closed forms
and invariances: hidden layers recomputed from params, representation statistics, the
observables through a real run (zero at initialization, equal to references recomputed from
the run's final parameters), the identical-output constructions, the data builders, decision
values, the logistic loss, the one-neuron ResNet's readout and live initialization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import geometry as geo
from dynamics import representations as rep

# --------------------------------------------------------------------------- references


def np_forward(params, x, acts):
    """float64 reference of a dense net: (y, [z_k], [h_k])."""
    f = {"relu": lambda z: np.maximum(z, 0), "linear": lambda z: z, "tanh": np.tanh}
    h = np.asarray(x, np.float64)
    pre, reps = [], []
    for k, p in enumerate(params):
        z = h @ np.asarray(p["w"], np.float64).T
        if "b" in p:
            z = z + np.asarray(p["b"], np.float64)
        if k == len(params) - 1:
            return z, pre, reps
        h = f[acts[k]](z)
        pre.append(z)
        reps.append(h)


def np_abs_corr(h):
    live = h.std(0) > 0
    c = np.corrcoef(h[:, live], rowvar=False)
    iu = np.triu_indices(c.shape[0], 1)
    return np.abs(c[iu]).mean()


def np_eff_rank(h):
    s = np.linalg.svd(h, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-(p * np.log(p)).sum())


def random_mlp(key, widths, bias=True):
    return dyn.mlp(widths, bias=bias, init="pytorch").init(key)


@pytest.fixture(scope="module")
def net():
    params = random_mlp(jax.random.key(0), (5, 7, 6, 3))
    x = np.asarray(jax.random.normal(jax.random.key(1), (40, 5)))
    return params, x


# --------------------------------------------------------------------------- hidden layers


def test_dense_forward_and_mlp_hidden_match_the_model_and_numpy(net):
    params, x = net
    model = dyn.mlp((5, 7, 6, 3), bias=True, init="pytorch")
    y, pre, reps = rep.dense_forward(params, jnp.asarray(x), ("relu", "relu"))
    y_ref, pre_ref, rep_ref = np_forward(params, x, ("relu", "relu"))
    np.testing.assert_allclose(y, model.apply(params, jnp.asarray(x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    pre2, rep2 = rep.mlp_hidden(model)(params, jnp.asarray(x))
    for a, b, c in zip(pre, pre2, pre_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    for a, c in zip(rep2, rep_ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    # NTK parameterization: the multipliers come from Model.dense
    ntk = dyn.mlp((5, 7, 3), parameterization="ntk", activation="tanh")
    p = ntk.init(jax.random.key(2))
    pre_n, _ = rep.mlp_hidden(ntk)(p, jnp.asarray(x))
    z_ref = np.sqrt(1 / 5) * x @ np.asarray(p[0]["w"], np.float64).T
    np.testing.assert_allclose(pre_n[0], z_ref, rtol=1e-5, atol=1e-5)


def test_resnet_hidden_and_errors(net):
    _, x = net
    model = dyn.resnet_one_neuron(5, 3, 2)
    params = model.init(jax.random.key(3))
    pre, reps = rep.resnet_one_neuron_hidden(params, jnp.asarray(x))
    h = x.astype(np.float64)
    for p, z in zip(params[:-1], pre, strict=True):
        z_ref = h @ np.asarray(p["w"], np.float64).T + np.asarray(p["b"], np.float64)
        np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
        h = h + np.maximum(z_ref, 0) @ np.asarray(p["w2"], np.float64).T
    np.testing.assert_allclose(
        model.apply(params, jnp.asarray(x)), h @ np.asarray(params[-1]["w"]).T, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="not a plain dyn.mlp"):
        rep.mlp_hidden(dyn.mlp((5, 4, 2), norm="batch"))
    with pytest.raises(ValueError, match="probe"):
        rep.flipped_patterns("x_val", dyn.mlp((5, 4, 2)))
    with pytest.raises(ValueError, match="activations"):
        rep.dense_forward(net[0], jnp.asarray(x), ("relu",))
    with pytest.raises(ValueError, match="stats"):
        rep.representation_statistics("x_test", dyn.mlp((5, 4, 2)), stats=("sparsity",))


# --------------------------------------------------------------------------- statistics


def test_statistics_against_numpy():
    rng = np.random.default_rng(0)
    # rank 3 by construction, ReLU-like zeros, two dead columns
    h = np.maximum(rng.standard_normal((50, 3)) @ rng.standard_normal((3, 8)), 0)
    h[:, [2, 5]] = 0.0
    H = jnp.asarray(h, jnp.float32)
    assert float(rep.zero_fraction(H)) == pytest.approx(np.mean(h == 0))
    assert float(rep.dead_units(H)) == 2
    s = np.linalg.svd(h, compute_uv=False)
    assert float(rep.representation_rank(H)) == np.sum(s / np.linalg.norm(h) > 1e-3)
    assert float(rep.representation_rank(H)) <= 6  # ReLU of a rank-3 map: at most 6 live units
    assert float(rep.effective_rank(H)) == pytest.approx(np_eff_rank(h), rel=1e-4)
    assert float(rep.mean_abs_correlation(H)) == pytest.approx(np_abs_corr(h), rel=1e-4)
    assert float(rep.activation_amplitude(H)) == pytest.approx(np.abs(h).mean(), rel=1e-5)
    # closed forms: a zero matrix; identical columns (|corr| = 1); orthogonal columns
    zero = jnp.zeros((10, 4))
    assert float(rep.effective_rank(zero)) == 0.0 and float(rep.representation_rank(zero)) == 0
    assert np.isnan(float(rep.mean_abs_correlation(zero)))
    col = rng.standard_normal((30, 1))
    same = jnp.asarray(np.concatenate([col, 2 * col, -col], 1), jnp.float32)
    assert float(rep.mean_abs_correlation(same)) == pytest.approx(1.0, abs=1e-5)
    assert float(rep.effective_rank(same)) == pytest.approx(1.0, abs=1e-3)
    q, _ = np.linalg.qr(rng.standard_normal((30, 4)))
    q = q - q.mean(0)  # centred orthogonal-ish columns: compare with numpy, not with 0
    assert float(rep.mean_abs_correlation(jnp.asarray(q, jnp.float32))) == pytest.approx(
        np_abs_corr(q), rel=1e-4, abs=1e-6
    )
    assert float(rep.effective_rank(jnp.eye(5))) == pytest.approx(5.0, rel=1e-5)


# --------------------------------------------------------------------------- observables


@pytest.fixture(scope="module")
def run_trace():
    data = dyn.data.gaussian_mixture(seed=0, n_train=64, n_test=32, d=6, num_classes=3)
    model = dyn.mlp((6, 16, 12, 3), bias=True)
    probe = data.x_test[:20]
    obs = (
        rep.relative_distance(),
        rep.flipped_patterns(probe, model),
        rep.update_singular_values(1),
        *rep.representation_statistics("x_test", model, n_probe=20),
    )
    spec = dyn.RunSpec(
        model=model,
        data=data,
        loss="cross_entropy",
        stepper=dyn.sgd,
        steps=40,
        record_every=20,
        observables=obs,
        batch=16,
        keep_state=True,
    )
    trace = jax.jit(dyn.make_run(spec))(dyn.Hparams(lr=0.5), jax.random.key(4))
    init = model.init(jax.random.split(jax.random.key(4))[0])  # make_run's init key
    return data, model, probe, jax.device_get(trace), init


def test_observables_start_at_zero_and_match_references(run_trace):
    data, model, probe, tr, init = run_trace
    np.testing.assert_array_equal(tr["rel_dist"][0], 0.0)
    np.testing.assert_array_equal(tr["flipped"][0][:2], 0.0)
    assert np.isnan(tr["flipped"][0][2])  # the output layer has no pattern
    final = tr["final_state"].state.params
    acts = ("relu", "relu")
    for k in range(3):
        w, w0 = np.asarray(final[k]["w"], np.float64), np.asarray(init[k]["w"], np.float64)
        ref = np.linalg.norm(w - w0) / np.linalg.norm(w0)
        assert tr["rel_dist"][-1][k] == pytest.approx(ref, rel=1e-4)
        assert ref > 0.01  # training moved every layer
    _, pre, _ = np_forward(final, probe, acts)
    _, pre0, _ = np_forward(init, probe, acts)
    flips = [np.mean((z > 0) != (z0 > 0)) for z, z0 in zip(pre, pre0, strict=True)]
    np.testing.assert_allclose(tr["flipped"][-1][:2], flips, atol=1e-6)
    dw = np.asarray(final[1]["w"], np.float64) - np.asarray(init[1]["w"], np.float64)
    np.testing.assert_allclose(
        tr["dw_sv"][-1], np.linalg.svd(dw, compute_uv=False), rtol=1e-4, atol=1e-6
    )
    _, _, reps = np_forward(final, data.x_test[:20], acts)
    for k, h in enumerate(reps):
        assert tr["rep_zero_frac"][-1][k] == pytest.approx(np.mean(h == 0), abs=1e-6)
        assert tr["rep_dead"][-1][k] == np.sum(np.all(h == 0, 0))
        assert tr["rep_eff_rank"][-1][k] == pytest.approx(np_eff_rank(h), rel=1e-3)
        assert tr["rep_abs_corr"][-1][k] == pytest.approx(np_abs_corr(h), rel=1e-3)
    assert np.isnan(tr["rep_rank"][-1][2])


# --------------------------------------------------------------------------- identical outputs


@pytest.fixture(scope="module")
def trained(run_trace):
    data, _, _, tr, _ = run_trace
    return [dict(p) for p in tr["final_state"].state.params], np.asarray(data.x_test, np.float64)


def test_affine_map_of_an_inserted_linear_layer_keeps_outputs(trained):
    params, x = trained
    acts = ("relu", "relu")
    y0, _, _ = np_forward(params, x, acts)
    lin, lin_acts = rep.insert_linear_layer(params, acts, 1)
    assert lin_acts == ("relu", "relu", "linear") and len(lin) == 4
    y1, _, r1 = np_forward(lin, x, lin_acts)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-12)  # identity layer: exact
    rng = np.random.default_rng(1)
    m = r1[2].shape[1]
    A = np.eye(m) + 3.0 * np.ones((m, m)) / m + 0.1 * rng.standard_normal((m, m))
    c = rng.standard_normal(m)
    moved = rep.affine_identical_output(lin, lin_acts, 2, A, c)
    y2, _, r2 = np_forward(moved, x, lin_acts)
    np.testing.assert_allclose(y2, y0, rtol=1e-4, atol=1e-4)  # float32 params
    np.testing.assert_allclose(r2[2], r1[2] @ A.T + c, rtol=1e-4, atol=1e-4)
    corr0, corr2 = np_abs_corr(r1[2]), np_abs_corr(r2[2])
    assert corr2 - corr0 > 0.2, (corr0, corr2)  # the statistic moved a lot, outputs did not
    with pytest.raises(ValueError, match="linear"):
        rep.affine_identical_output(params, acts, 1, np.eye(params[1]["w"].shape[0]))
    with pytest.raises(ValueError, match="invertible"):
        rep.affine_identical_output(lin, lin_acts, 2, np.zeros((m, m)))


def test_rescaling_and_dead_units_keep_outputs(trained):
    params, x = trained
    acts = ("relu", "relu")
    y0, _, r0 = np_forward(params, x, acts)
    s = np.exp(np.random.default_rng(2).uniform(-2, 2, r0[0].shape[1]))
    y1, _, r1 = np_forward(rep.rescale_units(params, acts, 0, s), x, acts)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r1[0], r0[0] * s, rtol=1e-4, atol=1e-5)
    assert np_abs_corr(r1[0]) == pytest.approx(np_abs_corr(r0[0]), rel=1e-3)
    with pytest.raises(ValueError, match="commute"):
        rep.rescale_units(params, ("tanh", "relu"), 0, s)
    dead = rep.append_dead_units(params, acts, 1, 5, seed=3)
    y2, _, r2 = np_forward(dead, x, acts)
    np.testing.assert_array_equal(y2, y0)  # dead units contribute exactly 0
    h0, h2 = jnp.asarray(r0[1], jnp.float32), jnp.asarray(r2[1], jnp.float32)
    assert float(rep.dead_units(h2)) == float(rep.dead_units(h0)) + 5
    assert float(rep.representation_rank(h2)) == float(rep.representation_rank(h0))
    assert np.any(dead[2]["w"][:, -5:] != 0)  # their outgoing weights are not what keeps y


# --------------------------------------------------------------------------- geometry


def test_ball_ring_and_xor_balls():
    d = geo.ball_ring(seed=1, n_train=501, n_test=100, ring=(1.5, 2.5))
    r = np.linalg.norm(d.x_train, axis=1)
    pos = d.y_train > 0
    assert pos.sum() == 251 and d.binary and d.output_size == 1
    assert (
        r[pos].max() <= 1.0 + 1e-6 and r[~pos].min() >= 1.5 - 1e-6 and r[~pos].max() <= 2.5 + 1e-6
    )
    # uniform in the disc: P(r <= 1/2) = 1/4
    assert abs(np.mean(r[pos] <= 0.5) - 0.25) < 0.07
    np.testing.assert_array_equal(geo.ball_ring(seed=1, n_train=501, n_test=100).x_train, d.x_train)
    x = geo.xor_balls(seed=2, n_train=400, n_test=40, d=20, radius=0.3)
    assert x.x_train.shape == (400, 20) and np.bincount(x.y_train).tolist() == [200, 200]
    # every point is Q c + u, |u| <= r, Q c at (+-1, +-1) in an orthonormal plane: points of one
    # ball are within 2r, of opposite balls (one class) within 2r after a sign flip, and of the
    # other class (adjacent centres, 2 apart) at least 2 - 2r away either way
    a = x.x_train.astype(np.float64)
    near = np.minimum(
        np.linalg.norm(a[:, None] - a[None], axis=2), np.linalg.norm(a[:, None] + a[None], axis=2)
    )
    same = x.y_train[:, None] == x.y_train[None, :]
    assert near[same].max() <= 0.6 + 1e-5 and near[~same].min() >= 1.4 - 1e-5
    # the data span R^20 (the ball noise), the classes a 2-D plane
    s = np.linalg.svd(a - a.mean(0), compute_uv=False)
    assert s[2] > 0 and s[1] > 3 * s[2]
    with pytest.raises(dyn.data.DataError, match="ring"):
        geo.ball_ring(ring=(0.5, 2.0))
    with pytest.raises(dyn.data.DataError, match="overlap"):
        geo.xor_balls(radius=1.5)


def test_points_loss_and_decision_observables():
    g = geo.grid_points(2.0, 5)
    assert (
        g.shape == (25, 2) and np.allclose(g[1], [-1.0, -2.0]) and np.allclose(g[5], [-2.0, -1.0])
    )
    c = geo.circle_points(3.0, 8)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 3.0, rtol=1e-6)
    f = jnp.asarray([[2.0], [-1.0], [0.5]])
    y = jnp.asarray([1.0, 1.0, -1.0])
    ref = np.log1p(np.exp(-np.asarray([2.0, -1.0, -0.5])))
    assert float(geo.logistic_loss(f, y)) == pytest.approx(ref.mean(), rel=1e-6)
    w = jnp.asarray([0.5, 0.5, 0.0])
    assert float(geo.logistic_loss(f, y, w)) == pytest.approx(ref[:2].mean(), rel=1e-6)
    # decision values through a run equal the model evaluated on the final parameters
    data = geo.ball_ring(seed=0, n_train=64, n_test=16)
    model = geo.one_neuron_resnet(2, 3, 1)
    spec = dyn.RunSpec(
        model=model,
        data=data,
        loss=geo.logistic_loss,
        stepper=dyn.adam,
        steps=20,
        record_every=10,
        slow_every=2,
        batch=16,
        observables=(geo.decision_values(g), geo.positive_fraction(c, name="pos")),
        keep_state=True,
    )
    tr = jax.device_get(jax.jit(dyn.make_run(spec))(dyn.Hparams(lr=0.01), jax.random.key(0)))
    final = tr["final_state"].state.params
    out = np.asarray(model.apply(final, jnp.asarray(g)))[:, 0]
    np.testing.assert_allclose(tr["decision"][-1], out, rtol=1e-5, atol=1e-5)
    assert np.isnan(tr["decision"][1]).all()  # costly: every slow_every records
    on_c = np.asarray(model.apply(final, jnp.asarray(c)))[:, 0]
    assert tr["pos"][-1] == pytest.approx(np.mean(on_c > 0))
    assert final[-1]["b"].shape == (1,) and final[-1]["b"][0] != 0  # the readout bias trains


def test_one_neuron_resnet_readout_and_live_init():
    base = dyn.resnet_one_neuron(2, 4, 1)
    model = geo.one_neuron_resnet(2, 4, 1)
    key = jax.random.key(5)
    p = model.init(key)
    x = jnp.asarray(geo.grid_points(2.0, 7))
    np.testing.assert_array_equal(model.apply(p, x), base.apply(base.init(key), x))  # c = 0
    p[-1]["b"] = jnp.asarray([0.7])
    np.testing.assert_allclose(model.apply(p, x), base.apply(p, x) + 0.7, rtol=1e-6)
    # width-2 depth-6 ReLU nets are dead at init for most keys; live_init's are not
    data = geo.ball_ring(seed=0, n_train=200, n_test=0)
    narrow = dyn.mlp((2,) + (2,) * 6 + (1,), bias=True)
    xs = jnp.asarray(data.x_train)
    keys = jax.random.split(jax.random.key(6), 16)

    def spread(params):
        return jnp.std(narrow.apply(params, xs))

    first = np.asarray(jax.vmap(lambda k: spread(narrow.init(jax.random.fold_in(k, 0))))(keys))
    live = geo.live_init(narrow, data.x_train)
    alive = np.asarray(jax.jit(jax.vmap(lambda k: spread(live.init(k))))(keys))
    assert np.mean(first < 1e-3) >= 0.5, first
    assert np.all(alive > 1e-3), alive
    # where the first draw is alive it is kept; elsewhere a later draw replaced it
    kept = first > 1e-3
    assert kept.any()
    np.testing.assert_allclose(alive[kept], first[kept], rtol=1e-5)
    assert np.all(alive[~kept] != first[~kept])
