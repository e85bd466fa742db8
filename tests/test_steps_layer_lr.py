"""Per-layer learning-rate factors and weight-decay masks of the optax steppers (dynamics/steps.py):
their forms against hand-written float64 updates (SGD with heavy-ball momentum, Adam with L2 and
decoupled decay), bit-identity of the neutral settings with the plain steppers, and Hoffer et
al.'s norm-matched rate (`norm_matched_lr`): the exact discrete-time identity on a
scale-invariant loss (directions of the decay-free run equal the weight-decay run's to float64
rounding), the authors' per-epoch form, and the choice of the reference by initialization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics import steps
from dynamics.steps import Batch, Hparams, ScaleContext


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _hp(lr, wd=0.0, mu=0.0):
    return Hparams(
        lr=jnp.float64(lr),
        weight_decay=jnp.float64(wd),
        batch_size=0,
        momentum=jnp.float64(mu),
        init_scale=1.0,
    )


# A loss on two "layers": layer 0 {"w": (3, 4), "b": (3,)}, layer 1 {"w": (2, 3)}; a smooth
# non-quadratic function so that updates depend on the point.
_A = np.random.default_rng(0).normal(size=(3, 4))
_B = np.random.default_rng(1).normal(size=(2, 3))


def _toy_loss(params, batch):
    p0, p1 = params
    h = jnp.tanh(p0["w"] * _A + p0["b"][:, None]).sum(1)  # (3,)
    return jnp.sum((p1["w"] * _B) @ h) + 0.25 * sum(jnp.sum(x**4) for x in jax.tree.leaves(params))


_toy_grad_jit = jax.jit(jax.grad(_toy_loss))


def _toy_grad(params):
    return _toy_grad_jit(params, None)


def _params(seed=2):
    rng = np.random.default_rng(seed)
    return [
        {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=3))},
        {"w": jnp.asarray(rng.normal(size=(2, 3)))},
    ]


_BATCH = Batch(jnp.zeros((1,)), jnp.zeros((1,)), jnp.ones((1,)))


def _run(stepper, params, hp, n):
    """The parameters after each of n steps (one scan)."""

    def body(state, _):
        state, _ = stepper.step_fn(state, _BATCH, hp)
        return state, state.params

    traj = jax.jit(lambda p: jax.lax.scan(body, stepper.init_fn(p), None, length=n)[1])(params)
    return [jax.tree.map(lambda a, t=t: a[t], traj) for t in range(n)]


def _close(a, b, tol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- forms


def test_layer_multipliers_forms_and_errors():
    p = _params()
    full = steps.layer_multipliers(2.0, p)
    assert float(full[0]["b"]) == 2.0 and float(full[1]["w"]) == 2.0
    per_layer = steps.layer_multipliers(jnp.array([2.0, 3.0]), p)
    assert float(per_layer[0]["w"]) == 2.0 and float(per_layer[1]["w"]) == 3.0
    rows = jnp.array([1.0, 2.0, 3.0])
    m = steps.layer_multipliers([{"w": rows}, 0.5], p)
    assert m[0]["w"].shape == (3, 1) and float(m[0]["b"]) == 1.0  # unnamed leaves: default
    np.testing.assert_array_equal(np.asarray(m[0]["w"])[:, 0], [1, 2, 3])
    assert float(m[1]["w"]) == 0.5
    m = steps.layer_multipliers([rows, 1.0], p)  # (out,) on every leaf of the layer: w and b
    assert m[0]["w"].shape == (3, 1) and m[0]["b"].shape == (3,)
    with pytest.raises(ValueError, match="lr_scale: 1 entries for 2 layers"):
        steps.layer_multipliers([1.0], p)
    with pytest.raises(ValueError, match="one factor per layer"):
        steps.layer_multipliers(jnp.ones(3), p)
    with pytest.raises(ValueError, match="has no leaf 'gamma'"):
        steps.layer_multipliers([{"gamma": 1.0}, 1.0], p)
    with pytest.raises(ValueError, match=r"decay_mask\[1\]\['w'\]: a factor of shape \(4,\)"):
        steps.layer_multipliers([1.0, jnp.ones(4)], p, "decay_mask")
    with pytest.raises(ValueError, match="list of layer dicts"):
        steps.layer_multipliers(1.0, {"w": jnp.ones(2)})


def test_neutral_factors_are_bit_identical_to_the_plain_steppers():
    p = _params()
    hp = _hp(0.05, 0.2, 0.9)
    for make in (
        lambda **kw: steps.sgd(_toy_loss, momentum="heavy_ball", **kw),
        lambda **kw: steps.adam(_toy_loss, weight_decay="decoupled", **kw),
        lambda **kw: steps.adam(_toy_loss, weight_decay="l2", **kw),
    ):
        plain = _run(make(), p, hp, 3)
        ones = _run(make(decay_mask=[1.0, 1.0], lr_scale=1.0), p, hp, 3)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ones), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # without the options the state is the plain optax state (no counter added)
    state = steps.sgd(_toy_loss).init_fn(p)
    assert not isinstance(state.opt_state, steps.ScaledState)
    assert isinstance(steps.sgd(_toy_loss, lr_scale=1.0).init_fn(p).opt_state, steps.ScaledState)


# --------------------------------------------------------------------------- against numpy


def _np_tree(params):
    return [{k: np.asarray(v, np.float64) for k, v in p.items()} for p in params]


def _np_sgd(params, n, lr, wd, mu, mask, scale):
    """Heavy-ball SGD with L2 decay: d = g + wd m w; v <- mu v + d; w <- w - lr s_t v, with the
    factors m (decay) and s_t (lr, a function of the step t and the old params)."""
    w = _np_tree(params)
    v = [{k: np.zeros_like(x) for k, x in p.items()} for p in w]
    out = []
    for t in range(1, n + 1):
        g = _np_tree(_toy_grad([{k: jnp.asarray(x) for k, x in p.items()} for p in w]))
        s = scale(t, w)
        new = []
        for i, p in enumerate(w):
            q = {}
            for k, x in p.items():
                d = g[i][k] + wd * mask[i][k] * x
                v[i][k] = mu * v[i][k] + d
                q[k] = x - lr * s[i][k] * v[i][k]
            new.append(q)
        w = new
        out.append(w)
    return out


def _np_adam(params, n, lr, wd, decay, mask, scale, b1=0.9, b2=0.999, eps=1e-8):
    w = _np_tree(params)
    m = [{k: np.zeros_like(x) for k, x in p.items()} for p in w]
    s2 = [{k: np.zeros_like(x) for k, x in p.items()} for p in w]
    out = []
    for t in range(1, n + 1):
        g = _np_tree(_toy_grad([{k: jnp.asarray(x) for k, x in p.items()} for p in w]))
        s = scale(t, w)
        new = []
        for i, p in enumerate(w):
            q = {}
            for k, x in p.items():
                d = g[i][k] + (wd * mask[i][k] * x if decay == "l2" else 0.0)
                m[i][k] = b1 * m[i][k] + (1 - b1) * d
                s2[i][k] = b2 * s2[i][k] + (1 - b2) * d**2
                u = (m[i][k] / (1 - b1**t)) / (np.sqrt(s2[i][k] / (1 - b2**t)) + eps)
                if decay == "decoupled":
                    u = u + wd * mask[i][k] * x
                q[k] = x - lr * s[i][k] * u
            new.append(q)
        w = new
        out.append(w)
    return out


_ROWS = np.array([0.5, 1.0, 2.0])
_MASK_SPEC = [{"w": 0.0}, {"w": 0.5}]  # no decay on layer 0's weight, half on layer 1's
_MASK_NP = [{"w": 0.0, "b": 1.0}, {"w": 0.5}]


def _lr_spec(ctx: ScaleContext):
    """Per-row factors on layer 0 growing with the step, a per-layer one on layer 1 read from
    the parameters before the step."""
    return [
        {"w": jnp.asarray(_ROWS) * ctx.t},
        jnp.sum(ctx.params[1]["w"] ** 2) / (1.0 + jnp.sum(ctx.params[1]["w"] ** 2)),
    ]


def _lr_np(t, w):
    s1 = np.sum(w[1]["w"] ** 2) / (1.0 + np.sum(w[1]["w"] ** 2))
    return [{"w": (_ROWS * t)[:, None], "b": 1.0}, {"w": s1}]


def test_sgd_with_mask_and_factors_matches_numpy():
    p, n = _params(), 5
    stepper = steps.sgd(_toy_loss, momentum="heavy_ball", decay_mask=_MASK_SPEC, lr_scale=_lr_spec)
    ours = _run(stepper, p, _hp(0.02, 0.3, 0.9), n)
    want = _np_sgd(p, n, 0.02, 0.3, 0.9, _MASK_NP, _lr_np)
    for t in range(n):
        _close(ours[t], want[t])


@pytest.mark.parametrize("decay", ["l2", "decoupled"])
def test_adam_with_mask_and_factors_matches_numpy(decay):
    p, n = _params(), 5
    stepper = steps.adam(_toy_loss, weight_decay=decay, decay_mask=_MASK_SPEC, lr_scale=_lr_spec)
    ours = _run(stepper, p, _hp(0.01, 0.3), n)
    want = _np_adam(p, n, 0.01, 0.3, decay, _MASK_NP, _lr_np)
    for t in range(n):
        _close(ours[t], want[t], 1e-10)


def test_decay_mask_as_function_of_params():
    p = _params()
    by_fn = steps.sgd(_toy_loss, decay_mask=lambda params: [{"w": 0.0}] + [1.0])
    by_tree = steps.sgd(_toy_loss, decay_mask=[{"w": 0.0}, 1.0])
    _close(_run(by_fn, p, _hp(0.1, 0.5), 3)[-1], _run(by_tree, p, _hp(0.1, 0.5), 3)[-1], 0)


# --------------------------------------------------------------------------- Hoffer et al.


def _invariant_loss(params, batch):
    """A loss invariant to the scale of each row of layer 0's weight (as a batch norm after
    the layer makes it), with a plain layer 1: L = sum_j v_j tanh(<w_j, x> / ||w_j||) + ..."""
    w, v = params[0]["w"], params[1]["w"]
    u = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    h = jnp.tanh(u @ jnp.asarray(_A[0]))  # (3,)
    return jnp.sum(v[0] * h) ** 2 + jnp.sum(jnp.cos(u @ jnp.asarray(_A[1])) * v[1]) + jnp.sum(v**2)


def _inv_params(seed):
    rng = np.random.default_rng(seed)
    return [
        {"w": jnp.asarray(rng.normal(size=(3, 4)))},
        {"w": jnp.asarray(rng.normal(size=(2, 3)))},
    ]


def _rows(w):
    return jnp.linalg.norm(w, axis=1)


def test_norm_matched_lr_reproduces_the_weight_decay_directions_exactly():
    n, lr, wd = 60, 0.3, 0.05
    hp = _hp(lr, wd)
    refs = []
    traj_wd = {}
    for seed in (3, 4):  # two references, each run must pick its own by its initialization
        p = _inv_params(seed)
        traj = _run(steps.sgd(_invariant_loss), p, hp, n)
        traj_wd[seed] = traj
        refs.append(np.stack([_rows(p[0]["w"])] + [_rows(q[0]["w"]) for q in traj]))
    ref = [np.stack(refs)]  # (S=2, n+1, 3)
    scale = steps.norm_matched_lr(ref, layers=[0])
    mask = [{"w": 0.0}, {}]
    for seed in (4, 3):
        p = _inv_params(seed)
        corr = _run(steps.sgd(_invariant_loss, decay_mask=mask, lr_scale=scale), p, hp, n)
        for t in (0, 10, n - 1):
            a, b = traj_wd[seed][t], corr[t]
            ua = a[0]["w"] / _rows(a[0]["w"])[:, None]
            ub = b[0]["w"] / _rows(b[0]["w"])[:, None]
            np.testing.assert_allclose(np.asarray(ub), np.asarray(ua), atol=1e-13)
            # the unnormalized layer steps with the decay in both runs: it is identical
            np.testing.assert_allclose(np.asarray(b[1]["w"]), np.asarray(a[1]["w"]), atol=1e-13)
        # the decay-free run's norms grow (||w'||^2 = ||w||^2 + lr'^2 ||g||^2), the reference's
        # shrink under the decay: the directions agree while the norms do not
        assert np.all(np.asarray(_rows(corr[-1][0]["w"])) > np.asarray(_rows(p[0]["w"])))
        assert np.all(np.asarray(_rows(traj_wd[seed][-1][0]["w"])) < np.asarray(_rows(p[0]["w"])))
    # without the correction the decay-free run goes elsewhere
    plain = _run(steps.sgd(_invariant_loss, decay_mask=mask), _inv_params(3), hp, n)[-1]
    ua = traj_wd[3][-1][0]["w"] / _rows(traj_wd[3][-1][0]["w"])[:, None]
    up = plain[0]["w"] / _rows(plain[0]["w"])[:, None]
    assert float(jnp.max(jnp.abs(ua - up))) > 1e-3


def test_norm_matched_lr_factors_authors_form_and_guards():
    p = _inv_params(5)
    r0 = np.asarray(_rows(p[0]["w"]))
    table = np.stack([r0, 2 * r0, 4 * r0])  # (E+1 = 3 epochs, 3 rows)
    scale = steps.norm_matched_lr([table], [0], form="authors", steps_per_epoch=2)
    state = scale.init_fn(p)
    assert int(state) == 0
    hp = _hp(0.1, 0.5)
    for t, row in ((1, 1), (2, 1), (3, 2), (4, 2)):  # epoch (t - 1) // 2, its end: row e + 1
        m = scale.scale_fn(ScaleContext(jnp.int32(t), p, hp, state))
        np.testing.assert_allclose(np.asarray(m[0]["w"]), r0**2 / table[row] ** 2, rtol=1e-14)
        assert m[1] == 1.0
    # past the reference's length, or for a run the reference did not start from: NaN
    m = scale.scale_fn(ScaleContext(jnp.int32(5), p, hp, state))
    assert np.all(np.isnan(np.asarray(m[0]["w"])))
    other = scale.init_fn(_inv_params(6))
    assert int(other) == -1
    m = scale.scale_fn(ScaleContext(jnp.int32(1), p, hp, other))
    assert np.all(np.isnan(np.asarray(m[0]["w"])))
    # the exact form at step t: ||w'||^2 / ((1 - lr wd) r(t - 1)^2)
    exact = steps.norm_matched_lr([table], [0])
    m = exact.scale_fn(ScaleContext(jnp.int32(2), p, hp, exact.init_fn(p)))
    np.testing.assert_allclose(
        np.asarray(m[0]["w"]), r0**2 / ((1 - 0.1 * 0.5) * table[1] ** 2), rtol=1e-14
    )
    with pytest.raises(ValueError, match="form must be one of"):
        steps.norm_matched_lr([table], [0], form="per_epoch")
    with pytest.raises(ValueError, match="reference: 1 arrays for 2 layers"):
        steps.norm_matched_lr([table], [0, 1])
    with pytest.raises(ValueError, match=r"reference\[0\]: 3 rows, layer 0 has 2"):
        steps.norm_matched_lr([table], [0]).init_fn([{"w": jnp.ones((2, 4))}, {"w": p[1]["w"]}])


def test_lr_scale_is_traced_under_jit_and_vmap():
    """A factor computed from traced hyperparameters: one compiled step serves every value."""
    p = _params()
    stepper = steps.sgd(_toy_loss, lr_scale=lambda ctx: [ctx.hp.init_scale, 1.0])

    def final(s):
        state = stepper.init_fn(p)
        hp = _hp(0.1)._replace(init_scale=s)
        return stepper.step_fn(state, _BATCH, hp)[0].params

    out = jax.jit(jax.vmap(final))(jnp.array([0.0, 1.0, 2.0]))
    g = _toy_grad(p)
    for i, s in enumerate((0.0, 1.0, 2.0)):
        np.testing.assert_allclose(
            np.asarray(out[0]["w"][i]), np.asarray(p[0]["w"] - 0.1 * s * g[0]["w"]), rtol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(out[1]["w"][i]), np.asarray(p[1]["w"] - 0.1 * g[1]["w"]), rtol=1e-12
        )
